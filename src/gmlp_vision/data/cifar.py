"""CIFAR-10 and CIFAR-100 from the official python archives, as in-memory uint8 tensors.

CIFAR members are read straight from the ``.tar.gz`` (or an extracted folder), never unpacked to disk, and unpickled
by a restricted unpickler that resolves only numpy's array reconstruction, so a hostile file runs nothing. Archives are
checked for structure (members, shapes, dtypes, label ranges, class names), not md5, since copies may be re-packed;
reading stops after `_MAX_OTHER_MEMBERS` members that are not CIFAR's (a header bomb). ``verify_md5=True`` compares a
``.tar.gz`` with the official sum. An archive missing from the cache dir is downloaded with an md5 check and an atomic
write. The train split is the data batches in file order, so the tutorial's validation split (the last 5,000 training
images, Keras ``validation_split=0.1``) is ``train.images[-5000:]``.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gmlp_vision.data.base import Dataset, LoadOptions, Split, default_cache_dir
from gmlp_vision.errors import DataError, one_line
from gmlp_vision.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

_MAX_MEMBER = 1 << 30  # the largest official member is ~155 MB: anything over 1 GB is not CIFAR
_MAX_OTHER_MEMBERS = 1_000  # the official archives hold 8 or 9 members; tarfile keeps each header it reads
_CHUNK = 1 << 20
_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class _Layout:
    """Where things are in an official CIFAR python archive."""

    title: str
    base: str  # folder inside the archive
    archive: str  # official archive file name
    md5: str
    train: tuple[str, ...]  # data files, concatenated in this order
    test: str
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


# fmt: off
_LAYOUTS = {
    "cifar10": _Layout("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta", b"labels",
                       b"label_names", 10),
    "cifar100": _Layout("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                        ("train",), "test", "meta", b"fine_labels", b"fine_label_names", 100),
}
# fmt: on


def load_cifar(name: str, path: str | Path | None, options: LoadOptions) -> Dataset:
    """CIFAR-10 or CIFAR-100 (``name``) into memory.

    ``path``: the official ``.tar.gz``, its extracted folder, or a folder holding either; default the archive in the
    cache dir, downloaded when it is missing and ``options.download`` allows.

    Raises:
        DataError: missing, corrupt, hostile or wrong-kind data; a failed download.
    """
    key = name.lower()
    layout = _LAYOUTS[key]
    if path is None:
        source = (options.cache_dir if options.cache_dir is not None else default_cache_dir()) / layout.archive
        if not source.is_file() and not options.download:
            raise DataError(f"{source} not found and download is off; pass a copy with --data PATH or put it there")
        if not source.is_file():
            download(_URL + layout.archive, source, layout.md5, progress=options.progress)
    else:
        source = Path(path).expanduser()
        if source.is_dir() and _find_root(source, layout) is None and (source / layout.archive).is_file():
            source = source / layout.archive
    if not source.exists():
        raise DataError(f"{source} does not exist; pass the {layout.title} archive {layout.archive} or its folder")
    if options.verify_md5 and not source.is_file():
        raise DataError(f"{source} is a folder; verifying the md5 needs the official {layout.archive}")
    if options.verify_md5 and (digest := _md5(source)) != layout.md5:
        raise DataError(f"{source} has md5 {digest}, not the official {layout.md5}; download {layout.archive} again")
    files = _read_tar(source, layout) if source.is_file() else _read_folder(source, layout)
    missing = [m for m in layout.members if m not in files]
    if missing:
        raise DataError(f"{source} lacks {layout.base}/{missing[0]}; get a complete copy of {layout.archive}")
    meta = files[layout.meta]
    names = meta.get(layout.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != layout.num_classes or {type(n) for n in names} - {bytes, str}:
        raise DataError(f"{source}: {layout.meta} must list {layout.num_classes} class names; get a fresh copy")
    classes = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)
    train = _split([_batch(files[m], f"{source}:{m}", layout) for m in layout.train])
    test = _split([_batch(files[layout.test], f"{source}:{layout.test}", layout)])
    return Dataset(key, train, test, classes)


def download(url: str, dest: Path, md5: str, *, timeout: float = 20.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` atomically and check its md5; a failed download leaves nothing behind.

    Args:
        url: Address to fetch.
        dest: Final file; its folder is created. Data goes to a temp file beside it, fsynced, then ``os.replace``d.
        md5: Expected hex md5 of the whole file.
        timeout: Seconds allowed to connect and for each read.
        progress: Show a tqdm bar on stderr.

    Returns:
        ``dest``.

    Raises:
        DataError: No connection, an HTTP error, a stalled, short or wrong-md5 download, or an unwritable folder.
    """
    dest = Path(dest)
    hint = f"without network, pass a local copy with --data PATH or put {dest.name} at {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DataError(f"cannot write to {dest.parent} ({e}); set GMLP_DATA to a writable folder") from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = int(response.headers.get("Content-Length") or -1)
            digest, size = hashlib.md5(usedforsecurity=False), 0
            bar = tqdm(total=max(expected, 0) or None, unit="B", unit_scale=True, desc=dest.name, disable=not progress)
            with bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
            if expected >= 0 and size != expected:
                raise DataError(f"download of {url} stopped after {size} of {expected} bytes; try again, or {hint}")
            if digest.hexdigest() != md5:
                raise DataError(f"download of {url} has md5 {digest.hexdigest()}, not {md5}; try again, or {hint}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and socket timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        reason = e.reason if type(e) is urllib.error.URLError else e
        raise DataError(f"cannot download {url} ({type(e).__name__}: {one_line(reason)}); {hint}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("downloaded %s to %s", url, dest)
    return dest


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle needs: numpy's array reconstruction (numpy 1 and 2 names), dtype, scalar."""
    # Taken from numpy's own reducers, so numpy.core (numpy 1) and numpy._core (numpy 2) names resolve alike.
    reconstruct, scalar = np.ndarray(0, np.uint8).__reduce__()[0], np.uint8(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed |= {(f"{core}.multiarray", "_reconstruct"): reconstruct, (f"{core}.multiarray", "scalar"): scalar}
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler resolving only ``_allowed_globals()``; any other global is refused before anything runs."""

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global or raise DataError."""
        if (obj := _allowed_globals().get((module, name))) is None:
            raise DataError(f"refusing pickled {module}.{name} (CIFAR files hold only numpy arrays)")
        return obj


def _unpickle(data: bytes, where: str) -> Any:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{where}: {e}; the file may be hostile, do not use it") from None
    except Exception as e:  # a malformed pickle can raise almost anything; none of it may escape raw
        detail = f"{type(e).__name__}: {one_line(e)}"
        raise DataError(f"{where} is not a readable pickle ({detail}); get a fresh copy") from e
    # An array the file did not fill (numpy.ndarray called with a huge shape) would be uninitialised memory.
    if isinstance(obj, dict) and any(isinstance(v, np.ndarray) and v.nbytes > len(data) for v in obj.values()):
        raise DataError(f"{where} claims more array data than it holds; the file may be hostile, do not use it")
    return obj


def _read_tar(path: Path, layout: _Layout) -> dict[str, Any]:
    """Unpickle the layout's members straight from a tar archive, refusing odd members before reading them.

    Reading stops after `_MAX_OTHER_MEMBERS` members that are not the layout's: a small archive of many empty members
    (a header bomb) would otherwise be parsed to its end.
    """
    wanted = {f"{layout.base}/{m}": m for m in layout.members}
    others = {o.base: o.title for o in _LAYOUTS.values() if o is not layout}
    found: dict[str, Any] = {}
    odd = 0
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty; get a fresh copy of {layout.archive}")
        with tarfile.open(path, "r:*") as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it reads (for getmember); each is used once, here
                member = info.name.removeprefix("./")
                if (other := others.get(member.split("/", 1)[0])) is not None:
                    raise DataError(f"{path} holds {other}, not {layout.title}; pass {layout.archive} instead")
                if member not in wanted:
                    odd += 1
                    if odd > _MAX_OTHER_MEMBERS:
                        raise DataError(
                            f"{path} holds more than {_MAX_OTHER_MEMBERS:,d} members that are not {layout.title}'s, "
                            f"so it is not {layout.archive}; get a fresh copy"
                        )
                    continue
                if not info.isreg() or info.size > _MAX_MEMBER:
                    raise DataError(f"{path}: member {member} is not a regular file under 1 GB; get a fresh copy")
                found[wanted[member]] = _unpickle(tar.extractfile(info).read(), f"{path}:{member}")
            while tar.fileobj.read(_CHUNK):  # read to the end so gzip checks its CRC and length
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        detail = f"{type(e).__name__}: {one_line(e)}"
        raise DataError(f"{path} is not a readable {layout.title} archive ({detail}); get a fresh copy") from e
    return found


def _find_root(path: Path, layout: _Layout) -> Path | None:
    """The extracted folder, ``path/<base>`` or ``path`` itself, if either holds the layout's files."""
    for root in (path / layout.base, path):
        if any((root / m).is_file() for m in layout.members):
            return root
    return None


def _read_folder(path: Path, layout: _Layout) -> dict[str, Any]:
    root = _find_root(path, layout)
    if root is None:
        for other in _LAYOUTS.values():
            if other is not layout and _find_root(path, other) is not None:
                raise DataError(f"{path} holds {other.title}, not {layout.title}; pass {layout.archive} or its folder")
        if path.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in path.iterdir()):
            raise DataError(
                f"{path} holds image files but no class folders: put each class's images in a folder of its own "
                f"({path}/<class>/*.jpg) and train with --data {path}"
            )
        raise DataError(f"{path} holds neither {layout.base}/ nor its files; pass {layout.archive} or its folder")
    found: dict[str, Any] = {}
    for member in layout.members:
        if (file := root / member).is_file():
            if file.stat().st_size > _MAX_MEMBER:
                raise DataError(f"{file} is over 1 GB, so not a {layout.title} file; get a fresh copy")
            found[member] = _unpickle(file.read_bytes(), str(file))
    return found


def _batch(obj: Any, where: str, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Check one unpickled batch; return its (n, 3072) uint8 pixels and (n,) int64 labels."""
    data = obj.get(b"data") if isinstance(obj, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: b'data' must be a uint8 (n, 3072) array, got {got}; get a fresh copy")
    try:
        labels = np.asarray(obj.get(layout.label_key))
    except ValueError:  # ragged lists
        labels = np.asarray(None)
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise DataError(f"{where}: {layout.label_key!r} must hold {len(data)} integer labels; get a fresh copy")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        found = f"{labels.min()}..{labels.max()}"
        raise DataError(f"{where}: labels must lie in 0..{layout.num_classes - 1}, found {found}; get a fresh copy")
    return data, labels.astype(np.int64)


def _split(batches: list[tuple[np.ndarray, np.ndarray]]) -> Split:
    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)  # a fresh, writable copy
    return Split(torch.from_numpy(images), torch.from_numpy(np.concatenate([labels for _, labels in batches])))


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
