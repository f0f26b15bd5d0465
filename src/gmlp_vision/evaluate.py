"""Inference and evaluation: logits for raw pixels, top-k counts, and the loss and accuracy of a model on a split.

What `predict`, `export`, the reports and training all use to run a model; nothing here imports training code, so
inference never loads it. ``evaluate`` is the tutorial's ``model.evaluate``: mean cross-entropy, top-1 and top-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmlp_vision.images import resize
from gmlp_vision.runtime import SINGLE, Dist, unwrap

# The half-precision ``--precision`` values and their dtypes; anything else computes in fp32.
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_input(images: Tensor, precision: str) -> Tensor:
    """Float pixels in the dtype the model should compute in (`GMLP.normalize`): bf16 or fp16 as ``precision`` says.

    The model casts its fp32 master weights to that dtype on use (no autocast); its layer norms accumulate their
    statistics in fp32, and the logits come back to fp32 before the loss and the predicted probabilities, so fp16 only
    adds a gradient scaler in training (`step.train_step`).
    """
    dtype = HALF_DTYPES.get(precision)
    return images.to(dtype) if dtype is not None else images.float()


def topk_correct(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Counts of correct top-1 and top-5 predictions (top-k over min(5, classes)), over the rows in ``mask``."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    if mask is not None:
        hits &= mask[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def infer(model: nn.Module, images: Tensor, precision: str = "fp32") -> Tensor:
    """Float32 logits of ``model`` (as it is: train or eval mode) for raw pixels on its device, resized to fit."""
    x = resize(images.float(), unwrap(model).cfg.image_size)
    return model(compute_input(x, precision)).float()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 500,
    precision: str = "fp32",
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
        loss = F.cross_entropy(logits, y, reduction="sum")
        sums[:3] += torch.stack([loss.double(), c1.double(), c5.double()])
    sums[3] = len(labels)
    model.train(was_training)
    loss, top1, top5, n = ctx.sum(sums).tolist()
    n = max(n, 1)
    return {"loss": loss / n, "acc": top1 / n, "top5": top5 / n}
