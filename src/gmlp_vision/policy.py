"""Automatic augmentation policies, batched: TrivialAugment (Müller & Hutter 2021) and RandAugment (Cubuk et al. 2020).

Both draw, per image, operations from one list (`OPS`) and apply them at a magnitude: TrivialAugment one op at a
magnitude ``U(0, 1)``, RandAugment ``n`` ops in a row (each always applied) at a fixed magnitude ``m / 10``.
Magnitude 1 is each op's strongest setting (`MAX`: RandAugment's published ranges, for both; TrivialAugment-wide's
wider ranges are not used); signed ops (shears, translations, rotation, the enhance factors) take a random sign per
image. The images are float (B, C, H, W) raw pixels in 0..255, on the training device.

Batched, not looped per image: each op runs once, on the images that drew it (an index subset of the batch); the
geometric ones (shear, translate, rotate) are one affine grid per image and a single ``grid_sample``, black fill.
Colour ops follow PIL's definitions (``ImageEnhance``, ``ImageOps``) in float, so they need no uint8 round trip.
Geometric ops act about the image centre (PIL and torchvision shear about the top-left corner), bilinear, black fill.
Each op is one ``nonzero`` over the batch: a host sync per op on GPUs (masks would avoid it; not measured here).
timm's RandAugment as DeiT runs it (op probability, magnitude noise, 15 other ops, mean fill) is `policy_timm`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

OPS = (
    "identity",
    "autocontrast",
    "equalize",
    "rotate",
    "solarize",
    "color",
    "posterize",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
GEOMETRIC = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})
# Strength at magnitude 1: degrees, shear slope, fraction of the image side, enhance factor offset, bits removed.
MAX = {
    "rotate": 30.0,
    "shear_x": 0.3,
    "shear_y": 0.3,
    "translate_x": 0.45,
    "translate_y": 0.45,
    "color": 0.9,
    "contrast": 0.9,
    "brightness": 0.9,
    "sharpness": 0.9,
    "posterize": 4.0,
    "solarize": 256.0,
}


def trivial_augment(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """TrivialAugment: one op per image, uniformly chosen, at a magnitude uniform in [0, 1]."""
    B, device = images.shape[0], images.device
    ops = torch.randint(len(OPS), (B,), device=device, generator=generator)
    mags = torch.rand(B, device=device, generator=generator)
    return apply_ops(images, ops, mags, _signs(B, device, generator))


def rand_augment(images: Tensor, n: int, magnitude: float, generator: torch.Generator | None = None) -> Tensor:
    """RandAugment: ``n`` ops in a row per image, each uniformly chosen, all at ``magnitude`` (0..10, 10 = `MAX`)."""
    B, device = images.shape[0], images.device
    mags = torch.full((B,), magnitude / 10.0, device=device)
    for _ in range(n):
        ops = torch.randint(len(OPS), (B,), device=device, generator=generator)
        images = apply_ops(images, ops, mags, _signs(B, device, generator))
    return images


def _signs(B: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    return torch.where(torch.rand(B, device=device, generator=generator) < 0.5, -1.0, 1.0)


def apply_ops(images: Tensor, ops: Tensor, mags: Tensor, signs: Tensor) -> Tensor:
    """Apply op ``OPS[ops[i]]`` at magnitude ``mags[i]`` (0..1) with sign ``signs[i]`` (+-1) to image ``i``."""
    out = images.clone()
    geometric = torch.zeros_like(ops, dtype=torch.bool)
    theta = torch.zeros(len(ops), 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    for k, name in enumerate(OPS):
        idx = (ops == k).nonzero()[:, 0]
        if name == "identity" or not len(idx):
            continue
        strength = mags[idx] * signs[idx] * MAX.get(name, 0.0)
        if name in GEOMETRIC:
            geometric[idx] = True
            theta[idx] = _affine(name, strength)
        else:
            out[idx] = COLOUR_OPS[name](images[idx], strength.abs() if name in ("posterize", "solarize") else strength)
    idx = geometric.nonzero()[:, 0]
    if len(idx):
        x = images[idx].float()
        grid = F.affine_grid(theta[idx], list(x.shape), align_corners=False)
        out[idx] = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(out.dtype)
    return out


def _affine(name: str, s: Tensor) -> Tensor:
    """Output-to-input maps (b, 2, 3) in grid_sample's normalised coordinates (square images)."""
    theta = torch.zeros(len(s), 2, 3, device=s.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if name == "rotate":
        a = s * (math.pi / 180.0)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    elif name == "shear_x":
        theta[:, 0, 1] = s
    elif name == "shear_y":
        theta[:, 1, 0] = s
    elif name == "translate_x":
        theta[:, 0, 2] = 2.0 * s  # the image spans 2 in normalised coordinates
    else:
        theta[:, 1, 2] = 2.0 * s
    return theta


def _gray(x: Tensor) -> Tensor:
    """PIL's "L" conversion (ITU-R 601-2 luma), (b, 1, H, W); a one-channel image is its own gray."""
    if x.shape[1] != 3:
        return x[:, :1]
    return (x * torch.tensor([0.299, 0.587, 0.114], device=x.device)[None, :, None, None]).sum(1, keepdim=True)


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance``: ``degenerate + factor * (x - degenerate)``, factor per image, clipped to 0..255."""
    return (degenerate + (1.0 + factor)[:, None, None, None] * (x - degenerate)).clamp(0.0, 255.0)


def _brightness(x: Tensor, s: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), s)


def _color(x: Tensor, s: Tensor) -> Tensor:
    return _blend(x, _gray(x).expand_as(x), s)


def _contrast(x: Tensor, s: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), s)


def _sharpness(x: Tensor, s: Tensor) -> Tensor:
    """Blend with PIL's SMOOTH filter (centre 5, neighbours 1, / 13) applied inside a 1-pixel border."""
    C, H, W = x.shape[1:]
    if min(H, W) < 3:  # all border: the filter leaves the image as it is
        return _blend(x, x, s)
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    smooth = F.conv2d(x, (kernel / 13.0).expand(C, 1, 3, 3), groups=C)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, s)


