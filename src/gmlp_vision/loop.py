"""The training loop's inner part: one epoch of optimiser steps over a `state.TrainState`.

Per step: the batch from the source (`batches.BatchSource.batches`: this process's share, gathered or decoded), the lr
of that step (`optim.LrSchedule`), the step itself through the run's stepper (`step.Stepper`: eager, or replayed as a
CUDA graph), the non-finite check, the progress bar, and ``state.after_step`` (weight average, checkpoints, a
requested stop). `train.train` runs the epochs around this.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from gmlp_vision.batches import BatchSource, EpochProgress
from gmlp_vision.errors import NonFiniteLossError
from gmlp_vision.metrics import METRICS
from gmlp_vision.optim import LrSchedule, base_lr
from gmlp_vision.runtime import Dist
from gmlp_vision.step import Stepper

__all__ = ["Trainee", "train_one_epoch"]


class _Stops(Protocol):
    def requested(self) -> bool: ...


class Trainee(Protocol):
    """What the loop needs of a run's state: `state.TrainState` is the one there is.

    The loop asks for these alone, so it stands below the state's saving and resuming (checkpoints, resume checks).
    """

    wrapped: nn.Module | None  # what the steps call (`TrainState.wrapped`)
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    ctx: Dist
    step: int
    steps_per_epoch: int

    @property
    def stops(self) -> _Stops:
        """The run's stop requests (SIGINT, SIGTERM)."""
        ...

    def after_step(self, progress: EpochProgress, stop: bool) -> None:
        """After every step: the weight average, the periodic and the requested checkpoints."""
        ...


def train_one_epoch(
    state: Trainee, source: BatchSource, stepper: Stepper, progress: EpochProgress, bar: tqdm | None = None
) -> dict[str, float]:
    """The rest of ``progress``'s epoch (`batches.BatchSource.new_epoch` starts one), in steps of ``stepper``.

    Under torchrun every rank holds the whole training set and the same permutation, trains on its share of each
    global batch, and gets metrics summed over all ranks. ``state.step`` counts the steps.

    Args:
        bar: a progress bar advanced once per step.

    Returns:
        The epoch's mean loss, top-1 and top-5 accuracy over every rank's images.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (checked every step on CPU, every 50 on GPUs).
        TrainingInterrupted: a stop was requested (SIGINT or SIGTERM); ``last.pt`` was saved at this step.
    """
    if state.steps_per_epoch != source.steps_per_epoch:  # the lr schedule counts on it
        raise ValueError(
            f"the state expects {state.steps_per_epoch} steps per epoch, the source has {source.steps_per_epoch}"
        )
    assert state.wrapped is not None
    state.wrapped.train()
    progress.sums = stepper.begin_epoch(progress.sums)
    check_every = 1 if source.device.type == "cpu" else 50  # .item() and collectives sync the device: not every step
    shown = _BarPostfix(bar)
    for batch in source.batches(progress, gather=not stepper.gathers):
        state.schedule.apply(state.optimizer, progress.step)
        losses, loss = stepper.step(batch)
        progress.batch, progress.step = batch.number + 1, progress.step + 1
        check = progress.step % check_every == 0 or progress.batch == source.steps_per_epoch
        stop = _check(state, stepper.nonfinite, loss, check, check_every == 1, progress)
        shown.step(losses, state.optimizer, check)
        state.after_step(progress, stop)
    state.step = progress.step
    totals = state.ctx.sum(torch.stack([progress.sums[k] for k in METRICS]))
    return {k: v / len(source) for k, v in zip(METRICS, totals.tolist(), strict=True)}


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
            lr = base_lr(optimizer)
            self.bar.set_postfix(loss=f"{float(self.total) / self.count:.4f}", lr=f"{lr:.3g}", refresh=False)
        self.bar.update(1)


def _check(
    state: Trainee, nonfinite: Tensor, loss: Tensor, check: bool, every_step: bool, progress: EpochProgress
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
