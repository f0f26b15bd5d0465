"""Small CIFAR archives in the official python-pickle format, for tests (no network, a few KB each).

The official files were written by Python 2: pickle protocol 2, dict keys and raw array data as byte strings
(``SHORT_BINSTRING``/``BINSTRING`` opcodes) and numpy arrays rebuilt through ``numpy.core.multiarray._reconstruct``.
``py2_pickle`` writes exactly that from Python 3, so the fakes exercise the same unpickling path as the real files.

    fake = make_cifar("cifar100")                # the dicts and the arrays a loader must return
    path = write_tar(tmp_path / "c.tar.gz", fake.files())
    files = fake.files(); files[f"{fake.base}/test"] = hostile_pickle(tmp_path / "pwned")
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(f"fine_{i:02d}" for i in range(100))
_RECONSTRUCT = np.ndarray(0, np.uint8).__reduce__()[0]


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be changed
    """Protocol-2 pickler that writes bytes as Python 2 ``str`` and numpy's reconstructor under its numpy 1 name."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj: Any) -> bytes:
    """Pickle ``obj`` the way Python 2 wrote the official CIFAR files."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


@dataclass
class FakeCifar:
    """A fake CIFAR dataset: the dicts to pickle per member, and the arrays a loader must return."""

    name: str  # "cifar10" or "cifar100"
    base: str  # folder inside the archive
    archive: str  # official archive file name
    objects: dict[str, dict[bytes, Any]]  # member file name -> pickled dict
    train_images: np.ndarray  # (N, 3, 32, 32) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]

    def files(self) -> dict[str, bytes]:
        """Archive member path -> pickled bytes, in the official member order."""
        return {f"{self.base}/{name}": py2_pickle(obj) for name, obj in self.objects.items()}


def _batch(rng: np.random.Generator, labels: np.ndarray, label_key: bytes, title: bytes) -> dict[bytes, Any]:
    n = len(labels)
    batch = {
        b"batch_label": title,
        label_key: [int(v) for v in labels],  # a plain list of ints, like the originals
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"fake_%05d.png" % i for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
    return batch


def make_cifar(name: str = "cifar10", *, per_batch: int = 20, n_test: int = 10, seed: int = 0) -> FakeCifar:
    """Build a fake CIFAR-10 (5 batches of ``per_batch``) or CIFAR-100 (one train file of ``5 * per_batch``)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        classes, base, archive, key = CIFAR10_CLASSES, "cifar-10-batches-py", "cifar-10-python.tar.gz", b"labels"
        train_labels = rng.permutation(np.arange(5 * per_batch) % 10)
        objects = {
            f"data_batch_{i + 1}": _batch(rng, part, key, b"training batch %d of 5" % (i + 1))
            for i, part in enumerate(np.split(train_labels, 5))
        }
        objects["test_batch"] = _batch(rng, rng.integers(0, 10, n_test), key, b"testing batch 1 of 1")
        objects["batches.meta"] = {
            b"num_cases_per_batch": per_batch,
            b"label_names": [c.encode() for c in classes],
            b"num_vis": 3072,
        }
    elif name == "cifar100":
        classes, base, archive, key = CIFAR100_CLASSES, "cifar-100-python", "cifar-100-python.tar.gz", b"fine_labels"
        train_labels = rng.permutation(np.arange(5 * per_batch) % 100)
        objects = {
            "train": _batch(rng, train_labels, key, b"training batch 1 of 1"),
            "test": _batch(rng, rng.integers(0, 100, n_test), key, b"testing batch 1 of 1"),
            "meta": {
                b"fine_label_names": [c.encode() for c in classes],
                b"coarse_label_names": [b"coarse_%02d" % i for i in range(20)],
            },
        }
    else:
        raise ValueError(f"no fake for {name!r}")
    train = [b for m, b in objects.items() if m.startswith(("data_batch", "train"))]
    splits = [train, [b for m, b in objects.items() if m.startswith("test")]]
    images = [np.concatenate([b[b"data"] for b in s]).reshape(-1, 3, 32, 32) for s in splits]
    labels = [np.concatenate([np.asarray(b[key], dtype=np.int64) for b in s]) for s in splits]
    return FakeCifar(name, base, archive, objects, images[0], labels[0], images[1], labels[1], classes)


def write_tar(path: Path, files: dict[str, bytes], *, mode: str = "w:gz") -> Path:
    """Write ``files`` (member path -> bytes) as a tar archive with their folders, like the official ones."""
    with tarfile.open(path, mode) as tar:
        for folder in sorted({name.rsplit("/", 1)[0] for name in files if "/" in name}):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    """Extract ``files`` under ``root`` (the folder that then holds e.g. ``cifar-10-batches-py/``)."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


class _Exploit:
    """Unpickling this runs ``how`` to create ``target``: what a restricted unpickler must refuse."""

    def __init__(self, target: Path, how: str) -> None:
        self.target, self.how = str(target), how

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "open":
            return open, (self.target, "w")
        if self.how == "system":
            return os.system, (f"touch '{self.target}'",)
        if self.how == "exec":
            return exec, (f"open({self.target!r}, 'w').close()",)
        raise ValueError(self.how)


HOSTILE_KINDS = ("open", "system", "exec")


def hostile_pickle(target: Path, how: str = "open") -> bytes:
    """A batch-like pickle whose unpickling would create ``target`` via builtins.open, os.system or builtins.exec."""
    return pickle.dumps({b"data": _Exploit(target, how), b"labels": []}, protocol=2)
