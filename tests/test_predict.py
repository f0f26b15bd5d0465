"""Tests for gmlp_vision.predict and `gmlp predict`: input kinds and formats, resizing, batching, bad files."""

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmlp_vision.checkpoint import load_model
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.data import load_dataset
from gmlp_vision.errors import ImageError
from gmlp_vision.evaluate import evaluate, infer
from gmlp_vision.images import expand_inputs, load_image, resize_uint8
from gmlp_vision.predict import Classifier
from gmlp_vision.train import train

REAL_CIFAR10 = Path(__file__).parents[1].parent / "shared" / "data" / "cifar-10-python.tar.gz"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run  # read only here: the session's one tiny run


@pytest.fixture(scope="module")
def clf(run) -> Classifier:
    return Classifier.from_checkpoint(run)


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels but holds no image data (a decompression-bomb probe)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_every_input_kind_gives_the_same_logits(clf):
    pixels = rgb(32, 32)
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    kinds = [pixels, Image.fromarray(pixels), chw, chw.float(), chw[None]]
    logits = clf.logits(kinds)
    assert logits.shape == (5, 4)
    assert torch.allclose(logits, infer(clf.model, chw[None]).expand(5, -1), atol=1e-5)


def test_file_formats_modes_and_sizes(clf, tmp_path):
    base = rgb(45, 60, seed=1)
    image = Image.fromarray(base)
    files = {
        "rgb.png": image,
        "photo.jpg": image,
        "gray.png": image.convert("L").resize((20, 20)),
        "alpha.png": image.convert("RGBA").resize((64, 64)),
        "palette.gif": image.convert("P").resize((33, 33)),
        "small.webp": image.resize((16, 16)),
        "wide.bmp": image.resize((120, 30)),
    }
    paths = []
    for name, img in files.items():
        img.save(tmp_path / name)
        paths.append(tmp_path / name)
    preds = clf.predict(paths, top_k=3)
    assert [p.source for p in preds] == [str(p) for p in paths]
    for pred in preds:
        assert len(pred.top_k) == 3 and pred.top_k[0].probability >= pred.top_k[1].probability >= 0
        assert pred.name == clf.classes[pred.index] and 0 < pred.probability <= 1
    # A lossless file classifies as its pixels, fitted as an image folder stores them (centre crop, rounded to
    # uint8); the alpha channel is dropped, gray is repeated to RGB.
    logits = clf.logits(paths)
    chw = torch.from_numpy(base).permute(2, 0, 1)
    assert torch.allclose(logits[0], infer(clf.model, resize_uint8(chw, 32)[None])[0], atol=1e-5)
    rgba = np.asarray(files["alpha.png"])
    assert torch.allclose(logits[3], clf.logits(rgba[:, :, :3])[0], atol=1e-5)
    gray = torch.from_numpy(np.array(files["gray.png"]))[None]
    assert torch.allclose(logits[2], infer(clf.model, resize_uint8(gray.expand(3, -1, -1), 32)[None])[0], atol=1e-5)
    assert torch.allclose(logits[2], clf.logits(np.asarray(files["gray.png"]))[0], atol=1e-5)


def test_other_sizes_are_resized_like_training(clf):
    images = torch.randint(0, 256, (3, 3, 57, 41), dtype=torch.uint8)
    fitted = torch.stack([resize_uint8(x, 32) for x in images])  # as an image folder stores them
    assert torch.allclose(clf.logits(images), infer(clf.model, fitted), atol=1e-6)


def test_batch_size_does_not_change_results(run):
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    one = Classifier.from_checkpoint(run, batch_size=3).logits(images)
    assert torch.allclose(one, Classifier.from_checkpoint(run, batch_size=64).logits(images), atol=1e-6)
    assert len(Classifier.from_checkpoint(run).predict(images, top_k=99)[0].top_k) == 4  # capped at the classes


