"""Image-folder datasets: layout, formats and sizes, the decode cache, training through the CLI, bad folders."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gmlp_vision import folders
from gmlp_vision.cli import main
from gmlp_vision.data import load_dataset
from gmlp_vision.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")
COLOURS = {"bird": (200, 40, 40), "cat": (40, 200, 40), "dog": (40, 40, 200)}
KINDS = [("png", "RGB", (40, 30)), ("jpg", "RGB", (64, 64)), ("png", "L", (20, 20)), ("png", "RGBA", (33, 50)),
         ("webp", "RGB", (48, 24)), ("bmp", "RGB", (32, 32))]  # fmt: skip


def make_folder(root, per_class=6, splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for cls, colour in COLOURS.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                ext, mode, (w, h) = KINDS[i % len(KINDS)]
                pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels).convert(mode)
                image.save(root / split / cls / f"{i}.{ext}")
    return root


def test_folder_loads_every_format_and_size(tmp_path):
    root = make_folder(tmp_path / "data")
    ds = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "cache", progress=False)
    assert ds.classes == ("bird", "cat", "dog")
    assert ds.train.images.shape == (18, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (18, 3, 32, 32)
    assert torch.equal(ds.train.labels, torch.arange(3).repeat_interleave(6))
    # The RGB colour of each class survives decoding and resizing (grayscale files are gray, so check RGB ones).
    red = ds.train.images[0].float().mean((1, 2))
    assert red[0] > red[1] + 80 and red[0] > red[2] + 80


def test_decoded_folder_is_cached_and_a_changed_folder_decoded_again(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache" / "folders").glob("*.pt"))) == 1
    calls = {"n": 0}
    real = folders.load_image

    def counting(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(folders, "load_image", counting)
    ds = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "cache", progress=False)
    assert calls["n"] == 0 and len(ds.train) == 18
    Image.new("RGB", (10, 10)).save(root / "train" / "cat" / "new.png")
    ds = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "cache", progress=False)
    assert calls["n"] == 37 and len(ds.train) == 19


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: [(r / split / "lonely").mkdir() for split in ("train", "val")], "lonely holds no images"),
        (lambda r: [p.unlink() for p in (r / "val" / "dog").iterdir()] and (r / "val" / "dog").rmdir(),
         "only in train: ['dog']"),
        (lambda r: (r / "train" / "cat" / "0.png").write_bytes(b"not an image"), "0.png"),
        (lambda r: (r / "train" / "cat" / "1.jpg").write_bytes((r / "train" / "cat" / "1.jpg").read_bytes()[:300]),
         "1.jpg"),
        (lambda r: [p.rename(r / "other") for p in [r / "val"]], "no val/ or test/ folder"),
    ],
)  # fmt: skip
def test_bad_folders_name_the_problem(tmp_path, damage, message):
    root = make_folder(tmp_path / "data")
    damage(root)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "cache", progress=False)


def test_skip_bad_images_leaves_the_file_out(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "train" / "cat" / "0.png").write_bytes(b"not an image")
    ds = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "cache", progress=False, skip_bad=True)
    assert len(ds.train) == 17 and len(ds.test) == 18


def test_train_evaluate_predict_on_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GMLP_DATA", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", per_class=12)
    run = tmp_path / "run"
    argv = ["train", "--dataset", "folder", "--data", str(root), "--preset", "tiny", "--epochs", "3",
            "--batch-size", "8", "--out", str(run), "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["acc"] > 0.6  # three colours: chance is 1/3
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 36
    assert main(["predict", str(run), str(root / "val" / "dog" / "0.png"), "--top-k", "1", "--json"]) == 0
    assert "dog" in capsys.readouterr().out
    assert main(["train", "--dataset", "folder", "--out", str(tmp_path / "r2")]) == 1
    assert "needs --data DIR" in capsys.readouterr().err
