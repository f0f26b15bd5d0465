"""Atomic files: what the run directory and the export folder write, never left half-written.

Every temp file is made beside its target under a name unique to one call (`temp_beside`): two processes writing the
same file (two exports to one folder) each write their own temp, and the last rename wins whole. A temp is removed on
any error or interrupt; only a kill -9 can leave one, named ``.NAME.PID.RANDOM.tmp``. Files get the permissions
``open`` gives a new file (0644 under the usual umask 022), not mkstemp's 0600: what is written here is shared.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_beside(path: Path) -> Path:
    """A new empty file ``.NAME.PID.RANDOM.tmp`` in ``path``'s folder, made by this call alone (``O_EXCL``).

    Its mode is 0666 less the umask, applied by the system as for any new file (so no umask is read or changed).

    Raises:
        OSError: the folder cannot be written (missing, read-only, no permission, full).
    """
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # 1 in 4 billion: draw again
            continue
        return tmp


@contextmanager
def scratch_beside(path: Path) -> Iterator[Path]:
    """A `temp_beside` file for the block to write and read, removed when the block ends, whatever happens."""
    tmp = temp_beside(path)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def replacing(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A `temp_beside` file for the block to write, renamed over ``path`` when the block succeeds.

    ``path`` gets ``mode``, or else the temp's first permissions, even where the writer changed them (safetensors
    makes its file 0600, a compiler its output as the umask says).

    Raises:
        OSError: the temp cannot be made or renamed; the temp is removed and ``path`` is left as it was, as on
            any error or interrupt inside the block.
    """
    tmp = temp_beside(path)
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode) if mode is None else mode
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def made_folder(folder: Path) -> Iterator[None]:
    """Create ``folder`` (and missing parents) for the block; if the block fails, remove those still empty."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for made in missing:
            try:
                made.rmdir()
            except OSError:  # not empty (another writer's files), or gone
                break
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path`` (`replacing`); no temp is left."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


def why_not_written(path: Path, error: OSError, elsewhere: str = "write elsewhere") -> str:
    """Why writing ``path`` (or making its folder) failed with ``error``, and what to do, on one line.

    Names the folder or file at fault, never a temp file. ``elsewhere`` is how the caller's user picks another
    place (``"export elsewhere with --out"``).
    """
    folder = next((p for p in path.parents if p.is_dir()), path.parent)  # the folder that exists, not one to make
    if error.errno == errno.EROFS:
        return f"{folder} is on a read-only file system; {elsewhere}"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {folder}; {elsewhere}, or change its permissions"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left in {folder} (disk or quota full); free some space, or {elsewhere}"
    if error.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir(parents=True) met a file where a folder must be
        at = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        return f"{at} is a file, not a folder; {elsewhere}, or move that file away"
    if error.errno == errno.EISDIR:
        return f"{path} is a folder, not a file; {elsewhere}"
    return f"{error.strerror or error}; {elsewhere}"


__all__ = ["made_folder", "replacing", "scratch_beside", "temp_beside", "why_not_written", "write_text"]
