"""Data loading under hostile or unlucky conditions: tar header bombs, one-line errors, a full disk, bad images."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from archives import FakeCifar, write_tar
from gmlp_vision.data import cifar as data
from gmlp_vision.data import load_dataset
from gmlp_vision.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


# --- tar header bombs ------------------------------------------------------------------------------------------------


def _header_bomb(path: Path, junk: int, files: dict[str, bytes]) -> Path:
    """A gzip tar of ``junk`` empty members (512-byte headers, a few bytes each once compressed), then ``files``."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for i in range(junk):
            tar.addfile(tarfile.TarInfo(f"junk/{i}"))
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def header_count(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the headers tarfile parses (``TarFile.next``) and the most ``TarInfo``s a ``TarFile`` holds at once."""
    counts = {"parsed": 0, "held": 0}
    real = tarfile.TarFile.next

    def counting(self: tarfile.TarFile) -> tarfile.TarInfo | None:
        info = real(self)
        counts["parsed"] += info is not None
        counts["held"] = max(counts["held"], len(self.members))
        return info

    monkeypatch.setattr(tarfile.TarFile, "next", counting)
    return counts


@pytest.mark.parametrize("cifar", ["after", "absent"])
def test_a_tar_header_bomb_stops_at_a_bounded_member_count(
    tmp_path: Path, fake_cifar10: FakeCifar, header_count: dict[str, int], cifar: str
) -> None:
    # tarfile keeps every header it has parsed: 300k empty members cost 158 MB, so reading must stop early.
    files = fake_cifar10.files() if cifar == "after" else {}
    path = _header_bomb(tmp_path / fake_cifar10.archive, 20_000, files)
    with pytest.raises(DataError, match=f"more than {data._MAX_OTHER_MEMBERS:,d} members") as info:
        load_dataset("cifar10", path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert header_count["parsed"] <= data._MAX_OTHER_MEMBERS + 10
    assert header_count["held"] <= 10  # headers already looked at are dropped, not kept to the end


def test_a_few_odd_members_still_load(tmp_path: Path, fake_cifar10: FakeCifar) -> None:
    # The official archive holds a readme.html next to the batches; a re-packed copy may hold a little more.
    files = {**fake_cifar10.files(), f"{fake_cifar10.base}/readme.html": b"<html></html>"}
    path = _header_bomb(tmp_path / fake_cifar10.archive, 50, files)
    ds = load_dataset("cifar10", path)
    np.testing.assert_array_equal(ds.test.images.numpy(), fake_cifar10.test_images)


# --- one-line errors for empty or broken archives --------------------------------------------------------------------


def _damaged(kind: str, path: Path, fake: FakeCifar) -> Path:
    if kind == "empty-file":
        path.write_bytes(b"")
    elif kind == "empty-tar":
        write_tar(path, {})
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        path.write_bytes(write_tar(path, fake.files()).read_bytes()[:300])
    elif kind == "plain-tar":
        write_tar(path, {}, mode="w")
    return path


@pytest.mark.parametrize("kind", ["empty-file", "empty-tar", "garbage", "truncated", "plain-tar"])
def test_a_broken_archive_gives_a_one_line_error(tmp_path: Path, fake_cifar10: FakeCifar, kind: str) -> None:
    path = _damaged(kind, tmp_path / fake_cifar10.archive, fake_cifar10)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["empty-file", "empty-tar"])
def test_the_cli_reports_an_empty_archive_in_one_line(tmp_path: Path, fake_cifar10: FakeCifar, kind: str) -> None:
    path = _damaged(kind, tmp_path / fake_cifar10.archive, fake_cifar10)
    out = tmp_path / "run"
    argv = ["train", "--dataset", "cifar10", "--data", str(path), "--out", str(out), "--no-progress"]
    env = {**os.environ, "GMLP_DATA": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "gmlp_vision", *argv], capture_output=True, text=True, env=env,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("gmlp: error: "), done.stderr
    assert str(path) in done.stderr
    assert not out.exists() or not any(out.iterdir())  # data is loaded before the run directory is made


# --- the decoded-folder cache on a full disk -------------------------------------------------------------------------


def _folder(root: Path, per_class: int = 6) -> Path:
    """``root/train`` and ``root/val`` with two classes of small PNGs (6 per class: 72 KB decoded at 32 px)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 128, (16, 16, 3), dtype=np.uint8) + 127 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _leftovers(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file() and p.suffix != ".pt")


