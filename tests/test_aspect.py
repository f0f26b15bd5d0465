"""Aspect handling: non-square images are centre-cropped, not squashed, everywhere images are fitted.

`images.resize` is the one rule (timm's evaluation transform: shorter side to ``size / crop_pct``, centre crop);
``--resize squash`` keeps the old stretch, and square images at the model's size never change.
"""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.config import Config, from_preset
from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.data import load_dataset
from gmlp_vision.data.stream import RATIO, ImageFiles, crop_box
from gmlp_vision.errors import CheckpointError, ConfigError, ImageError
from gmlp_vision.evaluate import evaluate, infer
from gmlp_vision.export import export_onnx, export_safetensors
from gmlp_vision.images import load_image, resize, resize_uint8
from gmlp_vision.model import GMLP
from gmlp_vision.predict import Classifier
from gmlp_vision.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("a", "b", "c")


def pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def shrink(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The reference resize: antialiased bilinear, half-pixel centres, as float (1, C, h, w)."""
    return F.interpolate(x[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)


@pytest.fixture(scope="module")
def model() -> GMLP:
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, patch_size=8, embed_dim=16, ffn_dim=32, depth=1, num_classes=len(CLASSES))
    return GMLP(cfg).eval()


def make_folder(root, sizes=((30, 48), (48, 30), (64, 96), (32, 32))):
    """Three classes of non-square RGB PNGs (H, W from ``sizes``), in train/ and val/."""
    for split in ("train", "val"):
        for k, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                Image.fromarray(pixels(h, w, seed=100 * k + i)).save(root / split / cls / f"{i}.png")
    return root


def test_crop_resizes_the_shorter_side_then_takes_the_centre():
    wide = chw(pixels(32, 48))
    assert torch.equal(resize(wide[None], 32)[0], wide[:, :, 8:40].float())  # shorter side already 32: a pure crop
    tall = chw(pixels(48, 32))
    assert torch.equal(resize(tall[None], 32)[0], tall[:, 8:40, :].float())
    big = chw(pixels(64, 96))  # shorter side 64 -> 32, longer 96 -> 48, centre 32 columns
    assert torch.equal(resize(big[None], 32), shrink(big, 32, 48)[:, :, :, 8:40])
    # timm's crop_pct 0.875: shorter side to floor(32 / 0.875) = 36, longer to int(36 * 96 / 64) = 54; offsets 2, 11.
    assert torch.equal(resize(big[None], 32, crop_pct=0.875), shrink(big, 36, 54)[:, :, 2:34, 11:43])
    assert torch.equal(resize_uint8(big, 32), shrink(big, 32, 48)[0, :, :, 8:40].round().clamp(0, 255).byte())


def test_square_images_at_the_model_size_are_unchanged_whatever_the_rule():
    x = chw(pixels(32, 32))
    batch = x[None].float()
    for mode in ("crop", "squash"):
        for crop_pct in (1.0, 0.875):
            assert resize(batch, 32, mode=mode, crop_pct=crop_pct) is batch  # used whole, not even copied
            assert torch.equal(resize_uint8(x, 32, mode=mode, crop_pct=crop_pct), x)
    # Square images at another size (CIFAR on a 64 px model, the digits): crop and squash are the same resize.
    small = chw(pixels(8, 8)).float()[None]
    assert torch.equal(resize(small, 32), resize(small, 32, mode="squash"))
    assert torch.equal(resize(small, 32), shrink(small[0], 32, 32))


def test_squash_gives_the_old_resize_bit_for_bit(tmp_path, model):
    big = chw(pixels(57, 41))
    assert torch.equal(resize(big[None], 32, mode="squash"), shrink(big, 32, 32))
    root = make_folder(tmp_path / "data")
    ds = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "c", progress=False, resize="squash")
    files = sorted((root / "val" / "a").iterdir())
    old = [shrink(load_image(p), 32, 32)[0].round().clamp(0, 255).byte() for p in files]
    assert torch.equal(ds.test.images[: len(files)], torch.stack(old))
    clf = Classifier(model, CLASSES, resize="squash")
    assert torch.equal(clf.preprocess([big]), shrink(big, 32, 32).round())


def test_predict_centre_crops_non_square_images(tmp_path, model):
    clf = Classifier(model, CLASSES)
    wide, big = chw(pixels(32, 48, seed=1)), chw(pixels(64, 96, seed=2))
    Image.fromarray(pixels(32, 48, seed=1)).save(tmp_path / "wide.png")
    hand = torch.stack([wide[:, :, 8:40], shrink(big, 32, 48)[0, :, :, 8:40].round().byte()])
    with torch.no_grad():
        expected = infer(model, hand)
        assert torch.equal(clf.logits([tmp_path / "wide.png", big]), expected)
        assert torch.equal(clf.logits(wide[None].float()), infer(model, hand[:1]))  # a float tensor too
        squashed = Classifier(model, CLASSES, resize="squash").logits([tmp_path / "wide.png"])
    assert not torch.allclose(squashed, expected[:1], atol=1e-4)


def test_the_folder_cache_holds_centre_crops_and_streaming_decodes_the_same(tmp_path):
    root = make_folder(tmp_path / "data")
    ds = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "c", progress=False)
    files = sorted((root / "val" / "a").iterdir())  # 0: 30x48, 1: 48x30, 2: 64x96, 3: 32x32
    hand = [
        shrink(load_image(files[0]), 32, 51)[0, :, :, 10:42],  # shorter 30 -> 32, longer int(32 * 48 / 30) = 51
        shrink(load_image(files[1]), 51, 32)[0, :, 10:42, :],
        shrink(load_image(files[2]), 32, 48)[0, :, :, 8:40],
        load_image(files[3]).float(),
    ]
    assert torch.equal(ds.test.images[:4], torch.stack(hand).round().clamp(0, 255).byte())
    streamed = load_dataset("folder", root, image_size=32, progress=False, folder_mode="stream", workers=0)
    assert isinstance(streamed.test.images, ImageFiles)
    assert torch.equal(torch.cat(list(streamed.test.images.split(5))), ds.test.images)
    # Another rule is another cache entry, not a stale hit.
    pct = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "c", progress=False, crop_pct=0.875)
    assert len(list((tmp_path / "c" / "folders").glob("*.pt"))) == 2
    assert not torch.equal(pct.test.images, ds.test.images) and torch.equal(pct.test.images[3], ds.test.images[3])


def test_predict_on_a_png_equals_evaluate_on_the_same_folder_image(tmp_path, model):
    root = make_folder(tmp_path / "data")
    ds = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "c", progress=False, crop_pct=0.875)
    files = [p for cls in CLASSES for p in sorted((root / "val" / cls).iterdir())]  # val/ is in class order
    clf = Classifier(model, CLASSES, crop_pct=0.875)
    with torch.no_grad():
        logits = clf.logits(files)
        assert torch.equal(logits, infer(model, ds.test.images))
    metrics = evaluate(model, ds.test.images, ds.test.labels)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, ds.test.labels).item(), rel=1e-6)
    assert metrics["acc"] == (logits.argmax(1) == ds.test.labels).float().mean().item()


def test_streamed_random_resized_crops_keep_the_aspect_range():
    for width, height in [(640, 480), (300, 1000), (1000, 300), (96, 64)]:
        aspects = []
        for key in range(300):
            _, _, w, h = crop_box(width, height, 0.08, random.Random(key))
            # Within 3/4..4/3 in the file's own pixels, up to the rounding of each side to whole pixels.
            assert RATIO[0] <= (w + 0.5) / (h - 0.5) and (w - 0.5) / (h + 0.5) <= RATIO[1], (width, height, w, h)
            aspects.append(math.log(w / h))
        assert min(aspects) < math.log(0.8) and max(aspects) > math.log(1.25)  # the whole range is drawn
    for width, height in [(1000, 10), (10, 1000)]:  # no box fits: the largest centred one within the range
        _, _, w, h = crop_box(width, height, 0.08, random.Random(0))
        assert (w, h) == ((13, 10) if width > height else (10, 13))


def test_the_rule_is_checked_and_elongated_strips_are_refused(model):
    old = Config.from_dict({k: v for k, v in from_preset("tiny").to_flat().items() if k not in ("resize", "crop_pct")})
    assert (old.data.resize, old.data.crop_pct) == ("crop", 1.0)  # configs from before the flag: the default
    with pytest.raises(ConfigError, match="--crop-pct"):
        from_preset("tiny", crop_pct=0.0)
    with pytest.raises(ConfigError, match="--resize"):
        from_preset("tiny", resize="stretch")
    with pytest.raises(ConfigError, match="--crop-pct"):
        Classifier(model, CLASSES, crop_pct=1.5)
    with pytest.raises(ConfigError, match="--resize"):
        Classifier(model, CLASSES, resize="stretch")
    strip = torch.zeros(1, 3, 1, 70_000)  # 224 x 15.7M once its shorter side is 224: refused, not allocated
    with pytest.raises(ImageError, match="too elongated"):
        resize(strip, 224)
    assert resize(strip, 224, mode="squash").shape == (1, 3, 224, 224)


def test_the_rule_travels_from_training_to_predict_and_exports(tmp_path, monkeypatch):
    monkeypatch.setenv("GMLP_DATA", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data")
    cfg = from_preset("tiny", dataset="folder", data=str(root), epochs=1, progress=False, out=str(tmp_path / "run"))
    run = train(cfg.replace(resize="squash", crop_pct=0.9)).run_dir
    assert load_checkpoint(run / "last.pt").config.data.resize == "squash"
    clf = Classifier.from_checkpoint(run)
    assert (clf.resize, clf.crop_pct) == ("squash", 0.9)
    ds = load_dataset("folder", root, image_size=32, progress=False, resize="squash", crop_pct=0.9)
    files = [p for cls in CLASSES for p in sorted((root / "val" / cls).iterdir())]
    with torch.no_grad():
        assert torch.equal(clf.logits(files), infer(clf.model, ds.test.images))
    export_safetensors(run, tmp_path / "st")
    exported = Classifier.load(tmp_path / "st")
    assert (exported.resize, exported.crop_pct) == ("squash", 0.9)
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    assert (config["pretrained_cfg"]["crop_mode"], config["pretrained_cfg"]["crop_pct"]) == ("squash", 0.9)
    old = {"format": "gmlp-vision-safetensors", "version": 1, "model": config["model_args"]}
    old["classes"] = config["label_names"]  # 0.1's layout, written before the rule was stored
    (tmp_path / "st" / "config.json").write_text(json.dumps(old))
    assert (Classifier.load(tmp_path / "st").resize, Classifier.load(tmp_path / "st").crop_pct) == ("crop", 1.0)
    config["pretrained_cfg"]["crop_pct"] = "wide"
    (tmp_path / "st" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="crop_pct"):
        Classifier.load(tmp_path / "st")
    pytest.importorskip("onnx", reason="the onnx extra is not installed; CI installs it")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed; CI installs it")
    graph = Classifier.load(export_onnx(run, tmp_path / "m.onnx"))
    assert (graph.resize, graph.crop_pct) == ("squash", 0.9)
    assert torch.allclose(graph.logits(files), clf.logits(files), atol=1e-4)
