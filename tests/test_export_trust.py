"""Issue 21, "trust nothing you load": hostile export folders, ONNX graphs and names, via `gmlp predict` and the API.

Every case must end in one line on stderr and exit code 1 (a `CheckpointError`), with no traceback, no hang, no huge
allocation, and nothing written; names from a file (classes, paths) are shown escaped on the terminal and in the model
card. The hypothesis fuzz of an export folder (config.json and model.safetensors mutated) runs ``GMLP_FUZZ_EXAMPLES``
examples (default 60) per property; ``pytest -m fuzz_long`` runs 2,000.
"""

import contextlib
import json
import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save as safetensors_bytes

from gmlp_vision.artifacts import load_export, read_export_config
from gmlp_vision.card import model_card
from gmlp_vision.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.errors import CheckpointError, printable
from gmlp_vision.export import export_safetensors
from gmlp_vision.hub import ExportConfig, hub_config
from gmlp_vision.model import GMLP
from gmlp_vision.predict import Classifier

EXAMPLES = int(os.environ.get("GMLP_FUZZ_EXAMPLES", "60"))
common = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
long = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))

CFG = from_preset(
    "tiny", dataset="digits", in_chans=1, num_classes=10, image_size=8, patch_size=4, depth=1, embed_dim=8, ffn_dim=8
)
CLASSES = tuple("0123456789")
HOSTILE = (
    "\x1b[2J\x1b[31mred",
    "cat\nfake.png: dog 100.0%",
    "<script>alert(1)</script>",
    "a|b",
    "*bold* [x](y)",
    "tick`s",
    "```",
    "\u202eevil",
    "\r\x85\u2028end",
    "",
)


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """Fail instead of hanging (a FIFO read that blocks forever)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def predict_fails(capfd, model: Path, image: Path, *extra: str) -> str:
    """``gmlp predict`` exits 1 with one line on stderr (onnxruntime's own log included), writes nothing; the line."""
    folder = model.parent
    before = listing(folder)
    with deadline():
        code = main(["predict", str(model), str(image), *extra])
    out, err = capfd.readouterr()
    assert code == 1, (code, out, err)
    assert out == "" and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("gmlp: error: ") and err.endswith("\n") and err[:-1].isprintable(), err
    assert len(err) < 700, err
    assert listing(folder) == before
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, Checkpoint(CFG, GMLP(CFG.model).state_dict(), CLASSES, 1, 1, {"loss": 1.0}))
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "images" / "x.png"
    path.parent.mkdir()
    Image.new("L", (8, 8), 120).save(path)
    return path


@pytest.fixture
def export(checkpoint, tmp_path) -> Path:
    """A valid safetensors export folder of the tiny checkpoint."""
    export_safetensors(checkpoint, tmp_path / "st")
    return tmp_path / "st"


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


# 1. Export folders: files that are not regular files, too large, too deep, or hold the wrong types.


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_device_or_a_fifo_in_an_export_folder_is_refused_at_once(export, image, capfd, name):
    (export / name).unlink()
    (export / name).symlink_to("/dev/zero")
    assert f"{name} is not a regular file (a device)" in predict_fails(capfd, export, image)
    (export / name).unlink()
    os.mkfifo(export / name)
    assert f"{name} is not a regular file (a FIFO)" in predict_fails(capfd, export, image)