_TORCH_ENOSPC = (
    "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed"
)


@pytest.mark.parametrize("error", ["torch", "oserror"])
def test_a_failed_cache_write_warns_and_keeps_the_decoded_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: str
) -> None:
    root, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    real_save = torch.save

    def failing_save(obj: object, f: io.BufferedWriter, *args: object, **kwargs: object) -> None:
        f.write(b"partial data")  # a disk fills up part way through
        raise RuntimeError(_TORCH_ENOSPC) if error == "torch" else OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("folder", root, image_size=32, cache_dir=cache, progress=False)
    assert ds.train.images.shape == (12, 3, 32, 32) and len(ds.test) == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "could not cache the decoded images in" in warnings[0] and "continuing without the cache" in warnings[0]
    assert ("file write failed" if error == "torch" else "No space left") in warnings[0]
    assert _leftovers(cache) == [] and not list(cache.rglob("*.pt"))
    # The run goes on exactly as with a cache: the same tensors as a load that could write it.
    monkeypatch.setattr(torch, "save", real_save)
    again = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "cache2", progress=False)
    assert torch.equal(again.train.images, ds.train.images) and torch.equal(again.test.labels, ds.test.labels)


def test_an_interrupted_cache_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(obj: object, f: io.BufferedWriter, *args: object, **kwargs: object) -> None:
        f.write(b"partial data")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("folder", _folder(tmp_path / "data"), image_size=32, cache_dir=tmp_path / "cache", progress=False)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


@contextlib.contextmanager
def _small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                 capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs to fill up ({e}); needs root and the mount command")
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, timeout=30)


def test_a_full_disk_does_not_stop_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = _folder(tmp_path / "data")  # 24 images of 3 KB decoded: the cache does not fit in 64 KB
    with _small_tmpfs(tmp_path / "full", "64k") as disk:
        monkeypatch.setenv("GMLP_DATA", str(disk))  # the default cache dir, as the CLI uses it
        with caplog.at_level(logging.WARNING):
            ds = load_dataset("folder", root, image_size=32, progress=False)
        assert len(ds.train) == 12 and len(ds.test) == 12
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "could not cache the decoded images" in warnings[0], warnings
        assert "No space left on device" in warnings[0] and "\n" not in warnings[0]
        assert [p for p in disk.rglob("*") if p.is_file()] == []


# --- bad files met while streaming -----------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds none (a decompression-bomb probe)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("bad", ["bomb", "truncated"])
@pytest.mark.parametrize("read", ["batches", "item", "memory"])
def test_a_bad_file_names_the_skip_flag_in_every_mode(tmp_path: Path, bad: str, read: str) -> None:
    root = _folder(tmp_path / "data", per_class=2)
    blob = _png_header(9000, 9000) if bad == "bomb" else b"\x89PNG\r\n\x1a\n truncated"  # 81 Mpx: over our bound
    (root / "train" / "b" / "1.png").write_bytes(blob)
    mode = "memory" if read == "memory" else "stream"
    with pytest.raises(DataError) as info:
        ds = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "cache", progress=False,
                          folder_mode=mode, workers=0)  # fmt: skip
        files = ds.train.images
        if read == "batches":
            list(files.split(2))
        else:
            [files[i] for i in range(len(files))]
    message = str(info.value)
    assert "1.png" in message and ("decompression bomb" in message if bad == "bomb" else True)
    assert message.endswith("(pass --skip-bad-images to leave such files out)")
    assert message.count("--skip-bad-images") == 1
