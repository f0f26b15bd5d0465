"""What a run measures and how its history row looks: the losses, the top-k counts, the row's columns and its line.

An epoch's row is ``epoch``, the training `METRICS` (mean loss, top-1, top-5 over every image of the epoch), the same on
the validation split (``val_``) and, with ``--ema``, of the averaged weights (``val_ema_``), then ``lr`` and
``seconds`` (`epoch_row`). ``history.csv``/``history.jsonl``, TensorBoard, the plots and the resume checks all read
these names from here. Top-5 accuracy is kept everywhere but shown only where it says something (`shows_top5`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("loss", "acc", "top5")  # per split: mean loss, top-1 and top-5 accuracy (an epoch's running sums, in order)
VALIDATION, AVERAGED = "val_", "val_ema_"  # the prefixes of the validation split's metrics, and the weight average's
HISTORY_FIELDS = ("epoch", *METRICS, *(VALIDATION + k for k in METRICS), "lr", "seconds")
EMA_FIELDS = tuple(AVERAGED + k for k in METRICS)  # with --ema: the averaged weights on validation
ROW_NEEDS = frozenset({"epoch", *METRICS, "lr", "seconds"})  # what every row has (the rest needs validation images)

Targets = tuple[Tensor, Tensor | None, Tensor | float]  # labels, the mixing partner's index, the kept share lam


def split_label(split: str) -> str:
    """How people read the evaluation split's name (``Dataset.test_split``), never to be taken for the validation.

    The per-epoch ``val_*`` metrics are the validation split (a slice of the training data, or the data's own val
    split when it has val and test parts); the final evaluation is always a *test*: ``test``, ``test (val/)`` where a
    ``val/`` folder or ``val`` rows serve as the test split, ``held-out test`` where the loader held files out.
    """
    return {"test": "test", "val": "test (val/)", "holdout": "held-out test"}.get(split, f"test ({split})")


def accuracy_lines(label: str, metrics: dict[str, float], top5: bool) -> list[str]:
    """A split's accuracy lines: ``"Test accuracy: 97.50%"``, and its top-5 line where that says something."""
    lines = [f"{label} accuracy: {100 * metrics['acc']:.2f}%"]
    return lines + [f"{label} top 5 accuracy: {100 * metrics['top5']:.2f}%"] if top5 else lines


def result_lines(summary: dict[str, Any], top5: bool) -> list[str]:
    """What a finished run says of its test: each tested file's accuracy lines (``results.json`` is ``summary``)."""
    label = split_label(summary["test_split"])
    label = label[0].upper() + label[1:]
    if "test_ema" not in summary:
        return accuracy_lines(label, summary["test"], top5)
    plain = accuracy_lines(f"Weights ({summary['test_checkpoint']}), {label}", summary["test"], top5)
    return plain + accuracy_lines(f"Weight average (ema.pt), {label}", summary["test_ema"], top5)


def top_classes(probs: Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Each row's ``k`` most probable classes (at most all), most probable first: ``(index, probability)`` pairs."""
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [list(zip(ix, v, strict=True)) for v, ix in zip(values.tolist(), indices.tolist(), strict=True)]


def test_metrics(summary: dict[str, Any], sep: str = "_") -> dict[str, float]:
    """``results.json``'s finite test metrics, flat: ``test_acc``, ``test_ema_acc``, ... (``sep`` between the parts)."""
    out = {}
    for split in ("test", "test_ema"):
        for key, value in (summary.get(split) or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{split}{sep}{key}"] = float(value)
    return out


def shows_top5(num_classes: int) -> bool:
    """Whether top-5 accuracy says something: with 10 classes or fewer it is shown nowhere (output, plots, card)."""
    return num_classes > 10


def topk_correct(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Counts of correct top-1 and top-5 predictions (top-k over min(5, classes)), over the rows in ``mask``."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    if mask is not None:
        hits &= mask[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def training_loss(logits: Tensor, targets: Targets, label_smoothing: float = 0.0) -> Tensor:
    """Every image's cross-entropy, label-smoothed as configured.

    A mixed batch's target ``lam * y + (1 - lam) * y[partner]`` is taken as the same mix of the two targets' losses.
    """
    labels, partner, lam = targets
    loss = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    if partner is None:
        return loss
    other = F.cross_entropy(logits, labels[partner], reduction="none", label_smoothing=label_smoothing)
    return lam * loss + (1.0 - lam) * other


def summed_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The plain cross-entropy summed over a batch: the loss evaluation reports (no smoothing, no mixing)."""
    return F.cross_entropy(logits, labels, reduction="sum")


@torch.no_grad()
def add_metrics(
    sums: dict[str, Tensor], nonfinite: Tensor, losses: Tensor, logits: Tensor, labels: Tensor, mask: Tensor | None
) -> Tensor:
    """Add a step's loss sum and top-1 / top-5 counts (rows in ``mask``) to ``sums``; flag a non-finite loss.

    Returns:
        The step's loss sum (a device scalar), counted in ``nonfinite`` (in place) when it is NaN or infinite.
    """
    loss = losses.sum() if mask is None else (losses * mask).sum()
    nonfinite |= ~torch.isfinite(loss)
    top1, top5 = topk_correct(logits, labels, mask)
    sums["loss"] += loss
    sums["acc"] += top1
    sums["top5"] += top5
    return loss


def epoch_row(
    epoch: int,
    train: dict[str, float],
    val: dict[str, float] | None = None,
    averaged: dict[str, float] | None = None,
    *,
    lr: float,
    seconds: float,
) -> dict[str, float]:
    """An epoch's history row, its columns in `HISTORY_FIELDS` order (`EMA_FIELDS` before ``lr`` with ``--ema``)."""
    row: dict[str, float] = {"epoch": epoch, **train}
    row.update({VALIDATION + k: v for k, v in (val or {}).items()})
    row.update({AVERAGED + k: v for k, v in (averaged or {}).items()})
    row.update(lr=lr, seconds=seconds)
    return row


def format_epoch(row: dict[str, float], epochs: int, top5: bool = True) -> str:
    """A Keras-like epoch line: ``Epoch 3/100 - 15s - loss: 1.2345 - acc: 0.5742 - val_loss: ... - lr: 0.003``.

    Top-5 accuracy is shown only where it says something (``top5``: `shows_top5`); history.csv keeps it.
    """
    names = (("loss", "loss"), ("acc", "acc"), ("top5", "top5-acc"))[: 3 if top5 else 2]
    parts = [f"Epoch {int(row['epoch'])}/{epochs}", f"{row['seconds']:.0f}s"]
    parts += [
        f"{prefix}{name}: {row[prefix + key]:.4f}"
        for prefix in ("", VALIDATION, AVERAGED)
        for key, name in names
        if prefix + key in row
    ]
    parts.append(f"lr: {row['lr']:.4g}")
    return " - ".join(parts)