def test_a_huge_or_deep_config_json_is_refused(export, image, capfd):
    with open(export / "config.json", "r+b") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB on paper, nothing on disk
    assert "config.json is larger than 16 MiB" in predict_fails(capfd, export, image)
    (export / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "config.json nests JSON deeper than 32 levels" in predict_fails(capfd, export, image)
    (export / "config.json").write_text("[" * 100 + "]" * 100)  # parses, but deeper than any config
    assert "nests JSON deeper than 32 levels" in predict_fails(capfd, export, image)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["gmlp_vision"].update(precision="fp64"), "precision must be one of fp32, bf16, fp16, got 'fp64'"),
        (lambda c: c["gmlp_vision"].update(precision=["fp32"]), "precision must be one of"),
        (lambda c: c.update(label_names={"0": "a"}), "class names must be a non-empty list of strings, got a JSON"),
        (lambda c: c.update(label_names="0123456789"), "class names must be a non-empty list of strings, got '0123"),
        (lambda c: c.update(label_names=[0, 1]), "class names must be strings, got 0"),
        (lambda c: c.update(label_names=["a", "b"]), "2 class names for a model with 10 outputs"),
        (lambda c: c["model_args"].update(image_size=10**300), "--image-size must be at most"),
        (lambda c: c["model_args"].update(evil=1), "unknown model argument 'evil'"),
        (lambda c: c.pop("model_args"), "model_args must be a JSON object, got nothing"),
        (lambda c: c["pretrained_cfg"].update(crop_pct=float("nan")), "crop_pct must be a number in (0, 1], got nan"),
        (lambda c: c["pretrained_cfg"].update(crop_pct=10**300), "crop_pct must be a number in (0, 1], got 1000"),
        (lambda c: c["pretrained_cfg"].update(crop_mode=[1]), "crop_mode must be one of center, squash"),
    ],
)
def test_invalid_config_values_are_one_short_line(export, image, capfd, change, message):
    edit_config(export, change)
    err = predict_fails(capfd, export, image)
    assert "is not a valid gmlp-vision export config" in err and message in err, err
    assert len(err) < 300, err  # a 300-digit number is shortened


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.float64, torch.bool])
def test_weights_of_another_dtype_are_refused_not_cast(export, image, capfd, dtype):
    weights = export / "model.safetensors"
    state = {k: v.to(dtype) if k == "head.weight" else v for k, v in load_export(export)[0].state_dict().items()}
    weights.write_bytes(safetensors_bytes(state))
    name = str(dtype).removeprefix("torch.")
    assert f"model.safetensors holds head.weight as {name}; gmlp-vision weights are all float32" in predict_fails(
        capfd, export, image
    )


def test_a_tensor_name_from_the_file_is_shown_escaped(export):
    state = dict(load_export(export)[0].state_dict())
    state["evil\nname"] = torch.zeros(1)
    (export / "model.safetensors").write_bytes(safetensors_bytes(state))
    with pytest.raises(CheckpointError, match=r"a tensor named 'evil\\nname'") as error:
        load_export(export)
    assert "\n" not in str(error.value)


def test_a_run_directorys_results_json_is_read_safely(checkpoint, tmp_path, image, capfd):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(checkpoint.read_bytes())
    os.mkfifo(run / "results.json")
    assert "results.json is not a regular file (a FIFO)" in predict_fails(capfd, run, image)
    (run / "results.json").unlink()
    (run / "results.json").write_text(json.dumps({"final_checkpoint": "../tiny.pt"}))
    assert "results.json names no checkpoint file of the run: final_checkpoint '../tiny.pt'" in predict_fails(
        capfd, run, image
    )
    (run / "results.json").write_text(json.dumps({"final_checkpoint": "best.pt"}))
    assert resolve_checkpoint(run) == run / "best.pt"
    with deadline():
        assert main(["predict", str(run), str(image)]) == 0


# 2. ONNX graphs whose shapes, metadata or behaviour do not match what gmlp export writes.


