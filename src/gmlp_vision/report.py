"""A run's pictures: training curves from ``history.csv`` and an evaluation report on the test images, in ``plots/``.

- ``loss.png``, ``accuracy.png`` (top-1 and top-5, train and validation), ``lr.png``: one point per epoch, the best
  validation loss marked.
- ``confusion.png``: the confusion matrix, each row normalised to the true class's images. Up to 20 classes in dataset
  order with every name; more classes are sorted by per-class accuracy (best first) with rank ticks instead of
  names, and the most-confused pairs are listed beside it. ``confused_pairs.csv`` holds every off-diagonal pair.
- ``per_class_accuracy.png`` (+ ``per_class.csv``): test accuracy of each class, sorted.
- ``misclassified.png``: the most confident mistakes, pixels enlarged without smoothing, with true and predicted labels.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, so no global backend switch and no windows).
`TensorBoardLogger` mirrors the history rows into TensorBoard when the ``tensorboard`` extra is installed.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gmlp_vision.errors import ReportError
from gmlp_vision.metrics import VALIDATION, shows_top5, test_metrics
from gmlp_vision.report_eval import PLOTS_DIR, evaluation_report, new_figure, save_figure


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's ``history.csv`` as floats; empty cells (e.g. no validation split) are left out.

    Raises:
        ReportError: the file is missing, empty or not a history.
    """
    path = Path(run_dir) / "history.csv"
    try:
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in row.items() if k and v not in ("", None)} for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise ReportError(f"{path} not found: is {run_dir} a run directory?") from None
    except (OSError, ValueError, csv.Error) as e:
        raise ReportError(f"cannot read {path}: {e}") from None
    if not rows or any("epoch" not in r or "loss" not in r for r in rows):
        raise ReportError(f"{path} holds no epochs")
    return rows


def _curves(ax: Any, rows: list[dict[str, float]], series: Sequence[tuple[str, str, str, str]], scale: float) -> None:
    """Plot ``(key, label, colour, linestyle)`` series against the epoch, skipping keys the history lacks."""
    for key, label, colour, style in series:
        points = [(r["epoch"], r[key] * scale) for r in rows if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                ys,
                label=label,
                color=colour,
                linestyle=style,
                marker="o" if len(rows) <= 30 else None,
                markersize=3,
            )


def _mark_best(ax: Any, rows: list[dict[str, float]]) -> None:
    key = "val_loss" if any("val_loss" in r for r in rows) else "loss"
    best = min((r for r in rows if key in r), key=lambda r: r[key])
    ax.axvline(
        best["epoch"], color="0.6", linestyle=":", linewidth=1, label=f"lowest {key} (epoch {best['epoch']:.0f})"
    )


def _decorate(ax: Any, title: str, ylabel: str, rows: list[dict[str, float]]) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(rows) == 1:
        ax.set_xlim(rows[0]["epoch"] - 0.5, rows[0]["epoch"] + 0.5)
        ax.set_xticks([rows[0]["epoch"]])
    ax.legend(fontsize=9)


