"""Inference and evaluation: logits for raw pixels, and the loss and accuracy of a model on a split.

What `predict`, `export`, the reports and training all use to run a model; nothing here imports training code, so
inference never loads it. ``evaluate`` is the tutorial's ``model.evaluate``: mean cross-entropy, top-1 and top-5
(`metrics`); the pixels are cast as ``precision`` says (`precision.Precision.cast`).

Test-time augmentation (``tta``, `TTA_MODES`) averages the logits of several views of each image: ``flip`` the image
and its mirror (2 runs of the model), ``flip-shift`` also both of them moved 2 px up-left and 2 px down-right with
the edges reflected (6 runs), as the fastest CIFAR-10 trainers evaluate (airbench, hlb-CIFAR10). Mirroring suits
photos, not text or digits, so it is never on by itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmlp_vision.errors import ConfigError
from gmlp_vision.images import resize
from gmlp_vision.metrics import summed_loss, topk_correct
from gmlp_vision.precision import Precision, precision_named
from gmlp_vision.runtime import SINGLE, Dist, unwrap

TTA_MODES = ("none", "flip", "flip-shift")
TTA_SHIFT = 2  # pixels, for flip-shift


def check_tta(mode: str) -> None:
    """Raise `ConfigError` unless ``mode`` is one of `TTA_MODES`."""
    if mode not in TTA_MODES:
        raise ConfigError(f"--tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")


def tta_views(x: Tensor, mode: str = "none") -> list[Tensor]:
    """The views of a float batch (B, C, S, S) that test-time augmentation ``mode`` averages (the module docstring)."""
    check_tta(mode)
    views = [x] if mode == "none" else [x, x.flip(-1)]
    if mode == "flip-shift":
        size, s = x.shape[-1], TTA_SHIFT
        if min(x.shape[-2:]) <= s:
            raise ConfigError(f"--tta flip-shift moves images by {s} px: they must be larger, got {size} px")
        padded = F.pad(x, (s, s, s, s), mode="reflect")
        for start in (0, 2 * s):  # the content moves down-right, then up-left
            moved = padded[..., start : start + size, start : start + size]
            views += [moved, moved.flip(-1)]
    return views


def infer(model: nn.Module, images: Tensor, precision: str | Precision = "fp32", tta: str = "none") -> Tensor:
    """Float32 logits of ``model`` (as it is: train or eval mode) for raw pixels on its device, resized to fit.

    With ``tta`` other than ``none``, the mean of the logits of its views (`tta_views`).
    """
    x = resize(images.float(), unwrap(model).cfg.image_size)
    cast = precision_named(precision).cast
    views = tta_views(x, tta)
    if len(views) == 1:
        return model(cast(x)).float()
    return torch.stack([model(cast(v)).float() for v in views]).mean(dim=0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 500,
    precision: str | Precision = "fp32",
    ctx: Dist = SINGLE,
    tta: str = "none",
) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy of ``model`` on uint8 ``images`` (moved to the model's device).

    Under torchrun each rank evaluates its contiguous share of the images and the sums are reduced over all ranks.
    ``tta``: test-time augmentation (`TTA_MODES`), the logits of each image's views averaged.
    """
    check_tta(tta)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    images, labels = ctx.share(images), ctx.share(labels)
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        y = y.to(device)
        logits = infer(model, x.to(device), precision, tta)
        c1, c5 = topk_correct(logits, y)
        loss = summed_loss(logits, y)
        sums[:3] += torch.stack([loss.double(), c1.double(), c5.double()])
    sums[3] = len(labels)
    model.train(was_training)
    loss, top1, top5, n = ctx.sum(sums).tolist()
    n = max(n, 1)
    return {"loss": loss / n, "acc": top1 / n, "top5": top5 / n}