def onnx_graph(
    path: Path,
    *,
    width: int | str = 10,
    in_shape: tuple = ("batch", 1, 8, 8),
    input_name: str = "pixels",
    meta: dict | None = None,
    extra_node: str | None = None,
) -> Path:
    """A tiny graph: logits = the pixels' mean @ (C, width) weights falling with the class, and gmlp metadata."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    chans = in_shape[1] if isinstance(in_shape[1], int) else 1
    out_width = width if isinstance(width, int) else 10
    pixels = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(in_shape))
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [in_shape[0], width])
    weights = np.tile(-np.arange(out_width, dtype=np.float32) / 1000, (chans, 1))  # class 0 first, then 1...
    inits = [numpy_helper.from_array(weights, "w")]
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["z"]),
    ]
    if extra_node == "huge":  # a 200,000 x 200,000 float tensor: 160 GB
        inits.append(numpy_helper.from_array(np.array([200_000, 200_000], np.int64), "shape"))
        fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        nodes += [
            helper.make_node("ConstantOfShape", ["shape"], ["huge"], value=fill),
            helper.make_node("ReduceSum", ["huge"], ["s"], keepdims=0),
            helper.make_node("Add", ["z", "s"], ["logits"]),
        ]
    elif extra_node == "nan":
        nodes += [
            helper.make_node("Log", ["z"], ["lz"]),
            helper.make_node("Neg", ["lz"], ["nz"]),
            helper.make_node("Log", ["nz"], ["logits"]),
        ]  # log(-log(z)) of z <= 0: infinite or NaN
    elif extra_node == "flatten":  # (B, C * H * W): a width onnxruntime cannot know before it runs
        nodes = [helper.make_node("Flatten", [input_name], ["logits"], axis=1)]
    else:
        nodes.append(helper.make_node("Identity", ["z"], ["logits"]))
    model = helper.make_model(
        helper.make_graph(nodes, "g", [pixels], [logits], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    defaults = {"classes": json.dumps([f"c{i}" for i in range(10)]), "image_size": "8", "in_chans": "1"}
    for key, value in {**defaults, **(meta or {})}.items():
        if value is not None:
            model.metadata_props.add(key=key, value=value)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_a_valid_hand_made_graph_classifies(tmp_path, image, capfd):
    path = onnx_graph(tmp_path / "ok" / "m.onnx")
    assert main(["predict", str(path), str(image), "--top-k", "2"]) == 0
    out = capfd.readouterr().out
    assert out.startswith(f"{image}: c0 ") and ", c1 " in out and out.count("%") == 2
    fixed = onnx_graph(tmp_path / "fixed" / "m.onnx", in_shape=(1, 1, 8, 8))  # one image per run: batches padded
    images = [image.with_name(f"{i}.png") for i in range(3)]
    for path in images:
        path.write_bytes(image.read_bytes())
    assert main(["predict", str(fixed), *map(str, images), "--json", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == ["c0"] * 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": 3}, "its output 'logits' is float32 (?, 3); 10 classes of 1 x 8 x 8 images need float32 (B, 10)"),
        ({"width": 10, "meta": {"classes": '["a", "b"]'}}, "its output 'logits' is float32 (?, 10); 2 classes"),
        ({"meta": {"image_size": "16"}}, "its input 'pixels' is float32 (?, 1, 8, 8); 10 classes of 1 x 16 x 16"),
        ({"meta": {"in_chans": "3"}}, "its input 'pixels' is float32 (?, 1, 8, 8); 10 classes of 3 x 8 x 8"),
        ({"input_name": "image"}, "must take one input, 'pixels', not 'image'"),
        ({"in_shape": (0, 1, 8, 8)}, "its input 'pixels' is float32 (0, 1, 8, 8)"),
    ],
)
def test_a_graph_that_does_not_match_its_metadata_is_refused_before_it_runs(tmp_path, image, capfd, options, message):
    err = predict_fails(capfd, onnx_graph(tmp_path / "bad" / "m.onnx", **options), image)
    assert message in err, err


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"classes": '{"0": "a"}'}, "the class names must be a non-empty list of strings, got a JSON object"),
        ({"classes": '"abcdefghij"'}, "the class names must be a non-empty list of strings, got 'abcdefghij'"),
        ({"classes": "[]"}, "got an empty list"),
        ({"classes": "[1, 2]"}, "the class names must be strings, got 1"),
        ({"classes": "not json"}, "the class names are not JSON"),
        ({"classes": "[" * 100_000}, "the class names are nested too deeply"),
        ({"image_size": "0"}, "image_size must be an integer in 1..16,384, got '0'"),
        ({"image_size": "-8"}, "image_size must be an integer in 1..16,384, got '-8'"),
        ({"image_size": "9" * 300}, "image_size must be an integer in 1..16,384, got '99999"),
        ({"in_chans": "1e3"}, "in_chans must be an integer in 1..64, got '1e3'"),
        ({"resize": "stretch"}, "resize must be one of crop, squash, got 'stretch'"),
        ({"crop_pct": "nan"}, "crop_pct must be a number in (0, 1], got nan"),
        ({"crop_pct": "lots"}, "crop_pct must be a number in (0, 1], got 'lots'"),
        ({"classes": None}, "has no gmlp export metadata (no 'classes')"),
    ],
)
def test_invalid_onnx_metadata_is_one_short_line(tmp_path, image, capfd, meta, message):
    err = predict_fails(capfd, onnx_graph(tmp_path / "bad" / "m.onnx", meta=meta), image)
    assert message in err and len(err) < 300, err


def test_a_graph_that_fails_when_it_runs_is_one_line(tmp_path, image, capfd):
    err = predict_fails(capfd, onnx_graph(tmp_path / "huge" / "m.onnx", extra_node="huge"), image)
    assert "m.onnx failed in onnxruntime: " in err and "ConstantOfShape" in err, err
    err = predict_fails(capfd, onnx_graph(tmp_path / "nan" / "m.onnx", extra_node="nan"), image)
    assert "m.onnx gave NaN or infinite logits" in err
    flat = onnx_graph(tmp_path / "open" / "m.onnx", width="n", in_shape=("b", 1, "h", "w"), extra_node="flatten")
    assert "m.onnx gave logits of shape (1, 64) for 1 images of 10 classes" in predict_fails(capfd, flat, image)


def test_onnx_files_that_are_not_regular_or_keep_external_weights_are_refused(tmp_path, image, capfd):
    onnx = pytest.importorskip("onnx")
    path = onnx_graph(tmp_path / "ext" / "m.onnx")
    model = onnx.load(str(path))
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        size_threshold=0,
        location="weights.bin",
    )
    assert "m.onnx keeps weights in external files" in predict_fails(capfd, path, image)
    zero = tmp_path / "dev" / "m.onnx"
    zero.parent.mkdir()
    zero.symlink_to("/dev/zero")
    assert "m.onnx is not a regular file (a device)" in predict_fails(capfd, zero, image)
    os.mkfifo(tmp_path / "dev" / "model.onnx")
    assert "model.onnx is not a regular file (a FIFO)" in predict_fails(capfd, tmp_path / "dev", image)


# 3. Names from a file, shown to people: escaped on the terminal and in the model card.


def hostile_export(export: Path) -> None:
    edit_config(export, lambda c: c.update(label_names=list(HOSTILE)))


def test_hostile_class_and_file_names_cannot_fake_output_lines(export, tmp_path, capfd):
    hostile_export(export)
    images = tmp_path / "evil\nname\x1b[0m"
    images.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(images / f"{i}\r.png")
    assert main(["predict", str(export), str(images), "--top-k", "10"]) == 0
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and err == "" and all(line.isprintable() for line in lines), out
    assert lines[0].startswith(printable(images / "0\r.png") + ": ")
    for name in HOSTILE:
        assert printable(name) in lines[0]
    assert "\\x1b[2J\\x1b[31mred" in out and "cat\\nfake.png: dog 100.0%" in out and "\\u202eevil" in out
    assert main(["predict", str(export), str(images), "--json", "--top-k", "10"]) == 0
    out = capfd.readouterr().out
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3 and out.isascii() and {s["name"] for s in rows[0]["top_k"]} == set(HOSTILE)
    assert rows[0]["image"] == str(images / "0\r.png")


def test_hostile_names_in_an_onnx_graph_are_escaped(tmp_path, image, capfd):
    path = onnx_graph(tmp_path / "names" / "m.onnx", meta={"classes": json.dumps(list(HOSTILE))})
    assert main(["predict", str(path), str(image), "--top-k", "3"]) == 0
    out = capfd.readouterr().out
    assert out.count("\n") == 1 and out[:-1].isprintable() and "\\x1b[2J" in out


def test_the_model_card_shows_hostile_names_literally(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config.replace(dataset="folder", data="/data/`x`<b>\nflowers|")
    ckpt = Checkpoint(cfg, ckpt.model_state, HOSTILE, 1, 1, {})
    files = ["model.safetensors", "evil|name\n<img src=x>.onnx"]
    card = model_card(checkpoint, ckpt, files)
    benign = model_card(
        checkpoint,
        Checkpoint(cfg.replace(data="/data/flowers"), ckpt.model_state, CLASSES, 1, 1, {}),
        ["model.safetensors", "other.onnx"],
    )
    assert len(card.splitlines()) == len(benign.splitlines())  # no name added a line
    assert all(line.isprintable() for line in card.splitlines())
    classes = next(line for line in card.splitlines() if line.startswith("In label order: "))
    assert "`\\x1b[2J\\x1b[31mred`" in classes and "`cat\\nfake.png: dog 100.0%`" in classes
    assert "`<script>alert(1)</script>`" in classes and "``tick`s``" in classes and "```` ``` ````" in classes
    assert "`\\u202eevil`" in classes and "`\\r\\x85\\u2028end`" in classes
    row = next(line for line in card.splitlines() if "evil" in line and line.startswith("|"))
    assert row.startswith("| `evil\\|name\\n<img src=x>.onnx` | ") and row.replace("\\|", "").count("|") == 3
    assert "# gMLP image classifier: `` `x`<b>\\nflowers| ``, 10 classes" in card
    assert 'Classifier.load("THIS_FOLDER")  # or THIS_FOLDER/evil|name\\n<img src=x>.onnx, run by onnxruntime' in card


# 4. Fuzz: an export folder with config.json or model.safetensors mutated loads, or raises CheckpointError.

STATE = GMLP(CFG.model).state_dict()
WEIGHTS = safetensors_bytes(dict(STATE))
CONFIG = hub_config(ExportConfig(CFG.model, CLASSES, "fp32", "crop", 1.0), [0.0], [1.0])
DEEP = "@@deep@@"


def key_paths(value, prefix=()) -> list[tuple]:
    """Every path to a value inside ``value`` (object keys and list indexes), the root excluded."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    return [p for k, v in items for p in [(*prefix, k), *key_paths(v, (*prefix, k))]]