def plot_history(run_dir: str | Path, *, top5: bool = True) -> list[Path]:
    """Draw ``plots/loss.png``, ``plots/accuracy.png`` and ``plots/lr.png`` from the run's ``history.csv``.

    ``top5``: draw the top-5 curves too (they say nothing with 10 classes or fewer, where the run prints none).

    Returns:
        The written files.

    Raises:
        ReportError: the run directory has no readable history.
    """
    run_dir = Path(run_dir)
    rows = read_history(run_dir)
    out = run_dir / PLOTS_DIR
    name = run_dir.resolve().name
    written = []

    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    _curves(ax, rows, [("loss", "train", "C0", "-"), ("val_loss", "validation", "C1", "-")], 1.0)
    _mark_best(ax, rows)
    _decorate(ax, f"Loss (cross-entropy): {name}", "loss", rows)
    written.append(save_figure(fig, out / "loss.png"))

    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    series = [
        ("acc", "top-1 train", "C0", "-"),
        ("val_acc", "top-1 validation", "C0", "--"),
    ]
    if top5:
        series += [("top5", "top-5 train", "C2", "-"), ("val_top5", "top-5 validation", "C2", "--")]
    _curves(ax, rows, series, 100.0)
    _mark_best(ax, rows)
    _decorate(ax, f"Accuracy: {name}", "accuracy (%)", rows)
    written.append(save_figure(fig, out / "accuracy.png"))

    fig = new_figure(7, 3.5)
    ax = fig.add_subplot()
    lrs = [(r["epoch"], r["lr"]) for r in rows if r.get("lr", 0) > 0]
    if lrs:
        xs, ys = zip(*lrs, strict=True)
        ax.plot(xs, ys, label="learning rate", color="C3", drawstyle="steps-post", marker="o", markersize=3)
        if max(ys) / min(ys) > 4:  # several plateau halvings: a log axis shows each as an equal step
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.15 * max(ys))
    _decorate(ax, f"Learning rate (at the start of each epoch): {name}", "learning rate", rows)
    written.append(save_figure(fig, out / "lr.png"))
    return written


def write_report(
    run_dir: str | Path,
    model: nn.Module,
    test_images: Tensor,
    test_labels: Tensor,
    classes: Sequence[str],
    *,
    batch_size: int = 500,
    precision: str = "fp32",
    split: str = "test",
) -> list[Path]:
    """Every plot of a finished run: the training curves and the evaluation report of ``model`` on the test split.

    ``split`` is what the data calls that split (``test``, or ``val`` for a folder's ``val/``), for the titles.

    The call for the end of training: ``write_report(run_dir, model, ds.test.images, ds.test.labels, ds.classes)``.

    Returns:
        The written files (under ``run_dir/plots``).

    Raises:
        ReportError: the run directory has no readable history.
    """
    written = plot_history(run_dir, top5=shows_top5(len(classes)))
    written += evaluation_report(
        run_dir, model, test_images, test_labels, classes, batch_size=batch_size, precision=precision, split=split
    )
    return written


def require_tensorboard() -> None:
    """Check that TensorBoard logging can work, before a run loads data or writes anything.

    Raises:
        ReportError: tensorboard is not installed, with the command that installs it.
    """
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ReportError("--tensorboard needs tensorboard: pip install 'gmlp-vision[tensorboard]'") from None


class TensorBoardLogger:
    """Mirror each epoch's history row into TensorBoard event files under ``run_dir/tensorboard``.

    Tags: ``loss/train``, ``loss/val``, ``acc/train``, ``acc/val``, ``top5/train``, ``top5/val``, ``lr``, ``seconds``,
    at step = epoch. Needs the ``tensorboard`` extra.

    Args:
        run_dir: the run directory.

    Raises:
        ReportError: tensorboard is not installed.
    """

    def __init__(self, run_dir: str | Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_epoch(self, row: dict[str, float]) -> None:
        """Write one history row (as `train.write_history` gets it)."""
        step = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            tag = key if key in ("lr", "seconds") else f"{key}/train"
            if key.startswith(VALIDATION):  # val_loss -> loss/val, val_ema_acc -> ema_acc/val
                tag = f"{key.removeprefix(VALIDATION)}/val"
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_results(self, hyper: dict[str, Any], summary: dict[str, Any]) -> None:
        """The run's hyper-parameters with its test metrics (the HParams tab), and the test metrics as ``test/*``."""
        metrics = test_metrics(summary, sep="/")
        hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hyper.items()}
        step = int(summary.get("epochs_run", 0))
        self.writer.add_hparams(hparams, metrics, run_name=".", global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "TensorBoardLogger",
    "plot_history",
    "read_history",
    "require_tensorboard",
    "write_report",
]
