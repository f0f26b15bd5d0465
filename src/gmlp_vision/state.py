"""A run's training state: what goes from step to step, what ``last.pt`` holds, and how a run resumes from it.

`TrainState` holds the model, optimiser, lr schedule, precision and fp16 gradient scaler, plateau and early-stopping
rules, the weight average, every random stream and the history; `batches.EpochProgress` says where the current epoch
stands. ``save_last`` writes all of it (each rank's random streams gathered to rank 0), ``load`` puts it back, so an
interrupted run continues bit for bit; ``after_step`` is what the epoch loop (`loop.train_one_epoch`) calls after
every step, and `StopRequests` turns signals into a clean stop.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gmlp_vision.batches import EpochProgress
from gmlp_vision.checkpoint import Checkpoint, after_nonfinite, save_checkpoint
from gmlp_vision.config.core import Config
from gmlp_vision.data import Dataset
from gmlp_vision.errors import CheckpointError, NonFiniteLossError, TrainingInterrupted, first_line
from gmlp_vision.metrics import METRICS
from gmlp_vision.model import nonfinite_names
from gmlp_vision.optim import EarlyStopping, LrSchedule, Plateau, WeightEMA
from gmlp_vision.precision import Precision, precision_named
from gmlp_vision.resume_check import ResumeTarget, check_resume_state, training_images
from gmlp_vision.runtime import SINGLE, Dist, unwrap

log = logging.getLogger("gmlp_vision")

# Rank r > 0 seeds its augmentation and dropout with seed + r * stride (rank 0 keeps the seed: one process as before).
RANK_SEED_STRIDE = 1_000_003


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s augmentation and dropout streams."""
    return seed + RANK_SEED_STRIDE * rank


