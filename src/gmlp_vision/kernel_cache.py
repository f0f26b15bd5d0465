"""A cache of compiled C kernels that is trusted before anything in it is loaded.

Loading a shared library runs its code: its constructors run inside ``dlopen``, before any check of what it
computes. So a library is built and loaded only where no one else can write, as ssh treats ``~/.ssh`` and pip its
cache:

- the cache directory and the one above it (``.../gmlp-vision/kernels``) are owned by this user and not writable
  by group or others; every directory above those is owned by this user or root and, where others may write to it,
  sticky (as ``/tmp`` is); no symlink on the way belongs to another user. Where this does not hold, or where the
  cache cannot be created (a read-only home), the library is built into a fresh private directory (``mkdtemp``,
  mode 0700) that is removed when the process exits, and `build` says why in one line.
- a build records the SHA-256 of the library beside it (``NAME.sha256``). Before ``dlopen`` the library, opened
  without following symlinks, must be a regular file of this user's that no one else may write, and must hash to
  that digest; the descriptor that was hashed is the one loaded (``/proc/self/fd/N``), so the file cannot be swapped
  between the check and the load. A truncated library (which killed the process with SIGBUS when mapped), a damaged
  or a foreign one is never loaded: `load_verified` raises `DamagedLibrary` and the caller builds again.
- builders of one library take turns (``flock`` on a lock file beside it), so processes started together (torchrun)
  write the library and its digest once.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from gmlp_vision.errors import DamagedLibrary, KernelUnavailable
from gmlp_vision.files import replacing

DIGEST_SUFFIX = ".sha256"
MAX_LIBRARY_BYTES = 64 << 20  # a kernel library is ~70 KB; anything this large is not one of ours
_PRIVATE: dict[str, Path] = {}  # this process's private build directory, once made
_DLOPENED: set[str] = set()  # the names libraries were loaded by in this process


def _uid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else -1


def _mode(st: os.stat_result) -> str:
    return oct(stat.S_IMODE(st.st_mode))


def untrusted(directory: Path, owned_levels: int = 2) -> str | None:
    """Why code must not be loaded from ``directory``, or None when it may; parts not yet created are skipped.

    Args:
        directory: the cache directory.
        owned_levels: how many levels, from ``directory`` up, must belong to this user alone.
    """
    uid = _uid()
    if uid < 0:  # no POSIX ownership to check (Windows): the platform's own permissions apply
        return None
    path = Path(os.path.abspath(directory))
    for part in (*reversed(path.parents), path):
        try:
            st = os.lstat(part)
        except OSError:
            break  # created by this process, with its own owner and mode (or it cannot be: `trusted_dir` says so)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (uid, 0):
            return f"{part} is a symlink owned by another user (uid {st.st_uid})"
    real = Path(os.path.realpath(path))
    for level, part in enumerate((real, *real.parents)):
        try:
            st = os.stat(part)
        except OSError:
            continue
        open_to_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if level < owned_levels:
            if st.st_uid != uid:
                return f"{part} is owned by another user (uid {st.st_uid})"
            if open_to_others:
                return f"{part} is writable by group or others (mode {_mode(st)})"
        elif st.st_uid not in (uid, 0):
            return f"{part} is owned by another user (uid {st.st_uid})"
        elif open_to_others and not st.st_mode & stat.S_ISVTX:
            return f"{part} is writable by group or others and not sticky (mode {_mode(st)})"
    return None


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents as this user's, writable by no one else (whatever the umask)."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    for part in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(part, 0o700)
            os.chmod(part, 0o755 if part != directory else 0o700)


def private_dir() -> Path:
    """This process's private build directory (``mkdtemp``: 0700, a fresh name), removed when the process exits."""
    if "dir" not in _PRIVATE:
        _PRIVATE["dir"] = Path(tempfile.mkdtemp(prefix="gmlp-vision-kernels-"))
        atexit.register(shutil.rmtree, _PRIVATE["dir"], True)
    return _PRIVATE["dir"]


def trusted_dir(directory: Path) -> tuple[Path, str | None]:
    """``directory`` made and checked, or this process's private directory and the reason ``directory`` is not used."""
    reason = untrusted(directory)
    if reason is None:
        try:
            _make_dirs(directory)
            probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".probe.")  # writable? (a read-only home)
            probe.close()
        except OSError as e:
            reason = f"cannot write to {directory}: {e.strerror or e}"
        else:
            reason = untrusted(directory)
    return (directory, None) if reason is None else (private_dir(), reason)


def compiler_command(compiler: str | None) -> list[str]:
    """The compiler command: ``compiler``, else ``$CC`` (split like a shell: ``ccache gcc`` works), else cc or gcc.

    Raises:
        KernelUnavailable: ``$CC`` cannot be split, or no compiler is found.
    """
    text = compiler or os.environ.get("CC", "")
    try:
        command = shlex.split(text)
    except ValueError as e:
        raise KernelUnavailable(f"cannot read the compiler command $CC={text!r}: {e}") from None
    if not command:
        found = shutil.which("cc") or shutil.which("gcc")
        if not found:
            raise KernelUnavailable("no C compiler found (cc, gcc or $CC)")
        command = [found]
    return command


