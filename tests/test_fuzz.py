"""Property-based fuzzing: random, truncated and bit-flipped files thrown at every loader.

Each must either load correct data or raise the library's own error (a `GmlpError`); nothing else may escape. The
same holds for fuzzed values rather than fuzzed bytes: config JSON fields, configs embedded in checkpoints with a valid
digest (refused fast, before anything is built), and tar archives flooded with junk members (refused after a bounded
number of headers). Bounded for CI (``GMLP_FUZZ_EXAMPLES``, default 60 per property); ``pytest -m fuzz_long`` runs
2,000 per property.
"""

import argparse
import dataclasses
import io
import json
import math
import os
import random
import tarfile
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from archives import make_cifar, py2_pickle, write_folder, write_tar
from gmlp_vision.checkpoint import FORMAT, VERSION, Checkpoint, content_digest, load_checkpoint, save_checkpoint
from gmlp_vision.cli.flags import config_from_args
from gmlp_vision.config import GROUP_OF, GROUPS, PRESETS, Config, DataConfig, ModelConfig, from_preset
from gmlp_vision.data import cifar as data
from gmlp_vision.data import load_dataset
from gmlp_vision.errors import CheckpointError, ConfigError, DataError, GmlpError, ImageError
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


CKPT_CONFIG = from_preset("tiny", num_classes=3, depth=1, embed_dim=8, ffn_dim=8, image_size=8, patch_size=4)


def _checkpoint_bytes() -> tuple[bytes, dict[str, torch.Tensor]]:
    state = GMLP(CKPT_CONFIG.model).state_dict()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.pt"
        save_checkpoint(path, Checkpoint(CKPT_CONFIG, state, ("a", "b", "c"), 1, 2, {"loss": 1.0}))
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


# Config JSON fields: every field of `Config` and its groups given arbitrary JSON values.

CLASSES = (Config, *GROUPS.values())
FIELDS = {f.name: f for cls in CLASSES for f in dataclasses.fields(cls) if f.name not in GROUPS or cls is DataConfig}
HINTS = {
    cls: {k: v for k, v in typing.get_type_hints(cls).items() if k in FIELDS and not (cls is Config and k in GROUPS)}
    for cls in CLASSES
}
FIELD_HINTS = {k: v for hints in HINTS.values() for k, v in hints.items()}
MODEL_NAMES = sorted(f.name for f in dataclasses.fields(ModelConfig))
RUN_NAMES = sorted(set(FIELDS) - set(MODEL_NAMES))
# Half the draws are 401-digit integers: too large for a float, and too long to quote whole in a message.
HUGE_INTS = st.sampled_from([10**400, -(10**400)]) | st.sampled_from([2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**100])
JSON_LEAVES = st.none() | st.booleans() | st.integers() | HUGE_INTS | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_LEAVES | st.text(min_size=300, max_size=320),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _plausible(name: str) -> st.SearchStrategy[Any]:
    """Values of the field's own type and range, so that some drawn configs are valid."""
    field, hint = FIELDS[name], FIELD_HINTS[name]
    if field.metadata.get("choices"):
        return st.sampled_from(field.metadata["choices"])
    if name in ("preset", "device"):
        return st.sampled_from([*PRESETS, None] if name == "preset" else ["auto", "cpu", "cuda", "cuda:1", "meta"])
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(0, 64)
    if hint is float:
        return st.floats(0.0, 1.0, exclude_max=True) | st.integers(0, 3)
    return st.none() | st.text(max_size=8)


def _edge(name: str) -> st.SearchStrategy[Any]:
    """Values of about the field's type at its edges: huge and negative integers, NaN and infinities, long text."""
    hint = FIELD_HINTS[name]
    if hint in (int, float):
        return HUGE_INTS | st.integers(-(2**70), -1) | st.floats(allow_nan=True, allow_infinity=True)
    if hint is bool:
        return st.sampled_from([0, 1, "true", "false", None])
    return st.text(min_size=300, max_size=320) | st.text(alphabet="ab\n\r", max_size=8)


