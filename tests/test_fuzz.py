"""Property-based fuzzing: random, truncated and bit-flipped files thrown at every loader.

Each must either load correct data or raise the library's own error (a `GmlpError`); nothing else may escape.
Bounded for CI (``GMLP_FUZZ_EXAMPLES``, default 60 per property); ``pytest -m fuzz_long`` runs 2,000 per property.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archives import make_cifar, py2_pickle, write_folder, write_tar
from gmlp_vision.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from gmlp_vision.config import from_preset
from gmlp_vision.data import load_dataset
from gmlp_vision.errors import CheckpointError, DataError, GmlpError, ImageError
from gmlp_vision.images import load_image
from gmlp_vision.model import GMLP

EXAMPLES = int(os.environ.get("GMLP_FUZZ_EXAMPLES", "60"))
common = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
long = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` truncated, with flipped bits, with a random span overwritten, or replaced by random bytes."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "random"]))
    out = bytearray(data)
    if kind == "truncate":
        return bytes(out[: draw(st.integers(0, len(out) - 1))])
    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, len(out) * 8 - 1), min_size=1, max_size=8)):
            out[pos // 8] ^= 1 << (pos % 8)
        return bytes(out)
    if kind == "overwrite":
        start = draw(st.integers(0, len(out) - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        out[start : start + len(junk)] = junk
        return bytes(out)
    return draw(st.binary(max_size=4096))


def _checkpoint_bytes() -> tuple[bytes, dict[str, torch.Tensor]]:
    cfg = from_preset("tiny", num_classes=3, depth=1, embed_dim=8, ffn_dim=8, image_size=8, patch_size=4)
    state = GMLP(cfg.model).state_dict()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.pt"
        save_checkpoint(path, Checkpoint(cfg, state, ("a", "b", "c"), 1, 2, {"loss": 1.0}))
        return path.read_bytes(), state


CKPT, CKPT_STATE = _checkpoint_bytes()
FAKE = make_cifar("cifar10", per_batch=4, n_test=4)


def _archive_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return write_tar(Path(d) / FAKE.archive, FAKE.files()).read_bytes()


ARCHIVE = _archive_bytes()
BATCH = FAKE.files()[f"{FAKE.base}/data_batch_1"]


def check_checkpoint(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.pt"
        path.write_bytes(blob)
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError:
            return
        assert ckpt.model_state.keys() == CKPT_STATE.keys()
        assert all(torch.equal(ckpt.model_state[k], CKPT_STATE[k]) for k in CKPT_STATE)


def check_archive(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / FAKE.archive
        path.write_bytes(blob)
        try:
            ds = load_dataset("cifar10", path, download=False)
        except DataError:
            return
        assert np.array_equal(ds.train.images.numpy(), FAKE.train_images)
        assert np.array_equal(ds.train.labels.numpy(), FAKE.train_labels)


def check_pickle(blob: bytes) -> None:
    """A raw pickle has no checksum: a flipped pixel byte loads as another pixel. It must still be well-formed."""
    with tempfile.TemporaryDirectory() as d:
        files = dict(FAKE.files())
        files[f"{FAKE.base}/data_batch_1"] = blob
        root = write_folder(Path(d), files)
        try:
            ds = load_dataset("cifar10", root, download=False)
        except DataError:
            return
        assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape[1:] == (3, 32, 32)
        assert int(ds.train.labels.min()) >= 0 and int(ds.train.labels.max()) < 10


def _image_bytes(fmt: str) -> tuple[bytes, torch.Tensor]:
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x.{fmt}"
        image.save(path)
        return path.read_bytes(), load_image(path)


IMAGES = {fmt: _image_bytes(fmt) for fmt in ("png", "jpg")}


def check_image(blob: bytes, fmt: str) -> None:
    """A damaged image decodes (JPEG has no checksum: then to a well-formed tensor) or raises ImageError."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x.{fmt}"
        path.write_bytes(blob)
        try:
            img = load_image(path)
        except ImageError:
            return
        assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3
        if fmt == "png":  # PNG chunks carry CRCs: what decodes is the original
            assert torch.equal(img, IMAGES[fmt][1])


@common
@given(st.sampled_from(sorted(IMAGES)).flatmap(lambda fmt: st.tuples(st.just(fmt), damaged(IMAGES[fmt][0]))))
def test_damaged_images_decode_well_formed_or_raise_image_error(case):
    fmt, blob = case
    check_image(blob, fmt)


@pytest.mark.fuzz_long
@long
@given(st.sampled_from(sorted(IMAGES)).flatmap(lambda fmt: st.tuples(st.just(fmt), damaged(IMAGES[fmt][0]))))
def test_long_images(case):
    check_image(case[1], case[0])


@common
@given(damaged(CKPT))
def test_damaged_checkpoints_load_exactly_or_raise_checkpoint_error(blob):
    check_checkpoint(blob)


@common
@given(damaged(ARCHIVE))
def test_damaged_archives_load_exactly_or_raise_data_error(blob):
    check_archive(blob)


@common
@given(damaged(BATCH))
def test_damaged_pickles_load_well_formed_or_raise_data_error(blob):
    check_pickle(blob)


@common
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.binary(max_size=16) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.binary(max_size=8), c, max_size=4),
                    max_leaves=12))  # fmt: skip
def test_arbitrary_pickled_structures_are_refused_cleanly(obj):
    check_pickle(py2_pickle(obj))


def test_the_fuzzers_start_from_valid_files():
    check_checkpoint(CKPT)
    check_archive(ARCHIVE)
    for fmt, (blob, _) in IMAGES.items():
        check_image(blob, fmt)
    assert issubclass(CheckpointError, GmlpError) and issubclass(DataError, GmlpError)


@pytest.mark.fuzz_long
@long
@given(damaged(CKPT))
def test_long_checkpoints(blob):
    check_checkpoint(blob)


@pytest.mark.fuzz_long
@long
@given(damaged(ARCHIVE))
def test_long_archives(blob):
    check_archive(blob)


@pytest.mark.fuzz_long
@long
@given(damaged(BATCH))
def test_long_pickles(blob):
    check_pickle(blob)