def compiler_version(command: Sequence[str]) -> str:
    """What ``COMMAND --version`` prints (part of the build's cache key).

    Raises:
        KernelUnavailable: the compiler cannot be run.
    """
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"cannot run the C compiler {shlex.join(command)}: {e}") from None
    return done.stdout


@contextlib.contextmanager
def _turn(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s lock file (builders of one library take turns; no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _digest_of(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _file_problem(st: os.stat_result, limit: int) -> str | None:
    """What disqualifies an opened file from being loaded, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if _uid() >= 0 and st.st_uid != _uid():
        return f"is owned by another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {_mode(st)})"
    if st.st_size > limit:
        return f"is {st.st_size:,} bytes, over the {limit:,} expected"
    return None


def _open_own_file(path: Path, limit: int) -> int:
    """``path`` opened read-only without following a symlink, checked to be this user's regular file, private.

    Raises:
        DamagedLibrary: it is missing, a symlink or special file, another user's, writable by others, or too large.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DamagedLibrary(f"cannot open {path.name}: {e.strerror or e}") from None
    problem = _file_problem(os.fstat(fd), limit)
    if problem:
        os.close(fd)
        raise DamagedLibrary(f"{path.name} {problem}")
    return fd


def recorded_digest(path: Path) -> str:
    """The SHA-256 recorded when ``path`` was built.

    Raises:
        DamagedLibrary: no digest was recorded, or it is not one.
    """
    fd = _open_own_file(path.with_name(path.name + DIGEST_SUFFIX), 1024)
    try:
        text = os.read(fd, 1024).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise DamagedLibrary(f"{path.name}{DIGEST_SUFFIX} does not hold a SHA-256 digest")
    return text


def load_verified(path: Path) -> ctypes.CDLL:
    """Load the library at ``path`` if its bytes are those its build recorded (see the module docstring).

    Raises:
        DamagedLibrary: no digest, other bytes, not this user's private regular file, or ``dlopen`` refused it.
    """
    expected = recorded_digest(path)
    fd = _open_own_file(path, MAX_LIBRARY_BYTES)
    try:
        if _digest_of(fd) != expected:
            raise DamagedLibrary(f"{path.name} does not match the SHA-256 recorded when it was built")
        return _dlopen(fd, path)
    finally:
        os.close(fd)


def _dlopen(fd: int, path: Path) -> ctypes.CDLL:
    """``dlopen`` the file open as ``fd``, by a name no earlier load used.

    The loader hands back the library it already holds under the same name, so a rebuilt library loaded as
    ``/proc/self/fd/3`` again would be the old one: each load takes a descriptor number of its own.
    """
    held: list[int] = []
    try:
        name = f"/proc/self/fd/{fd}"
        if not os.path.exists(name):  # no /proc: the path itself (checked above, in a folder only we may write)
            name = str(path)
        while name in _DLOPENED and name.startswith("/proc/"):
            held.append(os.dup(fd))
            name = f"/proc/self/fd/{held[-1]}"
        _DLOPENED.add(name)
        return ctypes.CDLL(name)
    except OSError as e:
        raise DamagedLibrary(f"cannot load {path.name}: {e}") from None
    finally:
        for extra in held:
            os.close(extra)


def compile_library(command: Sequence[str], source: Path, flags: Sequence[str], out: Path, *, again: bool) -> None:
    """Compile ``source`` into ``out`` and record its digest, unless a build with a digest is there (or ``again``).

    The library is compiled to a temp file of its own (`files.replacing`), hashed, then renamed over ``out``, after
    its digest (a library torn by a crash fails that digest and is built again); a failure leaves nothing behind.
    Both are written 0755/0644 whatever the umask: `load_verified` refuses files others may write.

    Raises:
        KernelUnavailable: the compiler failed, or the files could not be written.
    """
    with _turn(out):
        digest = out.with_name(out.name + DIGEST_SUFFIX)
        if not again and out.is_file() and digest.is_file():
            return
        try:
            with replacing(out, 0o755) as tmp:
                done = subprocess.run([*command, *flags, str(source), "-o", str(tmp)], capture_output=True, text=True,
                                      timeout=300)  # fmt: skip
                if done.returncode != 0:
                    first = (done.stderr or done.stdout).strip().splitlines()[:1]
                    raise KernelUnavailable(f"{shlex.join(command)} failed: {first[0] if first else done.returncode}")
                sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
                with replacing(digest, 0o644) as record:
                    record.write_text(sha + "\n")
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelUnavailable(f"cannot build {out}: {e}") from None


__all__ = [
    "DIGEST_SUFFIX",
    "compile_library",
    "compiler_command",
    "compiler_version",
    "load_verified",
    "private_dir",
    "recorded_digest",
    "trusted_dir",
    "untrusted",
]
