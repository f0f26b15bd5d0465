"""Evaluation pictures of a model on labelled test images: confusion matrix, per-class accuracy, misclassified grid.

What each file shows is described in `gmlp_vision.report`, which also holds the training-curve plots and the one call
for the end of a run (`report.write_report`). Figures use matplotlib's Agg canvas directly (no pyplot state).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gmlp_vision.errors import ReportError
from gmlp_vision.evaluate import infer
from gmlp_vision.metrics import split_label

PLOTS_DIR = "plots"
MANY_CLASSES = 40  # above this, names no longer fit as ticks: sort by accuracy and tick by rank
PAIRS_SHOWN = 25


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` on an Agg canvas (imported here: plotting is not needed to train)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


@torch.no_grad()
def predict_all(
    model: nn.Module, images: Tensor, *, batch_size: int = 500, precision: str = "fp32"
) -> tuple[Tensor, Tensor]:
    """Top-1 class and its softmax probability for every image, in eval mode, as CPU tensors."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, confidence = [], []
    for x in images.split(batch_size):
        conf, idx = infer(model, x.to(device), precision).softmax(dim=1).max(dim=1)
        preds.append(idx.cpu())
        confidence.append(conf.cpu())
    model.train(was_training)
    return torch.cat(preds), torch.cat(confidence)


def confusion_matrix(labels: Tensor, preds: Tensor, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    flat = labels.cpu().long() * num_classes + preds.cpu().long()
    return np.bincount(flat.numpy(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confused_pairs(cm: np.ndarray) -> list[tuple[int, int, int, float]]:
    """Off-diagonal ``(true, predicted, count, share of the true class)``, most frequent first."""
    totals = cm.sum(axis=1)
    pairs = [(t, p, int(cm[t, p]), cm[t, p] / totals[t]) for t, p in zip(*np.nonzero(cm), strict=True) if t != p]
    return sorted(pairs, key=lambda x: (-x[2], -x[3], x[0], x[1]))


def _short(name: str, width: int = 18) -> str:
    """``name`` in at most ``width`` characters, elided in the middle: names that share a long prefix stay apart."""
    if len(name) <= width:
        return name
    tail = (width - 1) // 2
    return name[: width - 1 - tail] + "…" + name[len(name) - tail :]


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, split: str = "test") -> Path:
    """The row-normalised confusion matrix beside a list of the most-confused pairs."""
    from matplotlib.colors import PowerNorm

    k = len(classes)
    totals = np.maximum(cm.sum(axis=1, keepdims=True), 1)
    share = 100.0 * cm / totals
    many = k > MANY_CLASSES
    accuracy = np.diag(share)
    order = np.argsort(-accuracy, kind="stable") if many else np.arange(k)
    side = 9.0 if many else min(10.0, max(6.0, 0.5 * k + 3.0))
    pairs = confused_pairs(cm)[:PAIRS_SHOWN]
    table = 0.17 * (max(len(pairs), 1) + 2) + 0.3  # inches: the pairs' table under the matrix, as tall as its lines
    fig = new_figure(side + 1.6, side + (1.0 if 20 < k <= MANY_CLASSES else 0.4) + table)  # tick labels, colour bar
    grid = fig.add_gridspec(2, 1, height_ratios=[side, table])
    ax = fig.add_subplot(grid[0])
    # A square-root colour scale keeps 1-5 % confusions visible next to a 90 % diagonal.
    norm = PowerNorm(0.5, vmin=0, vmax=100)
    image = ax.imshow(share[np.ix_(order, order)], cmap="Blues", norm=norm)
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"% of the true class's {split} images")
    if many:
        ticks = np.arange(0, k, 10)
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        ax.set_xlabel("predicted class (rank by per-class accuracy, names in per_class_accuracy.png)")
        ax.set_ylabel("true class (rank by per-class accuracy, 1 = best)")
    else:
        names, font = [_short(c) for c in classes], 9 if k <= 20 else 7
        ax.set_xticks(
            range(k), names, rotation=45 if k <= 20 else 90, ha="right" if k <= 20 else "center", fontsize=font
        )
        ax.set_yticks(range(k), names, fontsize=font)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if k <= 12:
            for t in range(k):
                for p in range(k):
                    if cm[t, p]:
                        colour = "white" if norm(share[t, p]) > 0.6 else "black"
                        ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=9, color=colour)
    total = int(cm.sum())
    ax.set_title(f"Confusion matrix\n{total:,d} {split} images, top-1 {100 * np.trace(cm) / max(total, 1):.1f}%")

    text_ax = fig.add_subplot(grid[1])
    text_ax.axis("off")
    lines = [
        f"{_short(classes[t], 24):>24s} → {_short(classes[p], 24):<24s} {n:5d} {100 * s:5.1f}%" for t, p, n, s in pairs
    ]
    title = f"Most confused pairs ({len(pairs)} of {len(confused_pairs(cm))})"
    header = f"{title}\n{'true':>24s} → {'predicted':<24s} {'count':>5s} {'share':>6s}\n"
    text = header + ("\n".join(lines) if lines else "no mistakes")
    text_ax.text(0.5, 1, text, ha="center", va="top", family="monospace", fontsize=9, transform=text_ax.transAxes)
    return save_figure(fig, path)


