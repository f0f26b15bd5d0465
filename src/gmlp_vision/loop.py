"""The training loop's inner parts: one optimiser step, and one epoch of steps over a `state.TrainState`.

An epoch is one permutation of the training images and a batch an index slice of it (`state.EpochProgress`, which a
checkpoint saves so that an interrupted epoch continues exactly); each step augments on the device (`augment`), runs
the model, and updates it. `train.train` runs the epochs around these.

fp16 (``--precision fp16``) scales the loss with the state's gradient scaler (`state.gradient_scaler`). A step whose
gradients overflow is skipped by it: the weights and the optimiser's state (its own step count included) stay as
they were, and the scale halves. Everything else counts the batch as a step done: ``state.step``, the epoch's
position, the lr schedule (a function of that count), the weight average (it updates, towards the unchanged weights),
the periodic checkpoints and the epoch's metrics (the loss itself was finite). Only a non-finite loss stops training,
as in fp32 and bf16: an overflowing fp16 gradient is expected now and then (most often in the first steps, while the
scale comes down from 2^16) and is not an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gmlp_vision.augment import augment_for_training, mix_for_training, streams_crop, training_loss
from gmlp_vision.config import Config
from gmlp_vision.data.stream import ImageFiles
from gmlp_vision.distributed import Dist
from gmlp_vision.errors import NonFiniteLossError
from gmlp_vision.evaluate import compute_input, topk_correct
from gmlp_vision.images import resize
from gmlp_vision.optim import LrSchedule
from gmlp_vision.state import METRICS, EpochProgress, TrainState


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
    optimizer.zero_grad(set_to_none=True)
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
    _update(model, optimizer, cfg.optim.clip_grad, scaler)
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


def train_one_epoch(
    state: TrainState,
    images: Tensor | ImageFiles,
    labels: Tensor,
    progress: EpochProgress | None = None,
    bar: tqdm | None = None,
) -> dict[str, float]:
    """One pass over ``images`` (uint8 on the device, or streamed files) in shuffled batches of ``state``'s model.

    Under torchrun every rank passes the whole training set and the same permutation, trains on its share of each
    global batch (`Dist.share`), and gets metrics summed over all ranks. After every step ``state.after_step`` runs
    (weight average, checkpoints, a requested stop); ``state.step`` counts the steps.

    Args:
        progress: continue a partly done epoch (permutation, position, running sums); default: a new permutation.
        bar: a progress bar advanced once per step.

    Returns:
        The epoch's mean loss, top-1 and top-5 accuracy over every rank's images.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (checked every step on CPU, every 50 on GPUs).
        TrainingInterrupted: a stop was requested (SIGINT or SIGTERM); ``last.pt`` was saved at this step.
    """
    cfg, ctx, device, n = state.cfg, state.ctx, labels.device, len(labels)
    state.model.train()
    if progress is None:
        progress = EpochProgress(torch.randperm(n, generator=state.order).to(device), step=state.step)
    if not progress.sums:
        progress.sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in METRICS}
    batches = progress.perm.split(cfg.optim.batch_size)
    plan = _plan(batches, progress.batch, ctx)
    fetched = _fetch(images, [mine for _, mine, _ in plan], cfg, progress.step)
    schedule = LrSchedule.from_config(cfg.optim, len(batches))
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    check_every = 1 if device.type == "cpu" else 50  # .item() and collectives sync the device: not every step on GPUs
    shown = _BarPostfix(bar)
    for (i, mine, weight), (x, readable) in zip(plan, fetched, strict=True):
        schedule.apply(state.optimizer, progress.step)
        y = labels[mine]
        weights = torch.full((len(mine),), weight, device=device)
        if readable is not None:
            weights *= readable  # an unreadable streamed file (--skip-bad-images) counts for nothing
        batch = BatchInfo(weights, cropped=readable is not None and streams_crop(cfg.augment))
        losses, logits = train_step(
            state.model, state.optimizer, x, y, cfg, state.generator, batch=batch, scaler=state.scaler
        )
        progress.batch, progress.step = i + 1, progress.step + 1
        loss = losses.sum() if readable is None else (losses * readable).sum()
        if weight:
            with torch.no_grad():
                nonfinite |= ~torch.isfinite(loss)
                _add(progress.sums, loss, *topk_correct(logits, y, readable))
        check = progress.step % check_every == 0 or i + 1 == len(batches)
        stop = _check(state, nonfinite, loss, check, check_every == 1, progress)
        shown.step(losses, state.optimizer, check)
        state.after_step(progress, stop)
    state.step = progress.step
    totals = ctx.sum(torch.stack([progress.sums[k] for k in METRICS]))
    return {k: v / n for k, v in zip(METRICS, totals.tolist(), strict=True)}


class _BarPostfix:
    """The progress bar's running loss (per image, over this call's steps) and lr, as Keras and Lightning show them.

    The loss adds up on the device and is read only on steps where the loop syncs anyway (every step on CPU).
    """

    def __init__(self, bar: tqdm | None) -> None:
        self.bar = bar if bar is not None and not bar.disable else None
        self.total: Tensor | float = 0.0
        self.count = 0

    def step(self, losses: Tensor, optimizer: torch.optim.Optimizer, synced: bool) -> None:
        if self.bar is None:
            return
        self.total = self.total + losses.detach().double().sum()
        self.count += len(losses)
        if synced:
            lr = optimizer.param_groups[0]["lr"]
            self.bar.set_postfix(loss=f"{float(self.total) / self.count:.4f}", lr=f"{lr:.3g}", refresh=False)
        self.bar.update(1)


def _plan(batches: tuple[Tensor, ...], start: int, ctx: Dist) -> list[tuple[int, Tensor, float]]:
    """The epoch's steps from batch ``start`` on: (index, this rank's share, the weight of each of its images)."""
    plan = []
    for i in range(start, len(batches)):
        mine, weight = ctx.share(batches[i]), ctx.world / len(batches[i])
        if not len(mine):  # a last batch smaller than the world: this rank takes part with a zero-weight image
            mine, weight = batches[i][:1], 0.0
        plan.append((i, mine, weight))
    return plan


def _add(sums: dict[str, Tensor], loss: Tensor, top1: Tensor, top5: Tensor) -> None:
    sums["loss"] += loss
    sums["acc"] += top1
    sums["top5"] += top5


def _check(
    state: TrainState, nonfinite: Tensor, loss: Tensor, check: bool, every_step: bool, progress: EpochProgress
) -> bool:
    """Whether to stop after this step (asked for on any rank); raises when the loss went non-finite on any rank.

    Raises:
        NonFiniteLossError: naming the step (or the steps since the last check on GPUs) and the epoch's batch.
    """
    stop = state.stops.requested()
    if state.ctx.enabled:
        bad, stop = state.ctx.any(nonfinite, stop) if check else (False, False)
    else:
        bad = check and bool(nonfinite.item())
    if bad:
        value = loss.item() if nonfinite.item() else "non-finite on another rank"
        where = f"step {progress.step}" if every_step else f"one of the steps up to {progress.step}"
        raise NonFiniteLossError(f"the training loss became {value} at {where} (epoch batch {progress.batch})")
    return stop


def _fetch(
    images: Tensor | ImageFiles, shares: list[Tensor], cfg: Config, first_step: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Each share's uint8 images on the training device, and for streamed files which ones could be read.

    Streamed files are decoded ahead by worker processes, as random-resized crops when ``--crop`` asks for them,
    each keyed to (seed, step, image index) so that resuming, or another number of workers, draws the same crops.
    """
    if isinstance(images, Tensor):
        yield from ((images[mine], None) for mine in shares)
        return
    keys = None
    if streams_crop(cfg.augment):
        keys = [
            [(cfg.run.seed * 1_000_003 + first_step + n) << 32 | int(i) for i in mine] for n, mine in enumerate(shares)
        ]
    device = shares[0].device if shares else torch.device("cpu")
    for x, readable in images.batches([mine.tolist() for mine in shares], keys):
        yield x.to(device, non_blocking=True), readable.to(device)
