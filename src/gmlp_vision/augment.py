"""Batched image augmentation on the training device, with an explicit `torch.Generator`.

Every op takes a whole batch (B, C, H, W) of float pixels and draws its per-image randomness as tensors, so there is no
per-image Python loop and no worker process. The tutorial's pipeline (README) is resize -> random horizontal flip ->
random zoom; zoom follows Keras' ``RandomZoom`` exactly: per image ``zx, zy ~ U(1 - f, 1 + f)``, the output pixel
``(x, y)`` samples the input at ``(zx (x - c_x) + c_x, zy (y - c_y) + c_y)`` around the image centre, bilinear, with
TF's "reflect" fill (``d c b a | a b c d``), which is ``grid_sample``'s reflection padding with ``align_corners=False``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gmlp_vision.config.groups import AugmentConfig
from gmlp_vision.metrics import Targets
from gmlp_vision.policy import rand_augment, trivial_augment
from gmlp_vision.policy_timm import rand_augment_timm


def flip_lr(images: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability ``p``."""
    mask = torch.rand(images.shape[0], device=images.device, generator=generator) < p
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def flips_at_random(aug: AugmentConfig) -> bool:
    """Whether the step mirrors images at random; with ``--flip-mode alternate`` the batch source mirrors them."""
    return aug.flip and aug.flip_mode == "random"


def alternates_flips(aug: AugmentConfig) -> bool:
    """Whether the batch source mirrors the images it hands out (`batches.alternating_flips`)."""
    return aug.flip and aug.flip_mode == "alternate"


def zoom(images: Tensor, factors: Tensor) -> Tensor:
    """Zoom each image about its centre by its own ``(zx, zy)`` row of ``factors`` (B, 2); > 1 shows less content.

    Args:
        images: (B, C, H, W) float pixels.
        factors: (B, 2) zoom factors, x (width) first, as Keras orders them.

    Returns:
        (B, C, H, W) zoomed images, same dtype.
    """
    B = images.shape[0]
    # In grid_sample's normalised coordinates (align_corners=False) the centre is 0, so the map is a pure scale.
    theta = torch.zeros(B, 2, 3, device=images.device, dtype=torch.float32)
    theta[:, 0, 0] = factors[:, 0]
    theta[:, 1, 1] = factors[:, 1]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.to(images.dtype)


def random_zoom(images: Tensor, amount: float, generator: torch.Generator | None = None) -> Tensor:
    """Zoom each image by factors drawn independently per axis from ``U(1 - amount, 1 + amount)``."""
    u = torch.rand(images.shape[0], 2, device=images.device, generator=generator)
    return zoom(images, 1.0 + amount * (2.0 * u - 1.0))