PATHS = key_paths(CONFIG)
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**31, 2**63, 10**300, "", "\x1b[2J", "a" * 5000, DEEP]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def mutated_configs(draw) -> bytes:
    """config.json with 1-3 values replaced (wrong types, huge numbers, odd strings, deep nesting) or removed."""
    config = json.loads(json.dumps(CONFIG))
    changes = st.tuples(st.sampled_from(PATHS), st.booleans(), ODD_VALUES)
    for path, remove, value in draw(st.lists(changes, min_size=1, max_size=3)):
        parent = config
        try:
            for key in path[:-1]:
                parent = parent[key]
            if remove and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):  # an earlier change replaced what the path goes through
            continue
    text = json.dumps(config, allow_nan=True)
    depth = draw(st.sampled_from([2, 40, 5_000, 200_000]))
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth).encode()


@st.composite
def mutated_weights(draw) -> bytes:
    """model.safetensors truncated, with bits flipped or bytes overwritten, or with a tensor's dtype or name changed."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "dtype", "rename", "shape"]))
    data = bytearray(WEIGHTS)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind in ("flip", "overwrite"):
        header = int.from_bytes(data[:8], "little") + 8
        start = draw(st.integers(0, header + 64) | st.integers(0, len(data) - 1))  # the header is where it breaks
        if kind == "flip":
            data[start] ^= 1 << draw(st.integers(0, 7))
        else:
            junk = draw(st.binary(min_size=1, max_size=16))
            data[start : start + len(junk)] = junk
        return bytes(data)
    key = draw(st.sampled_from(sorted(STATE)))
    state = dict(STATE)
    if kind == "dtype":
        dtype = draw(
            st.sampled_from(
                [torch.int64, torch.int8, torch.uint8, torch.bool, torch.float16, torch.bfloat16, torch.float64]
            )
        )
        state[key] = state[key].to(dtype)
    elif kind == "rename":
        state[draw(st.text(min_size=1, max_size=8))] = state.pop(key)
    else:
        state[key] = state[key].reshape(-1)[:-1] if state[key].numel() > 1 else torch.zeros(2, 2)
    return safetensors_bytes(state)


def check_export(config: bytes, weights: bytes) -> None:
    """The folder loads (a model in eval mode, the classes it names) or raises a one-line `CheckpointError`."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "config.json").write_bytes(config)
        (folder / "model.safetensors").write_bytes(weights)
        try:
            classifier = Classifier.load(folder)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(e).isprintable() and len(str(e)) < 700, str(e)
            words = [w for w in str(e).replace(d, "").split() if not any(c in w for c in "./0123456789'")]
            event("refused: " + " ".join(words[:5]))  # the kind of refusal, without names and numbers
            return
        event("loaded")
        assert not classifier.model.training and len(classifier.classes) == classifier.model.cfg.num_classes
        assert read_export_config(folder).classes == classifier.classes


@common
@given(mutated_configs())
@example(json.dumps(CONFIG).encode())
def test_fuzzed_export_configs_load_or_raise_checkpoint_error(config):
    check_export(config, WEIGHTS)


@common
@given(mutated_weights())
@example(WEIGHTS)
def test_fuzzed_export_weights_load_or_raise_checkpoint_error(weights):
    check_export(json.dumps(CONFIG).encode(), weights)


@pytest.mark.fuzz_long
@long
@given(mutated_configs())
def test_long_export_configs(config):
    check_export(config, WEIGHTS)


@pytest.mark.fuzz_long
@long
@given(mutated_weights())
def test_long_export_weights(weights):
    check_export(json.dumps(CONFIG).encode(), weights)