def test_expand_inputs(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/2.png", "a/1.JPG", "a/b/3.webp", "a/notes.txt", "top.bmp"):
        Image.fromarray(rgb(8, 8)).save(tmp_path / name, format="PNG") if not name.endswith(".txt") else None
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    folder = expand_inputs([tmp_path / "a"])
    assert [p.relative_to(tmp_path).as_posix() for p in folder] == ["a/1.JPG", "a/2.png", "a/b/3.webp"]
    pattern = expand_inputs([str(tmp_path / "**" / "*.png"), tmp_path / "top.bmp", tmp_path / "a" / "2.png"])
    assert [p.name for p in pattern] == ["2.png", "top.bmp"]  # duplicates dropped
    with pytest.raises(ImageError, match="image not found"):
        expand_inputs([tmp_path / "missing.png"])
    with pytest.raises(ImageError, match="no image files match"):
        expand_inputs([str(tmp_path / "*.gif")])


@pytest.mark.parametrize("kind", ["truncated", "text", "bomb", "huge-bomb", "missing", "empty"])
def test_bad_files_raise_image_errors_naming_the_file(tmp_path, kind):
    path = tmp_path / ("x.jpg" if kind == "truncated" else "x.png")
    if kind == "truncated":
        Image.fromarray(rgb(64, 64)).save(path, quality=95)
        path.write_bytes(path.read_bytes()[:800])
    elif kind == "text":
        path.write_text("this is not a picture\n")
    elif kind == "bomb":
        path.write_bytes(png_header(9000, 9000))  # 81 Mpx: above our 64 Mpx bound, below Pillow's own
    elif kind == "huge-bomb":
        path.write_bytes(png_header(100_000, 100_000))  # 10 Gpx: Pillow refuses it itself
    elif kind == "empty":
        path.write_bytes(b"")
    message = {"truncated": "cannot read", "text": "not an image", "bomb": "decompression bomb",
               "huge-bomb": "decompression bomb", "missing": "not found", "empty": "not an image"}[kind]  # fmt: skip
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_bad_arrays_and_tensors(clf):
    with pytest.raises(ImageError, match="numpy images must be uint8"):
        clf.predict(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ImageError, match="scaled to 0..1"):
        clf.predict(torch.rand(3, 8, 8))
    with pytest.raises(ImageError, match=r"\(C, H, W\) or \(B, C, H, W\)"):
        clf.predict(torch.zeros(8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ImageError, match="cannot classify a dict"):
        clf.predict({"not": "an image"})


def test_cli_predict_text_and_json(run, tmp_path, capsys):
    for i in range(3):
        Image.fromarray(rgb(32, 32, seed=i)).save(tmp_path / f"{i}.png")
    assert main(["predict", str(run), str(tmp_path), "--top-k", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(str(tmp_path / "0.png") + ": class")
    assert lines[0].count("%") == 2
    assert main(["predict", str(run / "last.pt"), str(tmp_path / "*.png"), "--json", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["0.png", "1.png", "2.png"]
    assert all(len(r["top_k"]) == 4 and r["name"] == r["top_k"][0]["name"] for r in rows)


def test_predict_from_what_export_writes(run, tmp_path, capsys):
    """The export folder (safetensors, or ONNX alone), model.onnx and the int8 graph classify like the checkpoint."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")  # CI installs it: never skipped there
    for i in range(3):
        Image.fromarray(rgb(32, 40, seed=i)).save(tmp_path / f"{i}.png")
    images = [str(tmp_path / f"{i}.png") for i in range(3)]
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "onnx" / "model.onnx"), "--quantize", "int8"]) == 0
    capsys.readouterr()
    reference = Classifier.from_checkpoint(run).logits(images)
    assert torch.equal(Classifier.load(tmp_path / "st").logits(images), reference)  # the same PyTorch model
    assert torch.equal(Classifier.load(tmp_path / "st" / "model.safetensors").logits(images), reference)
    for source in (tmp_path / "onnx", tmp_path / "onnx" / "model.onnx"):
        assert torch.allclose(Classifier.load(source).logits(images), reference, atol=1e-4)
    int8 = Classifier.load(tmp_path / "onnx" / "model.int8.onnx")
    assert int8.classes == Classifier.from_checkpoint(run).classes and int8.logits(images).shape == reference.shape
    expected = [p.to_dict() for p in Classifier.from_checkpoint(run).predict(images, top_k=2)]
    for model in (tmp_path / "st", tmp_path / "onnx" / "model.onnx"):
        assert main(["predict", str(model), *images, "--json", "--top-k", "2"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert [r["name"] for r in rows] == [e["name"] for e in expected]
        assert all(abs(r["probability"] - e["probability"]) < 1e-4 for r, e in zip(rows, expected, strict=True))


def test_predict_refuses_what_is_not_a_model(run, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    Image.fromarray(rgb(32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "fake.onnx").write_bytes(b"not a graph")
    (tmp_path / "empty").mkdir()
    for model, message in [
        (tmp_path / "fake.onnx", "cannot load"),
        (tmp_path / "missing.onnx", "missing.onnx not found"),
        (tmp_path / "empty", "not found"),
    ]:
        assert main(["predict", str(model), str(tmp_path / "ok.png")]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["IMG_BAD"], 1, "not an image file"),
        (["IMG_MISSING"], 1, "image not found"),
        (["IMG_OK", "--top-k", "0"], 2, "must be a positive integer"),
        (["--ckpt", "IMG_OK", "IMG_OK"], 1, "not a gmlp-vision checkpoint"),
        (["--ckpt", "MISSING_CKPT", "IMG_OK"], 1, "checkpoint not found"),
    ],
)
def test_cli_predict_errors(run, tmp_path, capsys, args, code, message):
    Image.fromarray(rgb(32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_text("hello")
    subst = {"IMG_BAD": tmp_path / "bad.png", "IMG_MISSING": tmp_path / "nope.png", "IMG_OK": tmp_path / "ok.png",
             "MISSING_CKPT": tmp_path / "none.pt"}  # fmt: skip
    args = [str(subst.get(a, a)) for a in args]
    argv = ["predict", *args[1:]] if args[0] == "--ckpt" else ["predict", str(run), *args]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_real_cifar10_png_files_match_evaluate(tmp_path, capsys):
    if not REAL_CIFAR10.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{REAL_CIFAR10} is missing in CI")
        pytest.skip(f"{REAL_CIFAR10} not present")
    ds = load_dataset("cifar10", REAL_CIFAR10, download=False)
    cfg = from_preset("tiny", epochs=1, train_limit=2000, progress=False, out=str(tmp_path / "run"))
    run = train(cfg, ds).run_dir
    images, labels = ds.test.images[:200], ds.test.labels[:200]
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    assert main(["predict", str(run), str(tmp_path / "*.png"), "--json", "--top-k", "1"]) == 0
    predicted = torch.tensor([json.loads(line)["index"] for line in capsys.readouterr().out.splitlines()])
    model, _ = load_model(run / json.loads((run / "results.json").read_text())["final_checkpoint"])
    with torch.no_grad():
        assert torch.equal(predicted, infer(model, images).argmax(dim=1))
    acc = evaluate(model, images, labels)["acc"]
    assert (predicted == labels).float().mean().item() == pytest.approx(acc)
    assert acc > 0.15  # a one-epoch tiny model is weak, but better than chance (0.1)
