"""Random crop with padding, random erasing and the batched TrivialAugment / RandAugment ops, against definitions;
timm's RandAugment (`policy_timm`) against timm's own outputs (tests/fixtures/timm, tools/timm_reference)."""

import functools
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from gmlp_vision import policy_timm as ra_timm
from gmlp_vision.augment import augment_for_training, random_crop_padded, random_erase
from gmlp_vision.config import from_preset
from gmlp_vision.config.groups import AugmentConfig
from gmlp_vision.errors import ConfigError
from gmlp_vision.policy import OPS, apply_ops, rand_augment, trivial_augment

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
    changes = (dict(crop="pad"), dict(policy="trivial"), dict(policy="randaugment"), dict(policy="randaugment-timm"))
    for change in (*changes, dict(erase=1.0)):
        cfg = from_preset("tiny", flip=False, zoom=0.0, **change)
        out = augment_for_training(x, cfg.augment, g())
        assert out.shape == x.shape and not torch.equal(out, x), change


# timm's RandAugment as DeiT runs it (rand-m9-mstd0.5-inc1), against timm's own ops.

TIMM_FIXTURE = Path(__file__).parent / "fixtures" / "timm" / "rand_augment.npz"


@functools.cache
def timm_reference() -> dict[str, np.ndarray]:
    with np.load(TIMM_FIXTURE) as f:
        return {k: f[k] for k in f.files}


def test_the_timm_fixture_is_deits_recipe_and_the_paper_presets_run_it():
    ref = timm_reference()
    assert json.loads(str(ref["meta"]))["config"] == "rand-m9-mstd0.5-inc1"
    assert tuple(ref["ops"]) == ra_timm.OPS  # the 15 of _RAND_INCREASING_TRANSFORMS, Invert and SolarizeAdd included
    assert tuple(ref["fill"]) == ra_timm.FILL  # timm's img_mean from ImageNet's mean, not black
    assert int(ref["resample"]) == Image.Resampling.BICUBIC
    timm_recipe = (int(ref["num_layers"]), float(ref["magnitude"]), float(ref["prob"]), float(ref["magnitude_std"]))
    assert timm_recipe == (2, 9.0, 0.5, 0.5)
    for preset in ("gmlp-ti", "gmlp-s", "gmlp-b"):
        aug = from_preset(preset).augment
        assert aug.policy == "randaugment-timm", preset
        assert (aug.policy_ops, aug.policy_magnitude, aug.policy_prob, aug.policy_magnitude_std) == timm_recipe
    defaults = inspect.signature(ra_timm.rand_augment_timm).parameters
    assert (defaults["prob"].default, defaults["std"].default) == timm_recipe[2:]
    aug = AugmentConfig()
    assert (aug.policy_prob, aug.policy_magnitude_std) == timm_recipe[2:]


def test_timm_op_arguments_equal_timms_level_functions_bit_for_bit():
    ref = timm_reference()
    cases = [torch.from_numpy(ref[f"case_{k}"]) for k in ("op", "magnitude", "negative")]
    args = ra_timm.op_args(*cases)
    assert args.dtype == torch.float64 and torch.equal(args, torch.from_numpy(ref["case_arg"]))
    assert ref["case_negative"].sum() == 9 * 3  # both signs of the 9 signed ops at each magnitude above 0