class StopRequests:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum

    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    @contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """Install the handlers for the duration of the block (only possible in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@dataclass
class TrainState:
    """Everything a run carries from one step to the next; ``epoch`` and ``step`` count what is done.

    Built from the config, the model, its optimiser and this rank's random stream; the lr schedule (for epochs of
    ``steps_per_epoch`` steps), the plateau and early-stopping rules, the epoch order, the weight average (``--ema``)
    and the gradient scaler (``--precision fp16``) follow from the config. ``run_dir`` and ``ds`` are where
    checkpoints go and the data they name; a state without them trains but cannot save.

    ``model`` is the model itself: its weights are what is saved, averaged and checked. ``wrapped`` is what the steps
    and evaluation call: the same model wrapped by DDP under torchrun and by ``torch.compile`` with ``--compile``
    (the model itself otherwise).
    """

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # this rank's augmentation and dropout stream
    wrapped: nn.Module | None = None  # default: the model itself
    ctx: Dist = SINGLE
    run_dir: Path | None = None
    ds: Dataset | None = None
    steps_per_epoch: int = 1  # the optimiser steps of an epoch (`batches.BatchSource.steps_per_epoch`)
    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    stops: StopRequests = field(default_factory=StopRequests)
    best: dict[str, torch.Tensor] | None = None  # the best epoch's weights so far (a resumed run: its best.pt's)
    plateau: Plateau = field(init=False)
    stopper: EarlyStopping = field(init=False)
    order: torch.Generator = field(init=False)  # the epoch order: the same on every rank
    ema: WeightEMA | None = field(init=False)
    scaler: torch.amp.GradScaler | None = field(init=False)  # --precision fp16 only (`precision.Precision.scaler`)
    schedule: LrSchedule = field(init=False)
    precision: Precision = field(init=False)

    def __post_init__(self) -> None:
        optim = self.cfg.optim
        if self.steps_per_epoch < 1:  # the lr schedule is a function of the step within the run's epochs
            raise ValueError(f"steps_per_epoch must be at least 1, got {self.steps_per_epoch}")
        self.wrapped = self.model if self.wrapped is None else self.wrapped
        self.schedule = LrSchedule.from_config(optim, self.steps_per_epoch)
        self.plateau = Plateau(self.optimizer, optim.plateau_factor, optim.plateau_patience, optim.plateau_threshold)
        self.stopper = EarlyStopping(optim.early_stop_patience)
        self.order = torch.Generator().manual_seed(self.cfg.run.seed)
        self.ema = WeightEMA(self.model, optim.ema) if optim.ema else None
        self.precision = precision_named(self.cfg.run.precision)
        self.scaler = self.precision.scaler(next(self.model.parameters()).device)

    @property
    def averaged(self) -> nn.Module | None:
        """The weight average's model (``--ema``), else None."""
        return self.ema.module if self.ema is not None else None

    def shipped(self, weights: str) -> str:
        """Which file the run ships: ``weights`` (best.pt or last.pt), or with ``--ema`` the better of it and ema.pt.

        Decided on the validation split (never the test split): higher top-1 accuracy wins, then lower loss; a tie
        keeps ``weights``. Without validation images the weight average ships. Said in the log (rank 0).
        """
        if self.averaged is None:
            return weights
        rows, say = self.history, log.info if self.ctx.main else log.debug
        if not rows or "val_ema_acc" not in rows[-1]:
            say("shipping ema.pt, the weight average: no validation images to choose on")
            return "ema.pt"
        plain = rows[self.stopper.best_epoch] if weights == "best.pt" else rows[-1]
        ours, theirs = (plain["val_acc"], -plain["val_loss"]), (rows[-1]["val_ema_acc"], -rows[-1]["val_ema_loss"])
        shipped = "ema.pt" if theirs > ours and math.isfinite(theirs[1]) else weights  # a NaN or inf loss never ships
        verdict = "beats" if shipped == "ema.pt" else "does not beat"
        message = (
            "shipping %s: the weight average's validation accuracy %.2f %% (loss %.4f) %s %s's %.2f %% (loss %.4f)"
        )
        say(message, shipped, 100 * theirs[0], -theirs[1], verdict, weights, 100 * ours[0], -ours[1])
        return shipped

    def save(
        self, name: str, module: nn.Module, metrics: dict[str, float], train_state: Any = None, step: int | None = None
    ) -> None:
        """Write ``module``'s weights as ``RUN_DIR/name`` (rank 0 only), with the run's epoch and step (or ``step``).

        Raises:
            CheckpointError: the file could not be written (the previous one is intact).
        """
        if self.run_dir is None or self.ds is None:
            raise ValueError("this TrainState has no run directory and dataset to save with")
        step = self.step if step is None else step
        ckpt = Checkpoint(
            self.cfg, unwrap(module).state_dict(), self.ds.classes, self.epoch, step, metrics, train_state or {}
        )
        self.ctx.on_main(partial(_write, self.run_dir / name, ckpt))

    def save_last(self, row: dict[str, float] | None, progress: EpochProgress | None) -> None:
        """Write ``last.pt``: the weights and everything needed to resume (``progress``: a part-done epoch)."""
        device = self.generator.device
        rank_state = {
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "sums": {k: v.cpu() for k, v in progress.sums.items()} if progress is not None else {},
        }
        ranks = self.ctx.gather(rank_state)  # every rank's random streams and sums, so each can resume its own
        train_state = {
            "optimizer": self.optimizer.state_dict(),
            "plateau": self.plateau.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "order_generator": self.order.get_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ranks": ranks,
            "history": self.history,
            "epoch_progress": progress.state_dict() if progress is not None else None,
        }
        step = progress.step if progress is not None else self.step
        self.require_finite(f"by step {step}")
        self.save("last.pt", self.model, row or {}, train_state, step)

    def require_finite(self, where: str) -> None:
        """Stop the run when the weights (or their average) hold NaN or inf: they are never saved or reported.

        Raises:
            NonFiniteLossError: naming where, and the checkpoint that stays (every saved one is finite).
        """
        for module in (self.model, self.averaged):
            bad = nonfinite_names(unwrap(module).state_dict()) if module is not None else []
            if bad:
                raise NonFiniteLossError(
                    f"the weights became NaN or infinite {where} ({len(bad)} tensors, e.g. {bad[0]}); "
                    + after_nonfinite(self.run_dir)
                )

    def after_step(self, progress: EpochProgress, stop: bool) -> None:
        """After every step: update the weight average; save and stop on request; save every N steps if asked.

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM asked to stop; ``last.pt`` was saved at this step.
        """
        if self.ema is not None:
            self.ema.update(self.model)
        if stop:
            self.save_last(None, progress)
            # Under torchrun the signal may have reached another rank first.
            signum = self.stops.signum or signal.SIGTERM
            raise TrainingInterrupted(
                f"{signal.Signals(signum).name}: stopped after step {progress.step}; "
                f"resume with: gmlp train --resume {self.run_dir}",
                signum,
            )
        every = self.cfg.run.checkpoint_every
        if every and progress.step % every == 0 and progress.batch < self.steps_per_epoch:
            self.save_last(None, progress)

    def load(self, saved: Checkpoint) -> EpochProgress | None:
        """Take back a ``last.pt``: weights, optimiser, rules, streams, history; returns a part-done epoch, if any.

        Each rank takes back its own random streams and running sums. Resumed on another number of processes, the
        weights, optimiser and epoch order carry on exactly; the sums move to rank 0 (only their total counts) and
        augmentation and dropout continue with new streams (a warning says so).

        Raises:
            CheckpointError: the file cannot be resumed.
        """
        check_resume_state(saved, self._resume_target())  # every field, before anything is applied
        ts = saved.train_state
        try:
            self.model.load_state_dict(saved.model_state)
            self.optimizer.load_state_dict(ts["optimizer"])
            self.plateau.load_state_dict(ts["plateau"])
            self.stopper.load_state_dict(ts["early_stopping"])
            self.order.set_state(ts["order_generator"])
            sums = self._load_streams(ts["ranks"], saved)
            part = ts.get("epoch_progress")
            self.epoch, self.step, self.history = saved.epoch, saved.step, list(ts["history"])
            if self.ema is not None:
                self.ema.load_state_dict(ts["ema"])
            if self.scaler is not None and ts.get("scaler") is not None:  # fp32/bf16 runs and 0.1/0.2 files have none
                self.scaler.load_state_dict(ts["scaler"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"cannot resume from last.pt: {first_line(e)}") from None
        if part is None:
            return None
        device = self.generator.device
        sums = {k: v.to(device) for k, v in sums.items()}
        return EpochProgress(part["perm"].to(device), int(part["batch"]), int(part["step"]), sums)

    def _resume_target(self) -> ResumeTarget:
        """What this rank puts a ``last.pt`` into: its optimiser, rules, random stream and training set."""
        ds = self.ds
        n = training_images(self.cfg.data, len(ds.train.labels), ds.val is not None) if ds is not None else None
        ema, fp16 = self.ema is not None, self.scaler is not None
        return ResumeTarget(self.optimizer, METRICS, ema, fp16, self.generator, self.ctx.world, self.ctx.rank, n)

    def _load_streams(self, ranks: list[dict[str, Any]], saved: Checkpoint) -> dict[str, torch.Tensor]:
        """This rank's random streams back (new ones on another number of ranks); returns its running sums."""
        ctx = self.ctx
        if len(ranks) == ctx.world:
            mine = ranks[ctx.rank]
            self.generator.set_state(mine["generator"])
            torch.set_rng_state(mine["torch_rng"])
            if mine["cuda_rng"] and self.generator.device.type == "cuda":
                torch.cuda.set_rng_state_all(mine["cuda_rng"])
            return mine["sums"]
        if ctx.main:
            log.warning(
                "last.pt was saved by %d processes and is resumed by %d: augmentation and dropout "
                "continue with new random streams",
                len(ranks),
                ctx.world,
            )
        reseed = rank_seed(saved.config.run.seed, ctx.rank) + 7919 * saved.step
        self.generator.manual_seed(reseed)
        torch.manual_seed(reseed)
        return {k: sum(r["sums"][k] for r in ranks) for k in METRICS} if ctx.main and ranks[0]["sums"] else {}


def _write(path: Path, ckpt: Checkpoint) -> None:
    try:
        save_checkpoint(path, ckpt)
    except OSError as e:
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"could not write {path}: {e.strerror or e}; {kept}") from None
