"""Tests for gmlp_vision.data: CIFAR archives (fake ones in the official format), downloads, digits, real CIFAR-10."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from archives import HOSTILE_KINDS, FakeCifar, hostile_pickle, make_cifar, py2_pickle, write_folder, write_tar
from gmlp_vision import data
from gmlp_vision.data import DATASET_KINDS, DATASETS, default_cache_dir, load_dataset
from gmlp_vision.data import cifar as cifar_mod
from gmlp_vision.data import digits as digits_mod
from gmlp_vision.data.cifar import download
from gmlp_vision.errors import DataError
from gmlp_vision.kinds import KINDS

REAL_CIFAR10 = Path(__file__).parents[1].parent / "shared" / "data" / "cifar-10-python.tar.gz"


def _fake(name: str) -> FakeCifar:
    return make_cifar(name, seed=1 if name == "cifar10" else 2)


def _check_equal(ds: data.Dataset, fake: FakeCifar) -> None:
    assert ds.name == fake.name and ds.classes == fake.classes
    assert (ds.num_classes, ds.image_size, ds.in_chans) == (len(fake.classes), 32, 3)
    for split, images, labels in [
        (ds.train, fake.train_images, fake.train_labels),
        (ds.test, fake.test_images, fake.test_labels),
    ]:
        assert split.images.dtype == torch.uint8 and split.images.is_contiguous()
        assert split.labels.dtype == torch.int64 and len(split) == len(labels)
        np.testing.assert_array_equal(split.images.numpy(), images)
        np.testing.assert_array_equal(split.labels.numpy(), labels)


# --- CIFAR archives --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_fake_archive_loads_exactly(tmp_path: Path, name: str) -> None:
    fake = _fake(name)
    ds = load_dataset(name, write_tar(tmp_path / fake.archive, fake.files()))
    _check_equal(ds, fake)
    assert len(ds.train) == 100 and len(ds.test) == 10


def test_fixtures_load(cifar10_archive: Path, fake_cifar10: FakeCifar, cifar100_archive: Path) -> None:
    _check_equal(load_dataset("cifar10", cifar10_archive), fake_cifar10)
    _check_equal(load_dataset("CIFAR100", str(cifar100_archive)), make_cifar("cifar100"))


def test_train_split_is_batches_in_file_order(cifar10_archive: Path, fake_cifar10: FakeCifar) -> None:
    ds = load_dataset("cifar10", cifar10_archive)
    for i in range(5):
        batch = fake_cifar10.objects[f"data_batch_{i + 1}"]
        np.testing.assert_array_equal(ds.train.images[20 * i : 20 * (i + 1)].reshape(20, -1).numpy(), batch[b"data"])
        assert ds.train.labels[20 * i : 20 * (i + 1)].tolist() == batch[b"labels"]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_pixel_goes_to_channel_row_column(tmp_path: Path, name: str) -> None:
    fake = _fake(name)
    files = fake.files()
    test_name = f"{fake.base}/{'test_batch' if name == 'cifar10' else 'test'}"
    batch = pickle.loads(files[test_name], encoding="bytes")
    batch[b"data"][:] = 0
    batch[b"data"][3, 1 * 1024 + 5 * 32 + 7] = 200  # image 3, green, row 5, column 7
    files[test_name] = py2_pickle(batch)
    images = load_dataset(name, write_tar(tmp_path / "a.tar.gz", files)).test.images
    assert images[3, 1, 5, 7] == 200 and int(images.sum()) == 200


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("where", ["parent", "itself", "holds_archive"])
def test_folder_and_targz_agree(tmp_path: Path, name: str, where: str) -> None:
    fake = _fake(name)
    root = write_folder(tmp_path / "extracted", fake.files())
    write_tar(tmp_path / "extracted" / fake.archive, fake.files())
    from_tar = load_dataset(name, tmp_path / "extracted" / fake.archive)
    path = {"parent": root, "itself": root / fake.base, "holds_archive": tmp_path / "extracted"}[where]
    if where == "holds_archive":
        for member in (root / fake.base).iterdir():
            member.unlink()
        (root / fake.base).rmdir()
    from_folder = load_dataset(name, path)
    _check_equal(from_tar, fake)
    _check_equal(from_folder, fake)


@pytest.mark.parametrize("kind", ["tar", "folder"])
@pytest.mark.parametrize(
    ("holds", "asked", "title"), [("cifar10", "cifar100", "CIFAR-10"), ("cifar100", "cifar10", "CIFAR-100")]
)
def test_wrong_dataset_kind(tmp_path: Path, kind: str, holds: str, asked: str, title: str) -> None:
    fake = _fake(holds)
    path = write_tar(tmp_path / fake.archive, fake.files()) if kind == "tar" else write_folder(tmp_path, fake.files())
    with pytest.raises(DataError, match=f"holds {title},"):
        load_dataset(asked, path)
    if kind == "folder":
        with pytest.raises(DataError, match=f"holds {title},"):
            load_dataset(asked, path / fake.base)


def test_truncated_archive(cifar10_archive: Path) -> None:
    blob = cifar10_archive.read_bytes()
    for cut in (len(blob) // 2, len(blob) - 10, 100, 0):
        cifar10_archive.write_bytes(blob[:cut])
        with pytest.raises(DataError, match=str(cifar10_archive)):
            load_dataset("cifar10", cifar10_archive)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_corrupt_bytes(cifar10_archive: Path, where: float) -> None:
    blob = bytearray(cifar10_archive.read_bytes())
    offset = int(len(blob) * where)
    blob[offset : offset + 16] = bytes(16)
    cifar10_archive.write_bytes(bytes(blob))
    # Random pixels don't compress, so gzip stores them verbatim: zeroed pixel bytes still decompress and unpickle,
    # and only gzip's CRC, checked once the whole stream is read, catches them.
    with pytest.raises(DataError, match="CRC check failed" if where == 0.5 else str(cifar10_archive)):
        load_dataset("cifar10", cifar10_archive)


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(DataError, match="not a readable CIFAR-10 archive"):
        load_dataset("cifar10", path)


@pytest.mark.parametrize("kind", ["tar", "folder"])
@pytest.mark.parametrize("member", ["data_batch_3", "test_batch", "batches.meta"])
def test_missing_member(tmp_path: Path, fake_cifar10: FakeCifar, kind: str, member: str) -> None:
    files = fake_cifar10.files()
    del files[f"{fake_cifar10.base}/{member}"]
    path = write_tar(tmp_path / "c.tar.gz", files) if kind == "tar" else write_folder(tmp_path / "d", files)
    with pytest.raises(DataError, match=f"lacks cifar-10-batches-py/{member}"):
        load_dataset("cifar10", path)


def _with_batch(tmp_path: Path, fake: FakeCifar, member: str, **changes: object) -> Path:
    obj = dict(fake.objects[member])
    obj.update({k.encode(): v for k, v in changes.items()})
    files = fake.files()
    files[f"{fake.base}/{member}"] = py2_pickle(obj)
    return write_tar(tmp_path / "c.tar.gz", files)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((20, 3073), np.uint8),
        np.zeros((20, 3, 32, 32), np.uint8),
        np.zeros((20, 3072), np.int16),
        np.zeros(3072, np.uint8),
        [[0] * 3072] * 20,
        None,
    ],
    ids=["3073", "4d", "int16", "1d", "list", "none"],
)
def test_wrong_data_shape_or_dtype(tmp_path: Path, fake_cifar10: FakeCifar, bad: object) -> None:
    with pytest.raises(DataError, match="data_batch_2: b'data' must be a uint8 \\(n, 3072\\) array"):
        load_dataset("cifar10", _with_batch(tmp_path, fake_cifar10, "data_batch_2", data=bad))


@pytest.mark.parametrize(
    ("name", "labels", "match"),
    [
        ("cifar10", [10] + [0] * 19, "labels must lie in 0..9, found 0..10"),
        ("cifar10", [-1] + [0] * 19, "labels must lie in 0..9"),
        ("cifar100", [100] + [0] * 99, "labels must lie in 0..99, found 0..100"),
        ("cifar10", [0] * 19, "must hold 20 integer labels"),
        ("cifar10", [0.0] * 20, "must hold 20 integer labels"),
        ("cifar10", [b"cat"] * 20, "must hold 20 integer labels"),
        ("cifar10", [[0], [0, 1]] * 10, "must hold 20 integer labels"),
    ],
)
def test_bad_labels(tmp_path: Path, name: str, labels: list, match: str) -> None:
    fake = _fake(name)
    member, key = ("data_batch_4", "labels") if name == "cifar10" else ("train", "fine_labels")
    with pytest.raises(DataError, match=match):
        load_dataset(name, _with_batch(tmp_path, fake, member, **{key: labels}))


@pytest.mark.parametrize("names", [[b"a"] * 9, [b"a"] * 11, None, [1] * 10])
def test_bad_class_names(tmp_path: Path, fake_cifar10: FakeCifar, names: object) -> None:
    with pytest.raises(DataError, match="must list 10 class names"):
        load_dataset("cifar10", _with_batch(tmp_path, fake_cifar10, "batches.meta", label_names=names))


@pytest.mark.parametrize(
    "payload",
    [b"", b"not a pickle", b"\x80\x02}q\x00(U", pickle.dumps([1, 2, 3], protocol=2)],
    ids=["empty", "junk", "cut", "list"],
)
def test_unreadable_or_non_dict_pickle(tmp_path: Path, fake_cifar10: FakeCifar, payload: bytes) -> None:
    files = fake_cifar10.files()
    files[f"{fake_cifar10.base}/data_batch_1"] = payload
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", write_tar(tmp_path / "c.tar.gz", files))


def test_python3_repickled_files_load(tmp_path: Path, fake_cifar10: FakeCifar) -> None:
    # Default protocol 4 from numpy 2 names numpy._core.multiarray._reconstruct and writes bytes natively.
    files = {f"{fake_cifar10.base}/{m}": pickle.dumps(o, protocol=4) for m, o in fake_cifar10.objects.items()}
    _check_equal(load_dataset("cifar10", write_tar(tmp_path / "c.tar.gz", files)), fake_cifar10)


def test_verify_md5(cifar10_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_dataset("cifar10", cifar10_archive)  # structure is enough by default
    with pytest.raises(DataError, match="not the official c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", cifar10_archive, verify_md5=True)
    folder = write_folder(cifar10_archive.parent / "extracted", make_cifar("cifar10").files())
    with pytest.raises(DataError, match="is a folder"):
        load_dataset("cifar10", folder, verify_md5=True)
    digest = hashlib.md5(cifar10_archive.read_bytes()).hexdigest()
    monkeypatch.setitem(cifar_mod._LAYOUTS, "cifar10", dataclasses.replace(cifar_mod._LAYOUTS["cifar10"], md5=digest))
    assert len(load_dataset("cifar10", cifar10_archive, verify_md5=True).train) == 100


def test_missing_path_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.tar.gz'} does not exist"):
        load_dataset("cifar10", tmp_path / "nope.tar.gz")
    with pytest.raises(DataError, match="holds neither cifar-100-python/"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(
        DataError, match="unknown dataset .mnist.; choose one of cifar10, cifar100, digits, folder, csv"
    ):
        load_dataset("mnist")
    assert DATASETS == ("cifar10", "cifar100", "digits", "folder", "csv")


def test_the_registry_has_a_row_for_each_kind_the_config_offers() -> None:
    # kinds.KINDS names the kinds for the config (--dataset's choices, each one's preset); the registry loads them.
    assert tuple(DATASET_KINDS) == DATASETS == tuple(KINDS)


def test_odd_members(tmp_path: Path, fake_cifar10: FakeCifar, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tar(tmp_path / "c.tar.gz", fake_cifar10.files())
    monkeypatch.setattr(cifar_mod, "_MAX_MEMBER", 1000)
    with pytest.raises(DataError, match="not a regular file under 1 GB"):
        load_dataset("cifar10", path)
    monkeypatch.undo()
    with tarfile.open(tmp_path / "l.tar.gz", "w:gz") as tar:
        for name, blob in fake_cifar10.files().items():
            info = tarfile.TarInfo(name)
            if name.endswith("test_batch"):
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.size = len(blob)
            tar.addfile(info, None if info.issym() else io.BytesIO(blob))
    with pytest.raises(DataError, match="test_batch is not a regular file"):
        load_dataset("cifar10", tmp_path / "l.tar.gz")


# --- hostile pickles -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOSTILE_KINDS)
def test_hostile_pickle_is_armed(tmp_path: Path, how: str) -> None:
    # Proves the refusal tests below are meaningful: plain pickle really runs the payload.
    target = tmp_path / "pwned"
    pickle.loads(hostile_pickle(target, how), encoding="bytes")
    assert target.exists()


@pytest.mark.parametrize("kind", ["tar", "folder"])
@pytest.mark.parametrize("how", HOSTILE_KINDS)
def test_hostile_pickle_is_refused(tmp_path: Path, fake_cifar10: FakeCifar, kind: str, how: str) -> None:
    target = tmp_path / "pwned"
    files = fake_cifar10.files()
    files[f"{fake_cifar10.base}/data_batch_2"] = hostile_pickle(target, how)
    path = write_tar(tmp_path / "c.tar.gz", files) if kind == "tar" else write_folder(tmp_path / "d", files)
    with pytest.raises(DataError, match="data_batch_2: refusing pickled .*may be hostile"):
        load_dataset("cifar10", path)
    assert not target.exists()


def test_array_larger_than_its_file_is_refused(tmp_path: Path, fake_cifar10: FakeCifar) -> None:
    class Uninitialised:  # numpy.ndarray(shape, dtype) called directly: 30 MB from a few bytes
        def __reduce__(self) -> tuple:
            return np.ndarray, ((10_000, 3072), np.dtype("u1"))

    files = fake_cifar10.files()
    files[f"{fake_cifar10.base}/test_batch"] = pickle.dumps({b"data": Uninitialised(), b"labels": [0] * 10_000})
    with pytest.raises(DataError, match="claims more array data than it holds"):
        load_dataset("cifar10", write_tar(tmp_path / "c.tar.gz", files))


# --- cache dir and download ------------------------------------------------------------------------------------------


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GMLP_DATA", str(tmp_path / "g"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "g"
    monkeypatch.delenv("GMLP_DATA")
    assert default_cache_dir() == tmp_path / "x" / "gmlp-vision"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert default_cache_dir() == tmp_path / "h" / ".cache" / "gmlp-vision"


def test_cache_dir_archive_is_used_without_download(tmp_path: Path, fake_cifar100: FakeCifar) -> None:
    write_tar(tmp_path / fake_cifar100.archive, fake_cifar100.files())
    _check_equal(load_dataset("cifar100", cache_dir=tmp_path, download=False), fake_cifar100)
    with pytest.raises(DataError, match=f"{tmp_path / 'cifar-10-python.tar.gz'} not found.*--data PATH"):
        load_dataset("cifar10", cache_dir=tmp_path, download=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    payload = b""
    release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def handle_error(self, request: object, client_address: object) -> None:  # clients hang up on purpose
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = self.server.payload
        if self.path == "/missing":
            self.send_error(404)
            return
        if self.path == "/stall-headers":
            self.server.release.wait(10)
        self.send_response(200)
        self.send_header("Content-Length", str(2 * len(body) if self.path == "/short" else len(body)))
        self.end_headers()
        if self.path == "/stall-body":
            self.wfile.write(body[:100])
            self.wfile.flush()
            self.server.release.wait(10)
        self.wfile.write(body[: len(body) // 2] if self.path == "/short" else body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    """A local HTTP server on 127.0.0.1 (never the internet) that serves ``payload`` well or badly by path."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.payload, httpd.release = os.urandom(300_000), threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_good(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "file.tar.gz"
    assert download(f"{server.url}/good", dest, hashlib.md5(server.payload).hexdigest(), progress=False) == dest
    assert dest.read_bytes() == server.payload
    assert [p.name for p in dest.parent.iterdir()] == ["file.tar.gz"]