def test_timm_ops_match_timms_own_outputs():
    """Every case of the fixture (15 ops, magnitudes 0 / 3.3 / 9 / 10, both signs), batched in one call.

    PIL truncates each result to uint8, ours stays float: the lookup-table ops (Equalize, Invert, Posterize, Solarize,
    SolarizeAdd) are exact; AutoContrast, Brightness and the geometric ops are in [0, 1] above timm's (+-1e-3: our
    float32 against PIL's doubles). Geometric ops use PIL's own bicubic kernel (a = -1), edge clamping and fill rule,
    so the bound holds everywhere, edges and filled corners included. Color, Contrast and Sharpness blend with a
    degenerate image that PIL rounds to integers (the gray, the smoothed image: by up to 0.5; Contrast's mean of
    rounded grays: by up to 1), which moves the result by that much times |1 - factor| either way.
    """
    ref = timm_reference()
    images = torch.from_numpy(ref["images"]).permute(0, 3, 1, 2).float()
    ops, args = torch.from_numpy(ref["case_op"]), torch.from_numpy(ref["case_arg"])
    ours = ra_timm.apply_ops(images[torch.from_numpy(ref["case_image"])], ops, args)
    theirs = torch.from_numpy(ref["outputs"]).permute(0, 3, 1, 2).double()
    diff = ours.double() - theirs
    exact = {"Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"}
    for c, (k, arg) in enumerate(zip(ops.tolist(), args.tolist(), strict=True)):
        name = ra_timm.OPS[k]
        rounding = {"ColorIncreasing": 0.5, "SharpnessIncreasing": 0.5, "ContrastIncreasing": 1.0}.get(name, 0.0)
        slack = rounding * abs(1.0 - arg)
        lo, hi = (0.0, 0.0) if name in exact else (-slack - 1e-3, 1.0 + slack + 1e-3)
        assert lo <= diff[c].min() and diff[c].max() <= hi, (c, name, arg, diff[c].min(), diff[c].max())
    assert (theirs != images[torch.from_numpy(ref["case_image"])]).flatten(1).any(1).float().mean() > 0.8
    corner = [c for c in range(len(ops)) if ra_timm.OPS[ops[c]] == "Rotate" and abs(args[c]) == 30.0]
    fill = torch.tensor(ra_timm.FILL, dtype=torch.float64)
    for c in corner:  # a 30 degree turn uncovers the corners: both fill them with the mean colour
        assert torch.equal(theirs[c, :, 0, 0], fill) and torch.equal(ours[c, :, 0, 0].double(), fill)


def test_timm_geometric_ops_fill_with_the_mean_colour():
    x = photos(2, 16)
    shift = ra_timm.OPS.index("TranslateXRel")
    out = ra_timm.apply_ops(x, torch.tensor([shift, shift]), torch.tensor([0.25, -0.25], dtype=torch.float64))
    fill = torch.tensor(ra_timm.FILL, dtype=torch.float32)[:, None, None].expand(3, 16, 4)
    assert torch.equal(out[0, :, :, :12], x[0, :, :, 4:]) and torch.equal(out[0, :, :, 12:], fill)  # 4 px left
    assert torch.equal(out[1, :, :, 4:], x[1, :, :, :12]) and torch.equal(out[1, :, :, :4], fill)
    gray = ra_timm.apply_ops(x[:, :1], torch.tensor([shift, shift]), torch.tensor([0.25, -0.25], dtype=torch.float64))
    assert torch.allclose(gray[0, 0, :, 12:], torch.tensor(124 * 0.299 + 116 * 0.587 + 104 * 0.114))


def test_timm_layer_draws_follow_timms_distributions():
    """Per image and layer: op uniform over 15, applied with probability 0.5, magnitude N(9, 0.5) clipped to 0..10."""
    n, cpu = 60_000, torch.device("cpu")
    ops, mags, negative = ra_timm.draw_layer(n, 9.0, 0.5, 0.5, cpu, torch.Generator().manual_seed(0))
    applied = ops >= 0
    assert abs(applied.float().mean() - 0.5) < 0.01  # the estimate's std is 0.002
    counts = torch.bincount(ops[applied], minlength=len(ra_timm.OPS)).double()
    expected = applied.sum() / len(ra_timm.OPS)
    assert ((counts - expected) ** 2 / expected).sum() < 36.1  # chi-square, 14 degrees of freedom: p = 0.001
    assert mags.dtype == torch.float64 and mags.min() >= 0.0 and mags.max() == 10.0
    assert abs((mags == 10.0).double().mean() - 0.02275) < 0.004  # P(N(9, 0.5) > 10) = P(z > 2)
    assert abs(negative.float().mean() - 0.5) < 0.01
    _, free, _ = ra_timm.draw_layer(n, 5.0, 0.5, 0.5, cpu, torch.Generator().manual_seed(1))  # no clipping at 5
    assert abs(free.mean() - 5.0) < 0.01 and abs(free.std() - 0.5) < 0.01
    always, fixed, _ = ra_timm.draw_layer(1000, 9.0, 0.0, 1.0, cpu, torch.Generator().manual_seed(2))
    assert (always >= 0).all() and (fixed == 9.0).all()
    never, _, _ = ra_timm.draw_layer(1000, 9.0, 0.5, 0.0, cpu, torch.Generator().manual_seed(2))
    assert (never == -1).all()


