"""Test-time augmentation: the views, the mean of their logits, and --tta in evaluate, predict and serve."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmlp_vision.cli import main
from gmlp_vision.data import load_dataset
from gmlp_vision.errors import ConfigError
from gmlp_vision.evaluate import evaluate, infer, tta_views
from gmlp_vision.predict import Classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_views_are_the_image_its_mirror_and_both_moved_2px_each_way():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert len(tta_views(x)) == 1 and tta_views(x)[0] is x
    flip = tta_views(x, "flip")
    assert len(flip) == 2 and torch.equal(flip[1], x.flip(-1))
    six = tta_views(x, "flip-shift")
    assert len(six) == 6 and all(v.shape == x.shape for v in six)
    down_right, up_left = six[2], six[4]
    assert torch.equal(down_right[..., 2:, 2:], x[..., :-2, :-2])  # the content moved 2 px down and right
    assert torch.equal(up_left[..., :-2, :-2], x[..., 2:, 2:])
    assert torch.equal(down_right[..., 0, 2:], x[..., 2, :-2])  # the edge reflected, not zeros
    assert torch.equal(six[3], down_right.flip(-1)) and torch.equal(six[5], up_left.flip(-1))
    with pytest.raises(ConfigError, match="--tta must be one of none, flip, flip-shift, got 'mirror'"):
        tta_views(x, "mirror")
    with pytest.raises(ConfigError, match="--tta flip-shift moves images by 2 px: they must be larger, got 2 px"):
        tta_views(torch.zeros(1, 1, 2, 2), "flip-shift")


def test_tta_averages_the_logits_of_the_views(tiny_run):
    model = Classifier.from_checkpoint(tiny_run).model
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        plain, mirrored = infer(model, images), infer(model, images.flip(-1))
        assert torch.allclose(infer(model, images, tta="flip"), (plain + mirrored) / 2, atol=1e-5)
        assert not torch.allclose(infer(model, images, tta="flip"), plain, atol=1e-3)
    labels = torch.randint(0, model.cfg.num_classes, (5,))
    logits = (plain + mirrored) / 2
    flipped = evaluate(model, images, labels, tta="flip")
    assert flipped["acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert flipped["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_the_classifier_and_the_commands_take_tta(tiny_run, tmp_path, capsys):
    files = []
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    plain = Classifier.from_checkpoint(tiny_run)
    flipped = [np.asarray(Image.open(f))[:, ::-1].copy() for f in files]
    expected = (plain.logits(files) + plain.logits(flipped)) / 2
    assert torch.allclose(Classifier.load(tiny_run, tta="flip").logits(files), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="--tta must be one of"):
        Classifier.load(tiny_run, tta="sideways")
    assert main(["predict", str(tiny_run), *files, "--json", "--tta", "flip"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    probs = expected.softmax(dim=1)
    assert [r["top_k"][0]["probability"] for r in rows] == pytest.approx(probs.max(dim=1).values.tolist(), abs=1e-5)
    digits = ["--preset", "tiny", "--dataset", "digits", "--epochs", "1", "--threads", "1", "--no-progress"]
    assert main(["train", *digits, "--out", str(tmp_path / "digits")]) == 0
    capsys.readouterr()
    for tta in ("none", "flip-shift"):
        assert main(["evaluate", str(tmp_path / "digits"), "--json", "--tta", tta, "--device", "cpu"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        model = Classifier.from_checkpoint(tmp_path / "digits").model
        test = load_dataset("digits").test
        assert result["tta"] == tta and result["acc"] == evaluate(model, test.images, test.labels, tta=tta)["acc"]
    assert main(["evaluate", str(tiny_run), "--tta", "sideways"]) == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_an_onnx_graph_averages_the_same_views(tiny_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")  # CI installs it
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "model.onnx")]) == 0
    capsys.readouterr()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    graph = Classifier.load(Path(tmp_path / "model.onnx"), tta="flip-shift")
    torch_side = Classifier.from_checkpoint(tiny_run, tta="flip-shift")
    assert torch.allclose(graph.logits(images), torch_side.logits(images), atol=1e-4)
