"""RandAugment as DeiT runs it (Touvron et al. 2021): timm's ``rand-m9-mstd0.5-inc1``, batched on the device.

The recipe (timm's ``auto_augment.py``: ``rand_augment_transform``, ``AugmentOp``, ``_RAND_INCREASING_TRANSFORMS``),
per image and per layer (``n`` layers): one of the 15 ops of the "increasing" set (`OPS`, timm's names), chosen
uniformly with replacement, is applied with probability ``prob`` (0.5) at a magnitude ``N(m, std)`` (std 0.5) clipped
to 0..10, which timm's level functions turn into the op's argument (`op_args`; rotations, shears, translations and
the enhance factors take a random sign). Geometric ops are PIL affine maps, shears about the top-left corner and
rotations about the centre, translations a fraction of the side (``translate_pct`` 0.45: the set's "Rel" ops),
resampled bicubic as DeiT asks (``--train-interpolation bicubic``) and filled with the mean colour (`FILL`).

Checked against timm's own ops at fixed parameters (``tests/fixtures/timm/``, made by ``tools/timm_reference/``).
What differs, and why:
- pixels stay float from op to op; PIL truncates to uint8 after each op, so an op's output here is up to 1 level above
  PIL's (the enhance ops also blend with an unrounded gray or mean: up to about 1 more; the test states each bound);
- bicubic only: timm's own default ("random") picks bilinear or bicubic per op; DeiT fixes bicubic;
- `FILL` is ImageNet's mean colour whatever the dataset, as DeiT normalises (timm's ``img_mean``); its gray for images
  without 3 channels;
- the random numbers come from the torch generator, not Python's ``random``: the same distributions, other draws;
- timm's uniform magnitude (``mstd`` > 100) and ``mmax`` are not offered;
- PosterizeIncreasing at magnitude 10 (the clip catches about 2 % of the noisy magnitudes) keeps 0 bits: a black
  image, as older Pillow gives; Pillow 13 refuses 0 bits, so timm raises there (the fixture emulates the old Pillow).

Batched like `policy`: per layer each op runs once, on the images that drew it, and all geometric ops share one
sampling pass; the colour ops are `policy.COLOUR_OPS` (PIL's definitions in float). Each op is one ``nonzero`` over
the batch (a host sync on GPUs, as in `policy`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gmlp_vision.policy import COLOUR_OPS

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
GEOMETRIC = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
# The enhance ops and the `policy` op that blends the same way (factor - 1 is its strength).
ENHANCE = {
    "ColorIncreasing": "color",
    "ContrastIncreasing": "contrast",
    "BrightnessIncreasing": "brightness",
    "SharpnessIncreasing": "sharpness",
}
# timm's ``img_mean``: round(255 * IMAGENET_DEFAULT_MEAN), the normalisation mean DeiT trains with.
FILL = (124, 116, 104)
TRANSLATE_PCT = 0.45  # timm's default ``translate_pct``: the largest shift, a fraction of the side


def rand_augment_timm(
    images: Tensor,
    n: int,
    magnitude: float,
    *,
    std: float = 0.5,
    prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RandAugment as timm's ``rand-m{magnitude}-n{n}-mstd{std}-inc1`` (op probability ``prob``), on a float batch.

    Args:
        images: (B, C, H, W) float pixels in 0..255.
        n: layers: ops drawn in a row for each image (with replacement), each applied with probability ``prob``.
        magnitude: the mean magnitude, 0..10.
        std: standard deviation of the Gaussian noise added to the magnitude per image and layer (0: none); the
            noisy magnitude is clipped to 0..10.
        prob: probability that a drawn op is applied.
        generator: the random stream.

    Returns:
        The augmented (B, C, H, W) batch, float pixels in 0..255.
    """
    for _ in range(n):
        ops, mags, negative = draw_layer(images.shape[0], magnitude, std, prob, images.device, generator)
        images = apply_ops(images, ops, op_args(ops, mags, negative))
    return images


