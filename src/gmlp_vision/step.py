"""One optimiser step on a batch of uint8 images: resize, augment, forward, loss, backward, update.

`train_step` is the eager step the epoch loop (`loop`) runs; `backward_step` is its first half (gradients, no update),
which `graphs` captures together with the device-side update (`optim.adamw_apply`) as one CUDA graph.

fp16 (``--precision fp16``) scales the loss with the state's gradient scaler (`state.gradient_scaler`). A step whose
gradients overflow is skipped by it: the weights and the optimiser's state (its own step count included) stay as
they were, and the scale halves. Everything else counts the batch as a step done: ``state.step``, the epoch's
position, the lr schedule (a function of that count), the weight average (it updates, towards the unchanged weights),
the periodic checkpoints and the epoch's metrics (the loss itself was finite). Only a non-finite loss stops training,
as in fp32 and bf16: an overflowing fp16 gradient is expected now and then (most often in the first steps, while the
scale comes down from 2^16) and is not an error.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gmlp_vision.augment import augment_for_training, mix_for_training, training_loss
from gmlp_vision.config.core import Config
from gmlp_vision.evaluate import compute_input, topk_correct
from gmlp_vision.images import resize


@dataclass(frozen=True)
class BatchInfo:
    """What the epoch loop knows of a batch besides its pixels and labels; the defaults describe a plain batch.

    ``weight``: what each image's loss counts in the gradient: one float for all, or one per image (None:
    ``1 / len(labels)``, the batch mean; the distributed loop passes ``world / global batch``, see `distributed`, and
    0 for unreadable streamed files). ``cropped``: the images already are random-resized crops (streamed files); else
    ``--crop`` is applied in the step.
    """

    weight: float | Tensor | None = None
    cropped: bool = False


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    generator: torch.Generator,
    *,
    batch: BatchInfo | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, Tensor]:
    """One optimiser step on a uint8 batch: resize, augment, forward, loss, backward, update.

    The batch goes through in ``cfg.optim.accum_steps`` micro-batches whose gradients add up (under DDP they are
    synchronised once, on the last).

    Args:
        batch: each image's weight in the gradient, and whether the images are crops already (default: the mean).
        scaler: fp16's gradient scaler (`state.gradient_scaler`; pass one with ``--precision fp16``): the loss is
            scaled, the gradients unscaled before ``--clip-grad``, and a step whose gradients overflow is skipped.

    Returns:
        Every image's loss and the float32 logits, both detached.
    """
    optimizer.zero_grad(set_to_none=True)
    out = backward_step(model, images, labels, cfg, generator, batch=batch, scaler=scaler)
    _update(model, optimizer, cfg.optim.clip_grad, scaler)
    return out


def backward_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    generator: torch.Generator,
    *,
    batch: BatchInfo | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, Tensor]:
    """`train_step` up to the gradients: they are added to the parameters' ``.grad`` (None: set), nothing updated.

    Returns:
        Every image's loss and the float32 logits, both detached.
    """
    n, device = len(labels), images.device
    batch = batch or BatchInfo()
    weight = batch.weight
    weights = (
        weight.to(device)
        if isinstance(weight, Tensor)
        else torch.full((n,), 1.0 / n if weight is None else weight, device=device)
    )
    parts = min(cfg.optim.accum_steps, n)
    ddp = _ddp(model)
    losses, outputs = [], []
    for j, (xb, yb, wb) in enumerate(zip(*(t.tensor_split(parts) for t in (images, labels, weights)), strict=True)):
        with ddp.no_sync() if ddp is not None and j + 1 < parts else nullcontext():
            x = resize(xb.float(), cfg.model.image_size)
            x = augment_for_training(x, cfg.augment, generator, cropped=batch.cropped)
            x, targets = mix_for_training(x, yb, cfg.augment, generator)
            logits = model(compute_input(x, cfg.run.precision)).float()
            loss = training_loss(logits, targets, cfg.optim.label_smoothing)
            total = (loss * wb).sum()
            (total if scaler is None else scaler.scale(total)).backward()
        losses.append(loss.detach())
        outputs.append(logits.detach())
    return (losses[0], outputs[0]) if parts == 1 else (torch.cat(losses), torch.cat(outputs))


def _update(
    model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float, scaler: torch.amp.GradScaler | None
) -> None:
    """Clip and apply the gradients; a scaler unscales them first and skips the update when they overflowed."""
    if scaler is not None and clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)  # checks the gradients for inf/NaN (unscaling them if not done above) and skips if any
    scaler.update()


def _ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper of ``model`` (possibly inside a ``torch.compile`` wrapper), if any."""
    while not isinstance(model, DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model


METRICS = ("loss", "acc", "top5")  # an epoch's running sums (`state.EpochProgress`), in this order


@torch.no_grad()
def add_metrics(
    sums: dict[str, Tensor], nonfinite: Tensor, losses: Tensor, logits: Tensor, labels: Tensor, mask: Tensor | None
) -> Tensor:
    """Add a step's loss sum and top-1 / top-5 counts (rows in ``mask``) to ``sums``; flag a non-finite loss.

    Returns:
        The step's loss sum (a device scalar), counted in ``nonfinite`` (in place) when it is NaN or infinite.
    """
    loss = losses.sum() if mask is None else (losses * mask).sum()
    nonfinite |= ~torch.isfinite(loss)
    top1, top5 = topk_correct(logits, labels, mask)
    sums["loss"] += loss
    sums["acc"] += top1
    sums["top5"] += top5
    return loss
