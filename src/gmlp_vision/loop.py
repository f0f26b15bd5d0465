"""The training loop's inner part: one epoch of optimiser steps over a `state.TrainState`.

An epoch is one permutation of the training images and a batch an index slice of it (`state.EpochProgress`, which a
checkpoint saves so that an interrupted epoch continues exactly). Each step is the eager `step.train_step` (augment on
the device, run the model, update it), or, where `graphs.unsupported` allows, the same step replayed as a CUDA graph
(`graphs.GraphStep`). `train.train` runs the epochs around this.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from gmlp_vision.augment import streams_crop
from gmlp_vision.config.core import Config
from gmlp_vision.data.stream import ImageFiles
from gmlp_vision.errors import NonFiniteLossError
from gmlp_vision.graphs import GraphStep
from gmlp_vision.optim import LrSchedule
from gmlp_vision.runtime import Dist
from gmlp_vision.state import EpochProgress, TrainState
from gmlp_vision.step import METRICS, BatchInfo, add_metrics, train_step

__all__ = ["train_one_epoch"]


def train_one_epoch(
    state: TrainState,
    images: Tensor | ImageFiles,
    labels: Tensor,
    progress: EpochProgress | None = None,
    bar: tqdm | None = None,
    graphs: GraphStep | None = None,
) -> dict[str, float]:
    """One pass over ``images`` (uint8 on the device, or streamed files) in shuffled batches of ``state``'s model.

    Under torchrun every rank passes the whole training set and the same permutation, trains on its share of each
    global batch (`Dist.share`), and gets metrics summed over all ranks. After every step ``state.after_step`` runs
    (weight average, checkpoints, a requested stop); ``state.step`` counts the steps.

    Args:
        progress: continue a partly done epoch (permutation, position, running sums); default: a new permutation.
        bar: a progress bar advanced once per step.
        graphs: run each step as a captured CUDA graph (`graphs.GraphStep`, built on ``images`` and ``labels``).

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
    fetched = iter(()) if graphs is not None else _fetch(images, [mine for _, mine, _ in plan], cfg, progress.step)
    schedule = LrSchedule.from_config(cfg.optim, len(batches))
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    if graphs is not None:
        progress.sums, nonfinite = graphs.begin_epoch(progress.sums), graphs.nonfinite
    check_every = 1 if device.type == "cpu" else 50  # .item() and collectives sync the device: not every step on GPUs
    shown = _BarPostfix(bar)
    for i, mine, weight in plan:
        schedule.apply(state.optimizer, progress.step)
        if graphs is not None:
            losses, loss = graphs.step(mine)
        else:
            losses, loss = _eager_step(state, next(fetched), labels[mine], weight, progress.sums, nonfinite)
        progress.batch, progress.step = i + 1, progress.step + 1
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


def _eager_step(
    state: TrainState,
    fetched: tuple[Tensor, Tensor | None],
    y: Tensor,
    weight: float,
    sums: dict[str, Tensor],
    nonfinite: Tensor,
) -> tuple[Tensor, Tensor]:
    """One eager `train_step` on a fetched batch; adds to the epoch's metrics unless this rank's share weighs 0.

    Returns:
        Every image's loss, and their sum over the readable images.
    """
    x, readable = fetched
    weights = torch.full((len(y),), weight, device=y.device)
    if readable is not None:
        weights *= readable  # an unreadable streamed file (--skip-bad-images) counts for nothing
    batch = BatchInfo(weights, cropped=readable is not None and streams_crop(state.cfg.augment))
    losses, logits = train_step(
        state.model, state.optimizer, x, y, state.cfg, state.generator, batch=batch, scaler=state.scaler
    )
    if not weight:
        return losses, losses.sum() if readable is None else (losses * readable).sum()
    return losses, add_metrics(sums, nonfinite, losses, logits, y, readable)


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