def field_values(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Some of ``names``, each with a value of its own type, of about its type at the edges, or any JSON value."""
    return st.lists(st.sampled_from(names), max_size=4, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: _plausible(k) | _edge(k) | JSON_VALUES for k in keys})
    )


@st.composite
def config_values(draw: st.DrawFn) -> dict[str, Any]:
    """A config.json object: flat fields, or nested ``"model"`` (or a non-object), or each field in its group (0.2)."""
    values = draw(field_values(RUN_NAMES + MODEL_NAMES))
    if draw(st.integers(0, 9)) == 0:
        values[draw(st.text(max_size=12))] = draw(JSON_VALUES)
    if draw(st.integers(0, 3)) == 0:
        values["model"] = draw(field_values(MODEL_NAMES) | JSON_VALUES)
    elif draw(st.integers(0, 2)) == 0:
        grouped: dict[str, Any] = {k: v for k, v in values.items() if k not in GROUP_OF}  # preset, unknown keys
        for name in set(values) & set(GROUP_OF):
            grouped.setdefault(GROUP_OF[name], {})[name] = values[name]
        values = grouped
    return values


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is float:
        return type(value) is float and math.isfinite(value)
    if hint in (int, bool, str):
        return type(value) is hint  # an int field holds no bool
    if hint == str | None:
        return value is None or type(value) is str
    raise AssertionError(f"no type check for {hint}")


def check_config_types(cfg: Config) -> None:
    assert isinstance(cfg, Config) and all(isinstance(getattr(cfg, g), cls) for g, cls in GROUPS.items())
    for obj in (cfg, *(getattr(cfg, g) for g in GROUPS)):
        for name, hint in HINTS[type(obj)].items():
            assert _type_ok(getattr(obj, name), hint), f"{name} = {getattr(obj, name)!r} is not a {hint}"


def assert_one_line(error: Exception, limit: int | None = 300) -> None:
    msg = str(error)
    assert "\n" not in msg, f"{type(error).__name__} message spans lines: {msg[:400]!r}"
    assert limit is None or len(msg) <= limit, f"{type(error).__name__} message has {len(msg)} chars: {msg[:400]!r}"


def check_config(values: dict[str, Any]) -> None:
    """A config file and `Config.from_dict` give a well-typed `Config` or a one-line `ConfigError`."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.json"
        path.write_text(json.dumps(values, allow_nan=True))
        for build in (lambda: config_from_args(argparse.Namespace(config=str(path))), lambda: Config.from_dict(values)):
            try:
                cfg = build()
            except ConfigError as e:
                assert_one_line(e)
                event("refused (ConfigError)")
                continue
            check_config_types(cfg)
            event("valid Config")


@common
@given(config_values())
@example({})  # the dataset's preset, as it is
def test_fuzzed_config_fields_give_a_typed_config_or_a_one_line_config_error(values):
    check_config(values)


@pytest.mark.fuzz_long
@long
@given(config_values())
def test_long_config_fields(values):
    check_config(values)


# Checkpoint configs: the tiny checkpoint's weights under a fuzzed config, with a valid digest.

SIZE_NAMES = ("image_size", "patch_size", "embed_dim", "ffn_dim", "depth", "num_classes", "in_chans", "attn_dim")
# Small sizes; large ones that a 32-bit bound lets through (a 10**6-pixel image of patch 4 has 6.25e10 tokens: its
# spatial projection would hold 3.9e21 weights); sizes past any bound; wrong types. One tier is drawn per size, so
# that each comes up as often as the others.
SIZE_TIERS = {
    "small": st.integers(-2, 16) | st.sampled_from([24, 48, 64]),
    "large": st.sampled_from([2**16, 10**5, 10**6, 10**9, 2**31 - 1]),
    "huge": st.sampled_from([2**31, 2**32, 2**63, 2**64, 10**18, 10**400]),
    "wrong": st.none() | st.booleans() | st.floats() | st.text(max_size=4) | st.lists(st.integers(0, 8), max_size=2),
}


@st.composite
def checkpoint_configs(draw: st.DrawFn) -> str:
    """The tiny checkpoint's config JSON with some sizes (small to enormous, or wrongly typed) and run fields changed.

    Only big numbers are drawn, never big tensors: the weights stay the tiny ones, which no huge config fits.
    """
    raw = CKPT_CONFIG.to_dict()
    names = draw(st.lists(st.sampled_from(SIZE_NAMES), max_size=3, unique=True))
    raw["model"].update({n: draw(SIZE_TIERS[draw(st.sampled_from(sorted(SIZE_TIERS)))]) for n in names})
    if draw(st.integers(0, 3)) == 0:  # mostly sizes alone, so that a bad run field does not hide them
        for name, value in draw(field_values(RUN_NAMES)).items():
            (raw[GROUP_OF[name]] if name in GROUP_OF else raw)[name] = value
    return json.dumps(raw, allow_nan=True)


def check_checkpoint_config(config_json: str) -> None:
    """Refused fast with a one-line `CheckpointError`, or loaded with the original weights and a model that builds."""
    payload = {"format": FORMAT, "version": VERSION, "config": config_json, "classes": ["a", "b", "c"]}
    payload |= {"model": dict(CKPT_STATE), "epoch": 1, "step": 2, "metrics": {"loss": 1.0}, "train_state": {}}
    payload["sha256"] = content_digest(payload)  # as save_checkpoint does: only the config is wrong
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.pt"
        torch.save(payload, path)
        start = time.perf_counter()
        try:
            ckpt = load_checkpoint(path)
            model = ckpt.build_model()
        except CheckpointError as e:
            assert_one_line(e, limit=None)
            event("refused (CheckpointError)")
            return
        finally:
            assert time.perf_counter() - start < 2.0, "a checkpoint config took over 2 s to load or refuse"
        check_config_types(ckpt.config)
        for state in (ckpt.model_state, model.state_dict()):
            assert state.keys() == CKPT_STATE.keys()
            assert all(torch.equal(state[k], CKPT_STATE[k]) for k in CKPT_STATE)
        event("loaded")


@common
@given(checkpoint_configs())
@example(json.dumps(CKPT_CONFIG.to_dict()))  # the checkpoint's own config
def test_fuzzed_checkpoint_configs_are_refused_fast_or_fit_the_weights(config_json):
    check_checkpoint_config(config_json)


@pytest.mark.fuzz_long
@long
@given(checkpoint_configs())
def test_long_checkpoint_configs(config_json):
    check_checkpoint_config(config_json)


# Tar member floods: 0..3,000 junk members before, between and after the real ones.

JUNK_KINDS = ("file", "empty", "dir", "symlink", "hardlink", "long-name", "dot-slash", "in-base")
REAL_MEMBERS = 1 + len(FAKE.files())  # the folder entry and the files


@st.composite
def flooded_archives(draw: st.DrawFn) -> tuple[bytes, int]:
    """A gzipped fake CIFAR-10 tar with junk members, and the number of members a loader does not want.

    Counts are mostly small, some near `data._MAX_OTHER_MEMBERS`, some anywhere up to 3,000; the junk itself comes from
    a drawn seed (cheap to generate, though hypothesis then cannot shrink it).
    """
    bound = data._MAX_OTHER_MEMBERS
    tier = draw(st.sampled_from(["small"] * 6 + ["edge"] * 2 + ["large"] * 2))
    count = draw({"small": st.integers(0, 20), "edge": st.integers(bound - 3, bound + 2),
                  "large": st.integers(0, 3000)}[tier])  # fmt: skip
    kinds = draw(st.lists(st.sampled_from(JUNK_KINDS), min_size=1, max_size=4, unique=True))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    real = [(FAKE.base, "dir", b""), *((name, "file", blob) for name, blob in FAKE.files().items())]
    slots: list[list[tuple[str, str, bytes]]] = [[] for _ in range(len(real) + 1)]  # before, between, after
    for i in range(count):
        kind, name = rng.choice(kinds), f"x{i}-{rng.getrandbits(24):06x}"  # never a wanted member's name
        names = {"long-name": name + "y" * 120, "dot-slash": "./" + name, "in-base": f"{FAKE.base}/{name}"}
        name = names.get(kind, name)
        blob = rng.randbytes(rng.randrange(64)) if kind not in ("dir", "symlink", "hardlink", "empty") else b""
        slots[rng.randrange(len(slots))].append((name, kind, blob))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for i, slot in enumerate(slots):
            for name, kind, blob in [*slot, *real[i : i + 1]]:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(blob), 0o755 if kind == "dir" else 0o644
                if kind in ("dir", "symlink", "hardlink"):
                    info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
                    info.linkname = "" if kind == "dir" else f"{FAKE.base}/data_batch_1"
                tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue(), count + 1  # the real folder entry is not a wanted member either


def check_flooded_archive(blob: bytes, others: int) -> None:
    """Loads exactly up to `data._MAX_OTHER_MEMBERS` unwanted members; beyond, a DataError after bounded parsing."""
    bound, parsed = data._MAX_OTHER_MEMBERS, [0]
    real_next = tarfile.TarFile.next

    def counting(self: tarfile.TarFile) -> tarfile.TarInfo | None:
        info = real_next(self)
        parsed[0] += info is not None
        return info

    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        mp.setattr(tarfile.TarFile, "next", counting)
        path = Path(d) / FAKE.archive
        path.write_bytes(blob)
        try:
            ds = load_dataset("cifar10", path, download=False)
        except DataError as e:
            assert others > bound, f"{others} unwanted members (at most {bound:,d} allowed) were refused: {e}"
            assert f"more than {bound:,d} members" in str(e)
            assert_one_line(e, limit=None)
            event("refused at the member bound")
        else:
            assert others <= bound, f"{others} unwanted members (at most {bound:,d} allowed) were read"
            assert np.array_equal(ds.train.images.numpy(), FAKE.train_images)
            assert np.array_equal(ds.train.labels.numpy(), FAKE.train_labels)
            assert np.array_equal(ds.test.images.numpy(), FAKE.test_images)
            event("loaded")
        assert parsed[0] <= bound + REAL_MEMBERS + 3, f"{parsed[0]} tar headers parsed"


@common
@given(flooded_archives())
@example((ARCHIVE, 1))  # no junk: only the folder entry is not a wanted member
def test_tar_member_floods_load_exactly_or_stop_at_the_member_bound(case):
    check_flooded_archive(*case)


@pytest.mark.fuzz_long
@long
@given(flooded_archives())
def test_long_tar_member_floods(case):
    check_flooded_archive(*case)