def plot_per_class(cm: np.ndarray, classes: Sequence[str], path: Path, split: str = "test") -> Path:
    """Horizontal bars of each class's accuracy on the ``split`` images, best at the top, with the mean."""
    from matplotlib import colormaps

    k = len(classes)
    totals = cm.sum(axis=1)
    accuracy = 100.0 * np.diag(cm) / np.maximum(totals, 1)
    order = np.argsort(-accuracy, kind="stable")
    fig = new_figure(8, max(3.0, 0.17 * k + 1.4))
    ax = fig.add_subplot()
    font = 9 if k <= 20 else 7
    rows = np.arange(k)
    ax.barh(rows, accuracy[order], color=colormaps["RdYlGn"](accuracy[order] / 100.0), edgecolor="0.4", linewidth=0.3)
    # With many classes, the rank is the confusion matrix's tick (it sorts the same way).
    names = [f"{classes[i]}  {r + 1}" if k > MANY_CLASSES else classes[i] for r, i in enumerate(order)]
    ax.set_yticks(rows, names, fontsize=font)
    ax.set_ylim(k - 0.5, -0.5)
    for row, i in enumerate(order):
        ax.text(accuracy[i] + 1, row, f"{accuracy[i]:.0f}", va="center", fontsize=font - 1)
    mean = float(accuracy[totals > 0].mean()) if (totals > 0).any() else 0.0
    ax.axvline(mean, color="0.3", linestyle="--", linewidth=1)  # named in the title: a legend would hide a bar's value
    ax.set_xlim(0, 108)
    ax.set_xlabel(f"{split} accuracy (%)")
    ranked = ", ranked" if k > MANY_CLASSES else ""
    ax.set_title(f"Per-class {split} accuracy ({k} classes{ranked}; dashed: the mean, {mean:.1f}%)")
    ax.grid(True, axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_misclassified(
    images: Tensor,
    labels: Tensor,
    preds: Tensor,
    confidence: Tensor,
    classes: Sequence[str],
    path: Path,
    max_images: int = 36,
    split: str = "test",
) -> Path:
    """A grid of the most confident mistakes, each enlarged with nearest-neighbour pixels, true and predicted labels."""
    wrong = torch.nonzero(preds != labels).flatten()
    chosen = wrong[confidence[wrong].argsort(descending=True)][:max_images].tolist()
    cols = max(1, min(6, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / cols))
    fig = new_figure(max(cols * 1.9, 7.0), rows * 2.3 + 0.6)
    fig.suptitle(f"Most confident mistakes: {len(wrong):,d} of {len(labels):,d} {split} images misclassified")
    if not chosen:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    for n, i in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, n + 1)
        pixels = images[i].float().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        if pixels.shape[2] == 1:
            ax.imshow(pixels[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"true: {_short(classes[int(labels[i])])}", fontsize=8.5, color="darkgreen")
        ax.set_xlabel(f"pred: {_short(classes[int(preds[i])])} {confidence[i]:.0%}", fontsize=8.5, color="firebrick")
    return save_figure(fig, path)


def _write_csv(path: Path, header: Sequence[str], rows: list[Sequence[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def evaluation_report(
    run_dir: str | Path,
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    classes: Sequence[str],
    *,
    batch_size: int = 500,
    precision: str = "fp32",
    split: str = "test",
) -> list[Path]:
    """Classify ``images`` and write the evaluation plots and tables into ``run_dir/plots``.

    Args:
        run_dir: the run directory.
        model: the trained model (run in eval mode on its device; its mode is restored).
        images: (N, C, H, W) raw test pixels, uint8 or float 0..255 (resized to the model's size to classify).
        labels: (N,) true class indices.
        classes: class names, one per model output.
        batch_size: images per forward pass.
        precision: ``fp32`` or ``bf16``, as `evaluate.evaluate` takes it.
        split: what the data calls these images (``test``, ``val``, ``holdout``), named by `metrics.split_label`.

    Returns:
        The written files: confusion.png, confused_pairs.csv, per_class_accuracy.png, per_class.csv, misclassified.png.

    Raises:
        ReportError: no images, or labels and classes that do not match.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise ReportError(f"need as many labels as images, and at least one; got {len(images)} and {len(labels)}")
    k = len(classes)
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        raise ReportError(f"labels must lie in 0..{k - 1} for {k} class names")
    out, split = Path(run_dir) / PLOTS_DIR, split_label(split)
    preds, confidence = predict_all(model, images, batch_size=batch_size, precision=precision)
    labels = labels.cpu()
    cm = confusion_matrix(labels, preds, k)
    pairs = [(t, classes[t], p, classes[p], n, round(100 * s, 2)) for t, p, n, s in confused_pairs(cm)]
    totals = cm.sum(axis=1)
    per_class = [
        (i, classes[i], int(totals[i]), int(cm[i, i]), round(cm[i, i] / max(totals[i], 1), 4)) for i in range(k)
    ]
    return [
        plot_confusion(cm, classes, out / "confusion.png", split),
        _write_csv(
            out / "confused_pairs.csv",
            ("true_index", "true", "predicted_index", "predicted", "count", "percent_of_true"),
            pairs,
        ),
        plot_per_class(cm, classes, out / "per_class_accuracy.png", split),
        _write_csv(out / "per_class.csv", ("index", "class", "images", "correct", "accuracy"), per_class),
        plot_misclassified(images, labels, preds, confidence, classes, out / "misclassified.png", split=split),
    ]