def _posterize(x: Tensor, bits_removed: Tensor) -> Tensor:
    """Keep the top ``8 - round(bits_removed)`` bits of each (rounded) pixel."""
    step = torch.exp2(bits_removed.round())[:, None, None, None]
    return torch.floor(x.round() / step) * step


def _solarize(x: Tensor, amount: Tensor) -> Tensor:
    """Invert the pixels at or above the threshold ``256 - amount``."""
    threshold = (256.0 - amount)[:, None, None, None]
    return torch.where(x >= threshold, 255.0 - x, x)


def _autocontrast(x: Tensor, _: Tensor) -> Tensor:
    """Stretch each channel to 0..255 (channels with one value are left alone)."""
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, ((x - lo) * (255.0 / span.clamp_min(1e-6))).clamp(0.0, 255.0), x)


def _equalize(x: Tensor, _: Tensor) -> Tensor:
    """PIL's ``ImageOps.equalize`` per image and channel, on the rounded pixels, via 256-bin histograms."""
    b, C, H, W = x.shape
    v = x.round().clamp(0, 255).long().reshape(b, C, H * W)
    hist = torch.zeros(b, C, 256, device=x.device).scatter_add_(2, v, torch.ones_like(v, dtype=torch.float32))
    last = (hist > 0) * torch.arange(256, device=x.device)  # the count of the highest occupied bin is left out
    step = torch.div(H * W - hist.gather(2, last.argmax(2, keepdim=True)), 255, rounding_mode="floor")
    before = hist.cumsum(2) - hist
    lut = torch.div(before + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1), rounding_mode="floor")
    out = lut.clamp(max=255).gather(2, v).reshape(b, C, H, W)
    return torch.where((step > 0)[..., None], out, x.round()).to(x.dtype)


# The colour ops by name, each ``(images, strength) -> images`` (strength per image; `policy_timm` uses them too).
COLOUR_OPS = {
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "solarize": _solarize,
    "color": _color,
    "posterize": _posterize,
    "contrast": _contrast,
    "brightness": _brightness,
    "sharpness": _sharpness,
}
