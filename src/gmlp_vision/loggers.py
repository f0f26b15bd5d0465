"""The experiment trackers a run reports to besides its own files: MLflow and Weights & Biases, each an optional extra.

Each gets the same three things: the hyper-parameters (every field of the run's config, flat), every epoch's history
row at step = epoch, and at the end the test metrics (``test_loss``, ``test_acc``, ``test_top5``, and ``test_ema_*``
with a weight average) with the shipped file. A resumed run reports to the same tracker run: its id is kept in
``RUN_DIR/trackers.json``. `reporting` wraps them as callbacks; only rank 0 reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import netrc
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gmlp_vision.errors import ConfigError, GmlpError, first_line
from gmlp_vision.files import write_text
from gmlp_vision.metrics import test_metrics
from gmlp_vision.untrusted import read_json_file
from gmlp_vision.version import __version__

TRACKERS_FILE = "trackers.json"  # in a run directory: the tracker runs it reports to, for a resumed run
MLFLOW_EXPERIMENT = "gmlp-vision"
OFFLINE_MODES = ("offline", "dryrun", "disabled")


class TrackerError(GmlpError):
    """A tracker refused or failed a call; the message says which and why, in one line."""


def params(flat: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters as trackers take them: every config field, None as an empty string."""
    return {k: "" if v is None else v for k, v in flat.items()}


def epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    """A history row's finite numbers, the epoch itself left out (it is the step)."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)}


def _ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / TRACKERS_FILE
    if not path.exists():
        return {}
    value = read_json_file(path, 1 << 16)
    return {k: v for k, v in value.items() if isinstance(v, str)} if isinstance(value, dict) else {}


def _keep_id(run_dir: Path, name: str, value: str) -> None:
    write_text(run_dir / TRACKERS_FILE, json.dumps({**_ids(run_dir), name: value}, indent=2) + "\n")


def tracking_uri(value: str) -> str:
    """``--mlflow``'s value as MLflow takes it: a URI as given, a path ending .db as ``sqlite:///`` + its path."""
    return value if "://" in value else "sqlite:///" + str(Path(value).expanduser().resolve())


def require_mlflow() -> None:
    """Check that ``--mlflow`` can work, before a run loads data or writes anything."""
    try:
        import mlflow  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise ConfigError("--mlflow needs MLflow: pip install 'gmlp-vision[mlflow]'") from None


class MlflowRun:
    """One MLflow run of experiment `MLFLOW_EXPERIMENT`, named after the run directory (resumed where it was kept)."""

    def __init__(self, uri: str, run_dir: Path, hyper: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        with _said("MLflow", uri), _quiet("mlflow", "alembic"):  # its database set-up talks at INFO on stderr
            self.client = MlflowClient(tracking_uri=tracking_uri(uri))
            kept = _ids(run_dir).get("mlflow")
            if kept is not None:
                self.run_id = kept
                self.client.update_run(kept, status="RUNNING")
                return
            experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            exp_id = experiment.experiment_id if experiment else self.client.create_experiment(MLFLOW_EXPERIMENT)
            tags = {"gmlp_vision.version": __version__, "gmlp_vision.run_dir": str(run_dir)}
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name, tags=tags).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params(hyper).items()])
        _keep_id(run_dir, "mlflow", self.run_id)

    def log_epoch(self, row: dict[str, float]) -> None:
        """One history row at step = epoch."""
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(row["epoch"])
        with _said("MLflow", "log_batch"):
            metrics = [Metric(k, v, stamp, step) for k, v in epoch_metrics(row).items()]
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any]) -> None:
        """The test metrics and the shipped file; the run is marked finished."""
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(summary.get("epochs_run", 0))
        with _said("MLflow", "log_batch"):
            metrics = [Metric(k, v, stamp, step) for k, v in test_metrics(summary).items()]
            self.client.log_batch(self.run_id, metrics=metrics)
            self.client.set_tag(self.run_id, "gmlp_vision.shipped", str(summary.get("final_checkpoint")))
            self.client.set_terminated(self.run_id, "FINISHED")


def require_wandb() -> None:
    """Check that ``--wandb`` can work: the package, and a login unless ``WANDB_MODE`` keeps the run offline."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("--wandb needs Weights & Biases: pip install 'gmlp-vision[wandb]'") from None
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES or os.environ.get("WANDB_API_KEY"):
        return
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        raise ConfigError("--wandb: no W&B login; run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline")


class WandbRun:
    """One W&B run in ``project``, its files under ``RUN_DIR/wandb`` (resumed where it was kept)."""

    def __init__(self, project: str, run_dir: Path, hyper: dict[str, Any]) -> None:
        import wandb

        kept = _ids(run_dir).get("wandb")
        settings = wandb.Settings(silent=True, console="off")
        where = dict(project=project, dir=str(run_dir), name=run_dir.name, id=kept, resume="allow" if kept else None)
        with _said("W&B", project):
            self.run = wandb.init(config=params(hyper), settings=settings, **where)
        _keep_id(run_dir, "wandb", self.run.id)

    def log_epoch(self, row: dict[str, float]) -> None:
        """One history row at step = epoch."""
        with _said("W&B", "log"):
            self.run.log(epoch_metrics(row), step=int(row["epoch"]))

    def finish(self, summary: dict[str, Any]) -> None:
        """The test metrics and the shipped file into the run's summary; the run is finished."""
        with _said("W&B", "finish"):
            self.run.summary.update({**test_metrics(summary), "shipped": summary.get("final_checkpoint")})
            self.run.finish()


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The named libraries' loggers at WARNING for the block (their chatter is not the run's), then as they were."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _said:
    """Turns a tracker's own exception into a one-line `TrackerError` that names the tracker."""

    def __init__(self, tracker: str, what: str) -> None:
        self.tracker, self.what = tracker, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> bool:
        if error is None or not isinstance(error, Exception) or isinstance(error, GmlpError):
            return False
        raise TrackerError(f"{self.tracker} ({self.what}): {first_line(error, 300)}") from None


__all__ = [
    "MLFLOW_EXPERIMENT",
    "TRACKERS_FILE",
    "MlflowRun",
    "TrackerError",
    "WandbRun",
    "epoch_metrics",
    "params",
    "require_mlflow",
    "require_wandb",
    "tracking_uri",
]