def random_resized_crop(
    images: Tensor,
    min_scale: float,
    generator: torch.Generator | None = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """Per image, a random crop (area fraction ~ U(min_scale, 1), log aspect ~ U(log ratio)) resized back to full size.

    Batched: one affine grid per image, bilinear sampling. A crop wider or taller than the image is clipped to it.
    """
    B, device = images.shape[0], images.device
    u = torch.rand(B, 4, device=device, generator=generator)
    area = min_scale + (1.0 - min_scale) * u[:, 0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the width and height
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    theta = torch.zeros(B, 2, 3, device=device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 1, 1] = w, h
    theta[:, 0, 2] = (1.0 - w) * (2.0 * u[:, 2] - 1.0)  # centre anywhere that keeps the crop inside
    theta[:, 1, 2] = (1.0 - h) * (2.0 * u[:, 3] - 1.0)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(
        images.dtype
    )


def mix_batch(
    images: Tensor, mixup_alpha: float, cutmix_alpha: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, float]:
    """Mixup or cutmix of a batch with itself reversed; returns the images, each one's partner index and ``lam``.

    The target of image ``i`` is ``lam * onehot(y[i]) + (1 - lam) * onehot(y[partner[i]])`` (label mass 1). Mixup
    blends whole images with ``lam ~ Beta(a, a)``; cutmix pastes the partner's box of area ``1 - lam`` (clipped to the
    image, ``lam`` then set to the exact kept fraction). With both alphas set, each batch picks one at random (p=0.5).
    ``lam`` is drawn from torch's global generator (saved in checkpoints with the rest of the run's RNG state).
    """
    B, _, H, W = images.shape
    partner = torch.arange(B - 1, -1, -1, device=images.device)
    coin = torch.rand((), device=images.device, generator=generator).item()
    cut = cutmix_alpha > 0 and (mixup_alpha <= 0 or coin < 0.5)
    alpha = cutmix_alpha if cut else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if not cut:
        return images * lam + images[partner] * (1.0 - lam), partner, lam
    h, w = round(H * math.sqrt(1.0 - lam)), round(W * math.sqrt(1.0 - lam))
    cy, cx = (
        torch.rand(2, generator=generator, device=images.device) * torch.tensor([H, W], device=images.device)
    ).tolist()
    y0, y1 = max(int(cy - h / 2), 0), min(int(cy + h / 2), H)
    x0, x1 = max(int(cx - w / 2), 0), min(int(cx + w / 2), W)
    out = images.clone()
    out[:, :, y0:y1, x0:x1] = images[partner][:, :, y0:y1, x0:x1]
    return out, partner, 1.0 - (y1 - y0) * (x1 - x0) / (H * W)


def augment_batch(
    images: Tensor, *, flip: bool, zoom_amount: float, generator: torch.Generator | None = None
) -> Tensor:
    """The tutorial's training augmentation on a float batch: horizontal flip, then random zoom."""
    if flip:
        images = flip_lr(images, generator)
    if zoom_amount > 0:
        images = random_zoom(images, zoom_amount, generator)
    return images


def random_crop_padded(images: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Per image, a random ``H`` x ``W`` window of the image reflect-padded by ``pad`` pixels on every side.

    The CIFAR classic (a random translation of up to ``pad`` pixels, reflected borders as in airbench), batched as one
    gather: window offsets are drawn per image, uniformly from ``0..2 pad`` on each axis.
    """
    if pad <= 0:
        return images
    B, C, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (B, 2), device=images.device, generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(H, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (offsets[:, 1, None] + torch.arange(W, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(B, device=images.device)[:, None, None, None]
    chans = torch.arange(C, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_erase(
    images: Tensor,
    p: float,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> Tensor:
    """Random erasing (Zhong et al. 2017), batched: with probability ``p`` per image, one box becomes noise.

    The box covers a fraction ``U(scale)`` of the image with log aspect ratio ``U(log ratio)``, clipped to the image,
    at a uniform position; its pixels are replaced by uniform random values in 0..255 (per-pixel noise like timm's
    "pixel" mode, which draws N(0, 1) after normalisation; here the pixels are raw, normalisation is in the model).
    A box larger than the image is clipped to it (timm redraws instead).
    """
    B, _, H, W = images.shape
    device = images.device
    u = torch.rand(B, 5, device=device, generator=generator)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * H * W
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    h = torch.sqrt(area * aspect).round().clamp(1, H)
    w = torch.sqrt(area / aspect).round().clamp(1, W)
    y0 = ((H - h + 1) * u[:, 2]).floor()
    x0 = ((W - w + 1) * u[:, 3]).floor()
    ys = torch.arange(H, device=device)[None, :, None]
    xs = torch.arange(W, device=device)[None, None, :]
    box = (ys >= y0[:, None, None]) & (ys < (y0 + h)[:, None, None]) & (xs >= x0[:, None, None])
    box &= (xs < (x0 + w)[:, None, None]) & (u[:, 4] < p)[:, None, None]
    noise = torch.rand(images.shape, device=device, generator=generator) * 255.0
    return torch.where(box[:, None], noise.to(images.dtype), images)


# The training pipeline: the one place that turns the augmentation config into ops.


def streams_crop(aug: AugmentConfig) -> bool:
    """Whether streamed image files are decoded as random-resized crops (then the batch is not cropped again)."""
    return aug.crop == "random-resized"


def augment_for_training(x: Tensor, aug: AugmentConfig, generator: torch.Generator, *, cropped: bool = False) -> Tensor:
    """The configured per-image augmentation of a float batch at the input size.

    In timm's order: crop, flip, the tutorial's zoom, the automatic policy, random erasing. Mixup and cutmix work on
    the whole batch and come after (`mix_for_training`). Alternating flips come mirrored from the batch source.
    """
    if streams_crop(aug) and not cropped:
        x = random_resized_crop(x, aug.crop_scale, generator)
    elif aug.crop == "pad":
        x = random_crop_padded(x, aug.crop_padding, generator)
    x = augment_batch(x, flip=flips_at_random(aug), zoom_amount=aug.zoom, generator=generator)
    if aug.policy == "trivial":
        x = trivial_augment(x, generator)
    elif aug.policy == "randaugment":
        x = rand_augment(x, aug.policy_ops, aug.policy_magnitude, generator)
    elif aug.policy == "randaugment-timm":
        x = rand_augment_timm(
            x,
            aug.policy_ops,
            aug.policy_magnitude,
            std=aug.policy_magnitude_std,
            prob=aug.policy_prob,
            generator=generator,
        )
    if aug.erase:
        x = random_erase(x, aug.erase, generator)
    return x


def mix_for_training(
    x: Tensor, labels: Tensor, aug: AugmentConfig, generator: torch.Generator
) -> tuple[Tensor, Targets]:
    """Mixup or cutmix of the batch when the config asks for it; returns the batch and the targets of its loss."""
    if not (aug.mixup or aug.cutmix):
        return x, (labels, None, 1.0)
    x, partner, lam = mix_batch(x, aug.mixup, aug.cutmix, generator)
    return x, (labels, partner, lam)