@pytest.mark.parametrize(
    ("route", "md5", "match"),
    [
        ("good", "0" * 32, "has md5 .*, not 00000000000000000000000000000000"),
        ("short", None, "stopped after 150000 of 600000 bytes|IncompleteRead"),
        ("stall-body", None, "timed out"),
        ("stall-headers", None, "timed out"),
        ("missing", None, "HTTP Error 404"),
    ],
)
def test_download_failures_leave_nothing(
    server: _Server, tmp_path: Path, route: str, md5: str | None, match: str
) -> None:
    md5 = md5 or hashlib.md5(server.payload).hexdigest()
    cache = tmp_path / "cache"
    start = time.monotonic()
    with pytest.raises(DataError, match=match) as err:
        download(f"{server.url}/{route}", cache / "file.tar.gz", md5, timeout=0.5, progress=False)
    assert time.monotonic() - start < 3
    assert "--data PATH" in str(err.value) and "\n" not in str(err.value)
    assert list(cache.iterdir()) == []


def test_download_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was just free, so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "cache" / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match=f"cannot download .*--data PATH or put cifar-10-python.tar.gz at {dest}"):
        download(f"http://127.0.0.1:{port}/x", dest, "0" * 32, timeout=2, progress=False)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_load_dataset_downloads_into_cache(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake("cifar10")
    blob = server.payload = write_tar(tmp_path / "served.tar.gz", fake.files()).read_bytes()
    layout = dataclasses.replace(cifar_mod._LAYOUTS["cifar10"], md5=hashlib.md5(blob).hexdigest())
    monkeypatch.setitem(cifar_mod._LAYOUTS, "cifar10", layout)
    monkeypatch.setattr(cifar_mod, "_URL", f"{server.url}/good?")
    cache = tmp_path / "cache"
    _check_equal(load_dataset("cifar10", cache_dir=cache, progress=False), fake)
    assert (cache / "cifar-10-python.tar.gz").read_bytes() == blob
    assert [p.name for p in cache.iterdir()] == ["cifar-10-python.tar.gz"]


# --- digits ----------------------------------------------------------------------------------------------------------


def _digits_rows() -> list[list[int]]:
    with gzip.open(digits_mod.DIGITS_FILE, "rt") as f:
        return [[int(float(v)) for v in row] for row in csv.reader(f)]


def test_digits() -> None:
    rows = _digits_rows()
    ds = load_dataset("digits")
    assert (ds.name, ds.classes, ds.num_classes) == ("digits", tuple("0123456789"), 10)
    assert (ds.image_size, ds.in_chans) == (8, 1)
    assert len(ds.train) + len(ds.test) == len(rows) == 1797
    scale = [round(v * 255 / 16) for v in range(17)]
    train, test = [], []
    for c in range(10):  # the documented rule: the 5th, 10th, 15th, ... sample of each class (file order) is test
        for pos, i in enumerate(i for i, row in enumerate(rows) if row[64] == c):
            (test if pos % 5 == 4 else train).append(i)
    for split, idx in ((ds.train, sorted(train)), (ds.test, sorted(test))):
        assert split.images.shape == (len(idx), 1, 8, 8) and split.images.dtype == torch.uint8
        assert split.images.is_contiguous() and split.labels.dtype == torch.int64
        expected = np.array([[scale[v] for v in rows[i][:64]] for i in idx], np.uint8).reshape(-1, 1, 8, 8)
        np.testing.assert_array_equal(split.images.numpy(), expected)
        assert split.labels.tolist() == [rows[i][64] for i in idx]
    counts, test_counts = np.bincount([r[64] for r in rows]), np.bincount(ds.test.labels.numpy())
    np.testing.assert_array_equal(test_counts, counts // 5)
    assert int(ds.train.images.max()) == 255 and int(ds.train.images.min()) == 0 and scale[8] == 128
    again = load_dataset("digits")
    assert torch.equal(again.train.images, ds.train.images) and torch.equal(again.test.labels, ds.test.labels)


# The packaged file: byte for byte scikit-learn 1.9.1's sklearn/datasets/data/digits.csv.gz, and the splits made from
# it (checked equal to sklearn.datasets.load_digits() when the file was added).
DIGITS_FILE_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
DIGITS_SPLITS_SHA256 = "3baeb8053ef4be8b3373d48b5836a8071b23b35e392d6068b06c37e50f02811d"
DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_packaged_without_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    for blocked in ("sklearn", "scipy"):  # None in sys.modules makes any import of them raise ImportError
        monkeypatch.setitem(sys.modules, blocked, None)
    ds = load_dataset("digits")
    assert hashlib.sha256(digits_mod.DIGITS_FILE.read_bytes()).hexdigest() == DIGITS_FILE_SHA256
    assert (len(ds.train), len(ds.test)) == (1442, 355)
    for split in (ds.train, ds.test):
        assert split.images.shape[1:] == (1, 8, 8) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
    counts = np.bincount(np.concatenate([ds.train.labels.numpy(), ds.test.labels.numpy()]))
    assert counts.tolist() == DIGITS_CLASS_COUNTS and sum(DIGITS_CLASS_COUNTS) == 1797
    digest = hashlib.sha256()
    for split in (ds.train, ds.test):
        digest.update(split.images.numpy().tobytes())
        digest.update(split.labels.numpy().tobytes())
    assert digest.hexdigest() == DIGITS_SPLITS_SHA256
    note = (digits_mod.DIGITS_FILE.parent / "digits-LICENSE.txt").read_text()
    for term in ("Alpaydin", "Kaynak", "10.24432/C50P49", "CC BY 4.0", "BSD 3-Clause", DIGITS_FILE_SHA256):
        assert term in note


def test_digits_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "digits.csv"
    bad.write_text("1,2,3\n")
    with pytest.raises(DataError, match="64 integer pixels"):
        load_dataset("digits", bad)
    with pytest.raises(DataError, match="not a readable digits CSV"):
        load_dataset("digits", tmp_path / "missing.csv.gz")


# --- real data -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_cifar10() -> None:
    if not REAL_CIFAR10.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{REAL_CIFAR10} is missing in CI")
        pytest.skip(f"{REAL_CIFAR10} not present")
    ds = load_dataset("cifar10", REAL_CIFAR10, download=False)
    assert ds.train.images.shape == (50_000, 3, 32, 32) and ds.test.images.shape == (10_000, 3, 32, 32)
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck" and ds.num_classes == 10
    assert ds.train.labels.bincount().tolist() == [5000] * 10 and ds.test.labels.bincount().tolist() == [1000] * 10
    assert ds.train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # the official first labels
