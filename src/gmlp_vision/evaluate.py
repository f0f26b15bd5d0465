"""Inference and evaluation: logits for raw pixels, and the loss and accuracy of a model on a split.

What `predict`, `export`, the reports and training all use to run a model; nothing here imports training code, so
inference never loads it. ``evaluate`` is the tutorial's ``model.evaluate``: mean cross-entropy, top-1 and top-5
(`metrics`); the pixels are cast as ``precision`` says (`precision.Precision.cast`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gmlp_vision.images import resize
from gmlp_vision.metrics import summed_loss, topk_correct
from gmlp_vision.precision import Precision, precision_named
from gmlp_vision.runtime import SINGLE, Dist, unwrap


def infer(model: nn.Module, images: Tensor, precision: str | Precision = "fp32") -> Tensor:
    """Float32 logits of ``model`` (as it is: train or eval mode) for raw pixels on its device, resized to fit."""
    x = resize(images.float(), unwrap(model).cfg.image_size)
    return model(precision_named(precision).cast(x)).float()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 500,
    precision: str | Precision = "fp32",
    ctx: Dist = SINGLE,
) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy of ``model`` on uint8 ``images`` (moved to the model's device).

    Under torchrun each rank evaluates its contiguous share of the images and the sums are reduced over all ranks.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    images, labels = ctx.share(images), ctx.share(labels)
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        y = y.to(device)
        logits = infer(model, x.to(device), precision)
        c1, c5 = topk_correct(logits, y)
        loss = summed_loss(logits, y)
        sums[:3] += torch.stack([loss.double(), c1.double(), c5.double()])
    sums[3] = len(labels)
    model.train(was_training)
    loss, top1, top5, n = ctx.sum(sums).tolist()
    n = max(n, 1)
    return {"loss": loss / n, "acc": top1 / n, "top5": top5 / n}
