"""The callbacks the command line trains with: the run's plots; TensorBoard, MLflow and W&B where the config asks.

They sit above `train` so that training never loads matplotlib or TensorBoard itself; `default_callbacks` is what
``gmlp train`` passes, and what a Python user passes to get the same files.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from gmlp_vision.callbacks import Callback
from gmlp_vision.config.core import Config
from gmlp_vision.loggers import MlflowRun, WandbRun, require_mlflow, require_wandb
from gmlp_vision.report import TensorBoardLogger, require_tensorboard, write_report

__all__ = ["MlflowLog", "PlotReport", "TensorBoardLog", "WandbLog", "default_callbacks"]


def default_callbacks(cfg: Config) -> list[Callback]:
    """What ``gmlp train`` runs with: TensorBoard, MLflow and W&B where ``cfg`` asks for them, and the plots.

    Raises:
        ReportError, ConfigError: a tracker asked for without its extra (or W&B without a login), told before any
            data loads.
    """
    run = cfg.run
    trackers: list[Callback] = [TensorBoardLog()] if run.tensorboard else []
    trackers += [MlflowLog(run.mlflow)] if run.mlflow else []
    trackers += [WandbLog(run.wandb)] if run.wandb else []
    return [*trackers, PlotReport()]


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
            self.logger.log_results(self.run.cfg.to_flat(), logs or {})
            self.logger.close()
            self.logger = None


class _Tracker(Callback):
    """A tracker (`loggers`) as a callback: made at the run's start on rank 0, fed each epoch, finished at the end."""

    def __init__(self) -> None:
        self.tracker: MlflowRun | WandbRun | None = None

    def start(self) -> MlflowRun | WandbRun:
        raise NotImplementedError

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:  # noqa: D102 (as `Callback`)
        if self.run.main:
            self.tracker = self.start()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:  # noqa: D102 (as `Callback`)
        if self.tracker is not None and logs is not None:
            self.tracker.log_epoch(logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:  # noqa: D102 (as `Callback`)
        if self.tracker is not None:
            self.tracker.finish(logs or {})
            self.tracker = None


class MlflowLog(_Tracker):
    """``--mlflow URI``: the hyper-parameters, every epoch and the test metrics in an MLflow run (`loggers.MlflowRun`).

    Raises:
        ConfigError: MLflow is not installed (when the callback is made, before the run starts).
    """

    def __init__(self, uri: str) -> None:
        require_mlflow()
        super().__init__()
        self.uri = uri

    def start(self) -> MlflowRun:  # noqa: D102 (as `_Tracker`)
        return MlflowRun(self.uri, self.run.run_dir, self.run.cfg.to_flat())


class WandbLog(_Tracker):
    """``--wandb PROJECT``: the same in a Weights & Biases run, its files in ``RUN_DIR/wandb`` (`loggers.WandbRun`).

    Raises:
        ConfigError: wandb is not installed, or no login and no offline mode (before the run starts).
    """

    def __init__(self, project: str) -> None:
        require_wandb()
        super().__init__()
        self.project = project

    def start(self) -> WandbRun:  # noqa: D102 (as `_Tracker`)
        return WandbRun(self.project, self.run.run_dir, self.run.cfg.to_flat())
