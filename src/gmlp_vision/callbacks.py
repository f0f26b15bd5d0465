"""Callbacks: what a run calls at its start, after each epoch and at its finish, with Keras' method names.

Whatever hangs off training (the plots, TensorBoard, MLflow, W&B, a user's own logging, evaluating on the way) is a
`Callback` passed to `train.train`, so the loop itself writes nothing but the run directory's own files (checkpoints,
history, results). The command line passes `reporting.default_callbacks`; from Python::

    from gmlp_vision.reporting import default_callbacks

    class Show(Callback):
        def on_epoch_end(self, epoch, logs=None):  # epoch: 0-based, as in Keras; logs: the history row
            print(epoch, logs["val_acc"])

    train(cfg, callbacks=[*default_callbacks(cfg), Show()])

As Keras' ``set_model``, `Callback.set_run` gives each callback the run (``self.run``, a `RunInfo`) before
``on_train_begin``; ``on_train_end``'s logs are what ``results.json`` holds. A callback that writes files lists them
in ``self.files`` (they become `train.Result.plots`).

Under torchrun every process must be given the same callbacks: every hook runs on every process, in the order the
callbacks were given, and a hook may use the run's collectives (`RunInfo.ctx`: `reporting.PlotReport` has rank 0
draw while the others wait for it). `RunInfo.main` tells rank 0, which alone writes files. An exception a hook raises
ends the run, as one raised by training would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gmlp_vision.config.core import Config
from gmlp_vision.data import Dataset
from gmlp_vision.runtime import Dist


@dataclass(frozen=True)
class RunInfo:
    """What a callback may read of a running training run (the models are live: read them, do not replace them)."""

    cfg: Config  # the run's config (the run directory and the data's classes and channels filled in)
    run_dir: Path
    ds: Dataset
    ctx: Dist  # this process's place under torchrun
    model: nn.Module  # the model itself, unwrapped
    averaged: nn.Module | None  # the weight average's model (--ema), else None

    def shipped(self, summary: dict[str, Any]) -> nn.Module:
        """The model the run ships at its finish (``summary["final_checkpoint"]``): the weight average or the model."""
        return self.averaged if summary["final_checkpoint"] == "ema.pt" and self.averaged is not None else self.model

    @property
    def main(self) -> bool:
        """Whether this is the process that writes files (rank 0; the only one without torchrun)."""
        return self.ctx.main


class Callback:
    """A hook into a training run, with Keras' method names; override the ones you need (each default does nothing)."""

    run: RunInfo  # set by `set_run` before ``on_train_begin``
    files: list[Path]  # what this callback wrote, for `train.Result.plots`

    def set_run(self, run: RunInfo) -> None:
        """Give the callback the run it hooks into (``self.run``), before ``on_train_begin``."""
        self.run = run
        self.files = []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Before the first step (of a resumed run: before its next step), after the run directory is ready."""

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        """After epoch ``epoch`` (0-based), saved with ``best.pt`` and ``last.pt``: ``logs`` is its history row.

        The row is `metrics.epoch_row`'s (``logs["epoch"]`` counts from 1, as the history does).
        """

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """After the test evaluation and ``results.json``: ``logs`` is its content."""
