"""Random crop with padding, random erasing and the batched TrivialAugment / RandAugment ops, against definitions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from gmlp_vision.augment import random_crop_padded, random_erase
from gmlp_vision.config import from_preset
from gmlp_vision.policy import OPS, apply_ops, rand_augment, trivial_augment
from gmlp_vision.train import augment_for_training

pytestmark = pytest.mark.usefixtures("one_thread")


def photos(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Float batches of integer pixels with some structure (gradients plus noise), 3 channels."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, size)
    base = ramp[None, None, :, None] * 0.5 + ramp[None, None, None, :] * 0.5
    return (base + torch.randint(0, 56, (n, 3, size, size), generator=g)).round().clamp(0, 255)


def test_random_crop_padded_is_a_shifted_window_of_the_reflect_padded_image():
    x = photos(32)
    out = random_crop_padded(x, 4, torch.Generator().manual_seed(1))
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    shifts = set()
    for i in range(len(x)):
        windows = [(dy, dx) for dy in range(9) for dx in range(9)]
        matches = [(dy, dx) for dy, dx in windows if torch.equal(out[i], padded[i, :, dy : dy + 16, dx : dx + 16])]
        assert matches, f"image {i} is not a window of its padded image"
        shifts.add(matches[0])
    assert len(shifts) > 10  # offsets really vary per image
    assert torch.equal(random_crop_padded(x, 0), x)


def test_random_erase_replaces_one_box_per_image_with_noise():
    x = photos(64, 32)
    assert torch.equal(random_erase(x, 0.0, torch.Generator().manual_seed(0)), x)
    out = random_erase(x, 1.0, torch.Generator().manual_seed(0))
    areas = []
    for i in range(len(x)):
        changed = (out[i] != x[i]).any(0)
        ys, xs = changed.nonzero(as_tuple=True)
        assert len(ys), f"image {i}: nothing erased with p=1"
        box = changed[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert box.float().mean() > 0.95  # a rectangle (noise may equal a pixel by chance, rarely)
        areas.append(box.numel() / (32 * 32))
    assert 0.015 < min(areas) and max(areas) < 0.4
    half = random_erase(x, 0.5, torch.Generator().manual_seed(3))
    hit = (half != x).flatten(1).any(1).float().mean()
    assert 0.25 < hit < 0.75


def pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).to(torch.uint8).numpy())


def tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()


def one(x: torch.Tensor, op: str, mag: float, sign: float = 1.0) -> torch.Tensor:
    n = len(x)
    return apply_ops(x, torch.full((n,), OPS.index(op)), torch.full((n,), mag), torch.full((n,), sign))


def test_colour_ops_match_pil():
    x = photos(4)
    for i in range(len(x)):
        img = pil(x[i])
        assert torch.equal(one(x[i : i + 1], "equalize", 0.5)[0], tensor(ImageOps.equalize(img)))
        assert torch.equal(one(x[i : i + 1], "posterize", 0.5)[0], tensor(ImageOps.posterize(img, 6)))
        assert torch.equal(one(x[i : i + 1], "solarize", 0.5)[0], tensor(ImageOps.solarize(img, 128)))
        ours = one(x[i : i + 1], "autocontrast", 0.3)[0]
        assert (ours - tensor(ImageOps.autocontrast(img))).abs().max() <= 1.0  # PIL truncates, we keep floats


def test_enhance_ops_blend_with_their_degenerate_image():
    x = photos(3)
    gray = x[:, 0] * 0.299 + x[:, 1] * 0.587 + x[:, 2] * 0.114
    assert torch.allclose(one(x, "brightness", 0.5, -1.0), x * 0.55)
    assert torch.allclose(one(x, "color", 1.0, -1.0), (gray[:, None] + 0.1 * (x - gray[:, None])).clamp(0, 255))
    mean = gray.mean(dim=(1, 2))[:, None, None, None]
    assert torch.allclose(one(x, "contrast", 1.0, 1.0), (mean + 1.9 * (x - mean)).clamp(0, 255), atol=1e-4)


def test_magnitude_zero_is_the_identity_for_every_op_but_the_parameter_free_ones():
    x = photos(len(OPS))
    ops = torch.arange(len(OPS))
    out = apply_ops(x, ops, torch.zeros(len(OPS)), torch.ones(len(OPS)))
    for k, name in enumerate(OPS):
        if name in ("autocontrast", "equalize"):
            assert not torch.equal(out[k], x[k])
        else:
            assert torch.allclose(out[k], x[k], atol=1e-3), name


def test_geometric_ops_move_pixels_as_defined():
    x = photos(1)
    shift = apply_ops(x, torch.tensor([OPS.index("translate_x")]), torch.tensor([4 / 16 / 0.45]), torch.tensor([-1.0]))
    assert torch.allclose(shift[0, :, :, 4:], x[0, :, :, :-4], atol=1e-3)  # content moved 4 px right
    assert torch.allclose(shift[0, :, :, :4], torch.zeros(3, 16, 4))  # black fill
    turned = one(x, "rotate", 3.0)  # 90 degrees
    assert torch.allclose(turned[0], x[0].rot90(1, dims=(1, 2)), atol=1e-3) or torch.allclose(
        turned[0], x[0].rot90(-1, dims=(1, 2)), atol=1e-3
    )


def test_batched_policy_equals_each_image_augmented_alone():
    x = photos(40)
    g = torch.Generator().manual_seed(5)
    ops = torch.randint(len(OPS), (40,), generator=g)
    mags, signs = torch.rand(40, generator=g), torch.where(torch.rand(40, generator=g) < 0.5, -1.0, 1.0)
    batched = apply_ops(x, ops, mags, signs)
    alone = torch.cat([apply_ops(x[i : i + 1], ops[i : i + 1], mags[i : i + 1], signs[i : i + 1]) for i in range(40)])
    assert torch.allclose(batched, alone, atol=1e-4)


def test_policies_change_images_reproducibly_and_stay_in_range():
    x = photos(32)
    a = trivial_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, trivial_augment(x, torch.Generator().manual_seed(0)))
    changed = (a != x).flatten(1).any(1).float().mean()
    assert 0.6 < changed < 1.0  # identity is 1 op in 14; some ops at a small magnitude barely move a pixel
    r = rand_augment(x, 2, 9.0, torch.Generator().manual_seed(0))
    assert (r != x).flatten(1).any(1).float().mean() > 0.8
    for out in (a, r):
        assert out.min() >= 0 and out.max() <= 255


def test_training_augmentation_applies_the_configured_ops():
    x = photos(16, 32)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = from_preset("tiny", flip=False, zoom=0.0)
    assert torch.equal(augment_for_training(x, plain.augment, g()), x)
    for change in (dict(crop="pad"), dict(policy="trivial"), dict(policy="randaugment"), dict(erase=1.0)):
        cfg = from_preset("tiny", flip=False, zoom=0.0, **change)
        out = augment_for_training(x, cfg.augment, g())
        assert out.shape == x.shape and not torch.equal(out, x), change
