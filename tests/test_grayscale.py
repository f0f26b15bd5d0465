"""--in-chans 1 on an image folder: grayscale (Pillow's L) in memory and streamed, trained, predicted, exported."""

import json

import pytest
import torch

from gmlp_vision.cli import main
from gmlp_vision.data import load_dataset
from gmlp_vision.predict import Classifier
from test_folders import make_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_folder_loads_as_grayscale_in_memory_and_streamed_alike(tmp_path):
    root = make_folder(tmp_path / "data", per_class=4)
    common = dict(image_size=16, cache_dir=tmp_path / "cache", progress=False, channels=1)
    memory = load_dataset("folder", root, folder_mode="memory", **common)
    stream = load_dataset("folder", root, folder_mode="stream", workers=0, **common)
    rgb = load_dataset("folder", root, folder_mode="memory", **{**common, "channels": 3})
    assert memory.in_chans == 1 and memory.train.images.shape[1:] == (1, 16, 16) and rgb.in_chans == 3
    assert torch.equal(stream.train.images.split(64).__next__(), memory.train.images)  # the same pixels both ways
    gray = memory.train.images.float()
    assert not torch.equal(gray, rgb.train.images[:, :1].float())  # luma, not the red channel
    with pytest.raises(Exception, match="--in-chans 2: image files are read as RGB"):
        load_dataset("folder", root, **{**common, "channels": 2})


def test_in_chans_1_trains_predicts_and_exports_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GMLP_DATA", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", per_class=8)
    run = tmp_path / "run"
    argv = ["train", "--dataset", "folder", "--data", str(root), "--preset", "tiny", "--in-chans", "1",
            "--epochs", "1", "--batch-size", "8", "--out", str(run), "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["in_chans"] == 1
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 24
    image = sorted((root / "val").rglob("*.png"))[0]
    classifier = Classifier.load(run)
    assert classifier.in_chans == 1 and classifier.logits([str(image)]).shape == (1, 3)
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")  # CI installs it
    assert main(["export", str(run), "--check"]) == 0
    onnx = Classifier.load(run / "export" / "model.onnx")
    assert onnx.in_chans == 1
    assert torch.allclose(onnx.logits([str(image)]), classifier.logits([str(image)]), atol=1e-4)
    bad = ["train", "--dataset", "folder", "--data", str(root), "--preset", "tiny", "--in-chans", "2"]
    assert main([*bad, "--out", str(tmp_path / "bad"), "--no-progress"]) == 1
    assert "--in-chans 2" in capsys.readouterr().err
