"""One optimiser step on a batch of uint8 images (resize, augment, forward, loss, backward, update), and the steppers.

A run picks its stepper once, at setup: `EagerStep` (this module: `train_step`'s code on each batch the source hands
it) or, on CUDA where `graphs.unsupported` allows, `graphs.GraphStep` (the same step captured as one CUDA graph per
batch size, `backward_step` plus the device-side update `optim.adamw_apply`). Both take a `batches.Batch` and add the
step's loss and top-k counts to the epoch's running sums (`metrics.add_metrics`).

fp16 (``--precision fp16``) scales the loss with the state's gradient scaler (`precision.Precision.scaler`). A step
whose gradients overflow is skipped by it: the weights and the optimiser's state (its own step count included) stay as
they were, and the scale halves. Everything else counts the batch as a step done: ``state.step``, the epoch's
position, the lr schedule (a function of that count), the weight average (it updates, towards the unchanged weights),
the periodic checkpoints and the epoch's metrics (the loss itself was finite). Only a non-finite loss stops training,
as in fp32 and bf16: an overflowing fp16 gradient is expected now and then (most often in the first steps, while the
scale comes down from 2^16) and is not an error.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gmlp_vision.augment import augment_for_training, mix_for_training
from gmlp_vision.batches import Batch
from gmlp_vision.config.core import Config
from gmlp_vision.images import resize
from gmlp_vision.metrics import METRICS, add_metrics, training_loss
from gmlp_vision.precision import precision_named


class Stepper(Protocol):
    """How the epoch loop runs a step: `EagerStep` or `graphs.GraphStep`, chosen once when the run starts.

    ``gathers``: the stepper takes batches of indices alone and gathers their images itself (inside its graph).
    ``nonfinite``: a device flag, set by a step whose loss was NaN or infinite since `begin_epoch`.
    """

    gathers: bool
    nonfinite: Tensor

    def begin_epoch(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Start (or continue) an epoch with its running ``sums`` (empty: zeros); returns the sums to keep."""
        ...

    def step(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """One optimiser step on ``batch``; returns every image's loss, and their sum over the readable images."""
        ...


class EagerStep:
    """`train_step` on each batch, as PyTorch runs it op by op (CPUs, torchrun, streamed files, fp16, policies).

    Args:
        model: the model as training runs it (possibly wrapped for data parallelism or compiled).
        optimizer: its optimiser.
        cfg: the run's config.
        generator: this rank's augmentation stream.
        scaler: fp16's gradient scaler (`precision.Precision.scaler`), else None.
    """

    gathers = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        generator: torch.Generator,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model, self.optimizer, self.cfg, self.generator, self.scaler = model, optimizer, cfg, generator, scaler
        self.sums: dict[str, Tensor] = {}
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=generator.device)

    def begin_epoch(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:  # noqa: D102 (as `Stepper`)
        device = self.generator.device
        self.sums = sums or {k: torch.zeros((), dtype=torch.float64, device=device) for k in METRICS}
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        return self.sums

    def step(self, batch: Batch) -> tuple[Tensor, Tensor]:  # noqa: D102 (as `Stepper`)
        x, y, readable = batch.images, batch.labels, batch.readable
        assert x is not None and y is not None
        step = (self.model, self.optimizer, x, y, self.cfg, self.generator)
        losses, logits = _step(*step, batch.weights(), batch.cropped, self.scaler)
        if not batch.weight:  # a stand-in image: this rank's share of a small last batch was empty
            return losses, losses.sum() if readable is None else (losses * readable).sum()
        return losses, add_metrics(self.sums, self.nonfinite, losses, logits, y, readable)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    generator: torch.Generator,
    *,
    weights: float | Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, Tensor]:
    """One optimiser step on a uint8 batch: resize, augment, forward, loss, backward, update.

    The batch goes through in ``cfg.optim.accum_steps`` micro-batches whose gradients add up (under DDP they are
    synchronised once, on the last).

    Args:
        weights: what each image's loss counts in the gradient: one float for all, or one per image (None:
            ``1 / len(labels)``, the batch mean; the loop passes ``world / global batch``, see `batches`).
        scaler: fp16's gradient scaler (`precision.Precision.scaler`; pass one with ``--precision fp16``): the loss is
            scaled, the gradients unscaled before ``--clip-grad``, and a step whose gradients overflow is skipped.

    Returns:
        Every image's loss and the float32 logits, both detached.
    """
    return _step(model, optimizer, images, labels, cfg, generator, weights, False, scaler)


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    generator: torch.Generator,
    weights: float | Tensor | None,
    cropped: bool,
    scaler: torch.amp.GradScaler | None,
) -> tuple[Tensor, Tensor]:
    """`train_step`, and `EagerStep`'s step on a batch that may hold streamed crops already (``cropped``)."""
    optimizer.zero_grad(set_to_none=True)
    out = backward_step(model, images, labels, cfg, generator, weights=weights, cropped=cropped, scaler=scaler)
    update(model, optimizer, cfg.optim.clip_grad, scaler)
    return out


def backward_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    generator: torch.Generator,
    *,
    weights: float | Tensor | None = None,
    cropped: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, Tensor]:
    """`train_step` up to the gradients: they are added to the parameters' ``.grad`` (None: set), nothing updated.

    ``cropped``: the images already are random-resized crops (streamed files); else ``--crop`` is applied here.

    Returns:
        Every image's loss and the float32 logits, both detached.
    """
    n, device, precision = len(labels), images.device, precision_named(cfg.run.precision)
    weights = (
        weights.to(device)
        if isinstance(weights, Tensor)
        else torch.full((n,), 1.0 / n if weights is None else weights, device=device)
    )
    parts = min(cfg.optim.accum_steps, n)
    ddp = _ddp(model)
    losses, outputs = [], []
    for j, (xb, yb, wb) in enumerate(zip(*(t.tensor_split(parts) for t in (images, labels, weights)), strict=True)):
        with ddp.no_sync() if ddp is not None and j + 1 < parts else nullcontext():
            x = resize(xb.float(), cfg.model.image_size)
            x = augment_for_training(x, cfg.augment, generator, cropped=cropped)
            x, targets = mix_for_training(x, yb, cfg.augment, generator)
            logits = model(precision.cast(x)).float()
            loss = training_loss(logits, targets, cfg.optim.label_smoothing)
            total = (loss * wb).sum()
            (total if scaler is None else scaler.scale(total)).backward()
        losses.append(loss.detach())
        outputs.append(logits.detach())
    return (losses[0], outputs[0]) if parts == 1 else (torch.cat(losses), torch.cat(outputs))


def update(
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
