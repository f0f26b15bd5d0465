"""The callbacks the command line trains with: the run's plots, and TensorBoard with ``--tensorboard``.

They sit above `train` so that training never loads matplotlib or TensorBoard itself; `default_callbacks` is what
``gmlp train`` passes, and what a Python user passes to get the same files.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from gmlp_vision.callbacks import Callback
from gmlp_vision.config.core import Config
from gmlp_vision.report import TensorBoardLogger, require_tensorboard, write_report

__all__ = ["PlotReport", "TensorBoardLog", "default_callbacks"]


def default_callbacks(cfg: Config) -> list[Callback]:
    """What ``gmlp train`` runs with: TensorBoard when ``cfg`` asks for it, and the plots.

    Raises:
        ReportError: ``--tensorboard`` without the tensorboard extra (told before any data loads).
    """
    return [*([TensorBoardLog()] if cfg.run.tensorboard else []), PlotReport()]


class PlotReport(Callback):
    """At the finish, rank 0 writes every plot under ``RUN_DIR/plots`` (`report.write_report`) of the shipped model."""

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:  # noqa: D102 (as `Callback`)
        run, summary = self.run, logs or {}
        test, cfg = run.ds.test, run.cfg
        write = partial(
            write_report,
            run.run_dir,
            run.shipped(summary),
            test.images,
            test.labels,
            run.ds.classes,
            batch_size=cfg.run.eval_batch_size,
            precision=cfg.run.precision,
            split=run.ds.test_split,
        )
        self.files = run.ctx.on_main(write)


class TensorBoardLog(Callback):
    """Each epoch's history row mirrored into ``RUN_DIR/tensorboard`` by rank 0 (`report.TensorBoardLogger`).

    Raises:
        ReportError: tensorboard is not installed (when the callback is made, before the run starts).
    """

    def __init__(self) -> None:
        require_tensorboard()
        self.logger: TensorBoardLogger | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:  # noqa: D102 (as `Callback`)
        if self.run.main:
            self.logger = TensorBoardLogger(self.run.run_dir)

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:  # noqa: D102 (as `Callback`)
        if self.logger is not None and logs is not None:
            self.logger.log_epoch(logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:  # noqa: D102 (as `Callback`)
        if self.logger is not None:
            self.logger.close()
            self.logger = None
