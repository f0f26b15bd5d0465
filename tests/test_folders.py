"""Image-folder datasets: layout, formats and sizes, the decode cache, training through the CLI, bad folders."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from gmlp_vision.augment import random_resized_crop
from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.cli import main
from gmlp_vision.data import folders, load_dataset
from gmlp_vision.data.stream import crop_box, decode_crop
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
    # Training files come in a fixed shuffled order, so that the validation tail holds every class; test files in order.
    assert torch.equal(ds.test.labels, torch.arange(3).repeat_interleave(6))
    assert torch.equal(ds.train.labels.sort().values, ds.test.labels)
    assert not torch.equal(ds.train.labels, ds.test.labels) and len(set(ds.train.labels[-6:].tolist())) > 1
    # The RGB colour of each class survives decoding and resizing (grayscale files are gray, so check RGB ones).
    red = ds.test.images[0].float().mean((1, 2))
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
    out = capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["acc"] > 0.6 and results["test_split"] == "val"  # three colours: chance is 1/3
    # The val/ folder is named as what it serves as here, the test split; 3 classes: no top-5 anywhere.
    assert "Test (val/) accuracy:" in out and "Test accuracy" not in out and "top5" not in out and "top 5" not in out
    assert main(["evaluate", str(run)]) == 0
    assert "folder val split, 36 images" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 36
    assert main(["predict", str(run), str(root / "val" / "dog" / "0.png"), "--top-k", "1", "--json"]) == 0
    assert "dog" in capsys.readouterr().out
    assert main(["train", "--dataset", "folder", "--out", str(tmp_path / "r2")]) == 1
    assert "needs --data DIR" in capsys.readouterr().err


STREAM = ["train", "--dataset", "folder", "--preset", "tiny", "--epochs", "2", "--batch-size", "8", "--no-progress",
          "--threads", "1", "--folder-mode", "stream"]  # fmt: skip


@pytest.mark.parametrize("extra", [[], ["--patch-init", "whiten"]])  # the whitening reads the files too
def test_streamed_folder_trains_exactly_like_the_decoded_one(tmp_path, monkeypatch, extra):
    """Without crops, streaming decodes each file exactly as the in-memory path: the same run, to the bit."""
    monkeypatch.setenv("GMLP_DATA", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", per_class=8)
    common = [*STREAM[:-2], "--data", str(root), *extra]
    assert main([*common, "--folder-mode", "memory", "--out", str(tmp_path / "memory")]) == 0
    assert main([*common, "--folder-mode", "stream", "--workers", "2", "--out", str(tmp_path / "stream")]) == 0
    a, b = (load_checkpoint(tmp_path / run / "last.pt").model_state for run in ("memory", "stream"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((tmp_path / run / "results.json").read_text())["test"] for run in ("memory", "stream")]
    assert results[0] == results[1]
    assert (tmp_path / "stream" / "plots" / "misclassified.png").is_file()  # the report reads streamed files too


def test_streamed_crops_do_not_depend_on_the_number_of_workers(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8)
    for workers in (0, 2):
        argv = [*STREAM, "--data", str(root), "--crop", "random-resized", "--workers", str(workers)]
        assert main([*argv, "--out", str(tmp_path / f"w{workers}")]) == 0
    a, b = (load_checkpoint(tmp_path / run / "last.pt").model_state for run in ("w0", "w2"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_file_met_while_streaming_stops_the_run_or_is_skipped(tmp_path, capsys):
    root = make_folder(tmp_path / "data", per_class=8)
    (root / "train" / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = [*STREAM, "--data", str(root), "--workers", "0"]
    assert main([*argv, "--out", str(tmp_path / "fails")]) == 1
    assert "3.png" in capsys.readouterr().err and not (tmp_path / "fails" / "results.json").exists()
    assert main([*argv, "--skip-bad-images", "--out", str(tmp_path / "skips")]) == 0
    assert capsys.readouterr().err.count("skipped cannot read image") == 1  # once, not every epoch
    assert (tmp_path / "skips" / "results.json").is_file()


def test_random_resized_crop_boxes_stay_inside_and_respect_the_scale():
    rng = random.Random(0)
    for width, height in [(640, 480), (100, 400), (33, 33), (1000, 10)]:
        for _ in range(200):
            left, top, w, h = crop_box(width, height, 0.25, rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 and h > 0
    boxes = [crop_box(640, 480, 0.25, random.Random(k)) for k in range(300)]
    fractions = [w * h / (640 * 480) for _, _, w, h in boxes]
    assert min(fractions) >= 0.24 and max(fractions) <= 1.0 and max(fractions) - min(fractions) > 0.5


def test_jpeg_crops_decoded_at_reduced_scale_match_full_decoding(tmp_path):
    y, x = np.mgrid[0:600, 0:800]
    pixels = np.stack([x * 255 // 800, y * 255 // 600, (x + y) * 255 // 1400], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    for key in range(5):  # the same key gives the same box in both files; the JPEG one decodes at 1/2..1/8 scale
        fast, full = (decode_crop(str(tmp_path / f"big.{ext}"), 32, 0.3, key).float() for ext in ("jpg", "png"))
        assert (fast - full).abs().mean() < 3.0
    assert torch.equal(
        decode_crop(str(tmp_path / "big.jpg"), 32, 0.3, 7), decode_crop(str(tmp_path / "big.jpg"), 32, 0.3, 7)
    )


def test_batched_random_resized_crop():
    images = torch.rand(6, 3, 16, 16) * 255
    same = random_resized_crop(images, 1.0, torch.Generator().manual_seed(0), ratio=(1.0, 1.0))
    assert torch.allclose(same, images, atol=1e-3)  # the whole image at its own size
    cropped = random_resized_crop(images, 0.1, torch.Generator().manual_seed(0))
    assert cropped.shape == images.shape and not torch.allclose(cropped, images, atol=1.0)
    assert cropped.min() >= images.min() - 1e-3 and cropped.max() <= images.max() + 1e-3