def draw_layer(
    B: int, magnitude: float, std: float, prob: float, device: torch.device, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's random choices for ``B`` images, as timm's ``RandAugment`` and ``AugmentOp`` make them.

    Returns:
        Each image's op (an index into `OPS`, uniform; -1 where it is not applied, probability ``1 - prob``), its
        magnitude (float64, ``N(magnitude, std)`` clipped to 0..10) and whether a signed op's argument is negated
        (probability 0.5).
    """
    ops = torch.randint(len(OPS), (B,), device=device, generator=generator)
    applied = torch.rand(B, device=device, generator=generator) < prob
    noise = torch.randn(B, device=device, generator=generator, dtype=torch.float64)
    mags = (magnitude + std * noise).clamp(0.0, 10.0)
    negative = torch.rand(B, device=device, generator=generator) < 0.5
    return torch.where(applied, ops, -1), mags, negative


def op_args(ops: Tensor, mags: Tensor, negative: Tensor) -> Tensor:
    """Each image's op argument at its magnitude by timm's level functions, in float64 like Python's floats.

    Args:
        ops: (B,) indices into `OPS`.
        mags: (B,) magnitudes, 0..10.
        negative: (B,) whether a signed op's argument is negated (timm's ``_randomly_negate``).

    Returns:
        (B,) float64: degrees (Rotate, counter-clockwise), bits kept (Posterize), threshold (Solarize), the value
        added (SolarizeAdd), the enhance factor (1: unchanged), the shear slope, the shift as a fraction of the side;
        0 for AutoContrast, Equalize and Invert.
    """
    level = mags.double() / 10.0
    sign = torch.where(negative, -1.0, 1.0).to(level)
    signed = {
        "Rotate": 30.0,
        "ShearX": 0.3,
        "ShearY": 0.3,
        "TranslateXRel": TRANSLATE_PCT,
        "TranslateYRel": TRANSLATE_PCT,
    }
    out = torch.zeros_like(level)
    for k, name in enumerate(OPS):
        if name in signed:
            arg = level * signed[name] * sign
        elif name in ENHANCE:
            arg = (1.0 + sign * (level * 0.9)).clamp(min=0.1)
        elif name == "PosterizeIncreasing":
            arg = 4.0 - (level * 4.0).floor()  # int() of a non-negative value
        elif name == "SolarizeIncreasing":
            arg = 256.0 - (level * 256.0).floor().clamp(max=256.0)
        elif name == "SolarizeAdd":
            arg = (level * 110.0).floor().clamp(max=128.0)
        else:
            continue
        out = torch.where(ops == k, arg, out)
    return out


def apply_ops(images: Tensor, ops: Tensor, args: Tensor) -> Tensor:
    """Apply op ``OPS[ops[i]]`` with argument ``args[i]`` (see `op_args`) to image ``i``; ``ops[i] == -1`` skips it."""
    out = images.clone()
    H, W = images.shape[-2:]
    geometric = torch.zeros_like(ops, dtype=torch.bool)
    maps = torch.zeros(len(ops), 6, dtype=torch.float64, device=images.device)
    for k, name in enumerate(OPS):
        idx = (ops == k).nonzero()[:, 0]
        if not len(idx):
            continue
        if name in GEOMETRIC:
            geometric[idx] = True
            maps[idx] = _affine_map(name, args[idx].double(), H, W)
        else:
            out[idx] = _colour(name, images[idx], args[idx].to(images.dtype))
    idx = geometric.nonzero()[:, 0]
    if len(idx):
        out[idx] = affine_bicubic(images[idx], maps[idx]).to(out.dtype)
    return out


def _colour(name: str, x: Tensor, arg: Tensor) -> Tensor:
    """A colour op on a float batch (b, C, H, W), each image with its own argument."""
    if name == "Invert":
        return 255.0 - x
    if name == "SolarizeAdd":  # timm's LUT: add to the pixels below 128, saturating at 255
        return torch.where(x < 128.0, (x + arg[:, None, None, None]).clamp(max=255.0), x)
    if name == "PosterizeIncreasing":
        return COLOUR_OPS["posterize"](x, 8.0 - arg)  # `policy` takes the bits removed
    if name == "SolarizeIncreasing":
        return COLOUR_OPS["solarize"](x, 256.0 - arg)  # `policy` takes 256 - threshold
    if name in ENHANCE:
        return COLOUR_OPS[ENHANCE[name]](x, arg - 1.0)
    return COLOUR_OPS[name.lower()](x, arg)  # AutoContrast, Equalize


def _affine_map(name: str, a: Tensor, H: int, W: int) -> Tensor:
    """PIL's affine data ``(a, b, c, d, e, f)`` (output to input, pixel units) of each image, (b, 6) float64."""
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if name == "Rotate":  # Image.rotate: about the centre (W / 2, H / 2)
        t = -torch.deg2rad(a)
        cos, sin, cx, cy = t.cos(), t.sin(), W / 2.0, H / 2.0
        rows = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    elif name == "ShearX":
        rows = (one, a, zero, zero, one, zero)
    elif name == "ShearY":
        rows = (one, zero, zero, a, one, zero)
    elif name == "TranslateXRel":
        rows = (one, zero, a * W, zero, one, zero)
    else:
        rows = (one, zero, zero, zero, one, a * H)
    return torch.stack(rows, dim=1)