def test_timm_policy_is_its_draws_applied_in_a_row_and_applies_about_half_the_ops():
    x = photos(2000, 8).clamp(30, 220)  # no channel spans 0..255 already, so that every op changes every image
    out = ra_timm.rand_augment_timm(x, 2, 9.0, generator=torch.Generator().manual_seed(0))
    g, again = torch.Generator().manual_seed(0), x
    for _ in range(2):
        ops, mags, negative = ra_timm.draw_layer(len(x), 9.0, 0.5, 0.5, x.device, g)
        again = ra_timm.apply_ops(again, ops, ra_timm.op_args(ops, mags, negative))
    assert torch.equal(out, again)
    assert out.min() >= 0 and out.max() <= 255
    one = ra_timm.rand_augment_timm(x, 1, 9.0, generator=torch.Generator().manual_seed(3))
    changed = (one != x).flatten(1).any(1).float().mean()
    assert 0.45 < changed < 0.55  # the op's probability, 0.5 (std of the estimate 0.011)
    assert torch.equal(ra_timm.rand_augment_timm(x, 1, 9.0, prob=0.0, generator=torch.Generator()), x)


def test_timm_batched_ops_equal_each_image_alone():
    x = photos(45)
    g = torch.Generator().manual_seed(5)
    ops, mags, negative = ra_timm.draw_layer(45, 7.0, 2.0, 0.8, x.device, g)
    args = ra_timm.op_args(ops, mags, negative)
    batched = ra_timm.apply_ops(x, ops, args)
    alone = torch.cat([ra_timm.apply_ops(x[i : i + 1], ops[i : i + 1], args[i : i + 1]) for i in range(45)])
    assert torch.allclose(batched, alone, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(policy_prob=1.5), "--policy-prob is a probability"),
        (dict(policy_prob=-0.1), "--policy-prob is a probability"),
        (dict(policy_magnitude_std=-0.5), "--policy-magnitude-std must be in 0..100"),
        (dict(policy_magnitude_std=150.0), "--policy-magnitude-std must be in 0..100"),
        (dict(policy="randaugment-tf"), "--policy must be one of"),
    ],
)
def test_timm_policy_flags_are_checked(change, message):
    with pytest.raises(ConfigError, match=message):
        AugmentConfig(**change)


def test_policies_take_images_smaller_than_the_sharpness_filter():
    """PIL's SMOOTH filter leaves images under 3 px as they are, so Sharpness does too (it used to raise)."""
    x = photos(30, 2)[..., :1]  # (30, 3, 2, 1)
    assert torch.equal(one(x, "sharpness", 1.0), x) and torch.equal(one(x, "sharpness", 1.0, -1.0), x)
    sharp = ra_timm.OPS.index("SharpnessIncreasing")
    assert torch.equal(ra_timm.apply_ops(x, torch.full((30,), sharp), torch.full((30,), 1.9, dtype=torch.float64)), x)
    for out in (
        trivial_augment(x, torch.Generator().manual_seed(0)),
        rand_augment(x, 2, 9.0, torch.Generator().manual_seed(0)),
        ra_timm.rand_augment_timm(x, 2, 9.0, generator=torch.Generator().manual_seed(0)),
    ):
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