def affine_bicubic(x: Tensor, maps: Tensor) -> Tensor:
    """PIL's ``Image.transform(size, AFFINE, data, BICUBIC, fillcolor=FILL)``, batched.

    The output pixel centred at ``(x, y)`` (``x + 0.5``, ``y + 0.5`` for pixel ``x, y``) samples the input at
    ``(a x + b y + c, d x + e y + f)``: outside the image it gets `FILL`, inside, PIL's cubic convolution (``a = -1``)
    of its 4 x 4 neighbours, clamped at the edges, clipped to 0..255 (not truncated to an integer). The edge clamp is
    a 2-pixel replicate padding, so that the 16 taps are one base index plus constant offsets.

    Args:
        x: (b, C, H, W) float pixels.
        maps: (b, 6) affine data per image (`_affine_map`), float64 like PIL's.

    Returns:
        (b, C, H, W) float32 pixels.
    """
    b, C, H, W = x.shape
    grid = dict(device=x.device, dtype=torch.float64)
    cols, rows = torch.arange(W, **grid) + 0.5, torch.arange(H, **grid)[:, None] + 0.5
    m = maps[:, :, None, None]
    u = m[:, 0] * cols + m[:, 1] * rows + m[:, 2]  # (b, H, W) input coordinates, in pixels
    v = m[:, 3] * cols + m[:, 4] * rows + m[:, 5]
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    u0, v0 = (u - 0.5).floor(), (v - 0.5).floor()  # -1..size-1 inside: its taps -1..2 lie within the padding
    wx = _cubic_weights(u - 0.5 - u0).reshape(4, b, 1, H * W)
    wy = _cubic_weights(v - 0.5 - v0).reshape(4, b, 1, H * W)
    Wp = W + 4
    base = ((v0.clamp(-1, H - 1) + 1) * Wp + u0.clamp(-1, W - 1) + 1).long().reshape(b, 1, H * W)  # tap (-1, -1)
    flat = F.pad(x.float(), (2, 2, 2, 2), mode="replicate").reshape(b, C, (H + 4) * Wp)
    out = torch.zeros(b, C, H * W, device=x.device)
    for i in range(4):
        row = torch.zeros_like(out)
        for j in range(4):
            row += wx[j] * flat.gather(2, (base + (i * Wp + j)).expand(b, C, H * W))
        out += wy[i] * row
    out = out.reshape(b, C, H, W).clamp(0.0, 255.0)
    return torch.where(inside[:, None], out, _fill(C, x.device)[None, :, None, None])


def _cubic_weights(d: Tensor) -> Tensor:
    """PIL's bicubic (Keys, a = -1) weights of the neighbours at -1, 0, 1, 2 for offsets ``d`` in [0, 1), float32."""
    d = d.float()
    e = 1.0 - d
    return torch.stack((-d * e * e, 1.0 - 2.0 * d * d + d * d * d, d + d * d - d * d * d, -d * d * e))


def _fill(C: int, device: torch.device) -> Tensor:
    """`FILL` for ``C`` channels: the colour for 3, its gray (PIL's "L" weights) for any other count."""
    fill = torch.tensor(FILL, dtype=torch.float32, device=device)
    if C == 3:
        return fill
    return (fill * torch.tensor([0.299, 0.587, 0.114], device=device)).sum().expand(C)
