"""Training and evaluation: the tutorial's ``model.fit`` / ``model.evaluate`` with Keras 2 semantics (SPEC.md).

The whole dataset lives on the training device as one uint8 tensor; an epoch is one ``randperm`` and a batch an index
slice, augmented on the device (`augment.py`). Validation is the LAST ``val_split`` fraction of the training images,
taken before any shuffling (Keras ``validation_split``); normalisation statistics come from all training images,
validation part included (Keras ``adapt``). After each epoch: metrics to ``history.csv``/``history.jsonl``, ``best.pt``
when the monitored loss improved, ``last.pt`` always, then the early-stopping and plateau rules (`optim.py`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from gmlp_vision.augment import augment_batch, resize
from gmlp_vision.checkpoint import Checkpoint, save_checkpoint, unwrap
from gmlp_vision.config import Config
from gmlp_vision.data import Dataset, load_dataset
from gmlp_vision.errors import ConfigError
from gmlp_vision.model import GMLP
from gmlp_vision.optim import EarlyStopping, KerasAdamW, Plateau

log = logging.getLogger("gmlp_vision")
HISTORY_FIELDS = ("epoch", "loss", "acc", "top5", "val_loss", "val_acc", "val_top5", "lr", "seconds")


@dataclass
class Result:
    """What a finished run produced."""

    run_dir: Path
    history: list[dict[str, float]]
    test: dict[str, float]
    final_checkpoint: str  # "best.pt" when the best weights were restored at the end, else "last.pt"
    best_epoch: int  # 1-based
    stopped_early: bool


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def compute_input(images: Tensor, precision: str) -> Tensor:
    """Float pixels in the dtype the model should compute in (`GMLP.normalize`): bf16 for ``precision="bf16"``."""
    return images.to(torch.bfloat16) if precision == "bf16" else images.float()


def channel_stats(images: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population variance of (N, C, H, W) uint8 pixels, accumulated in float64.

    Works through ``chunk`` images at a time, so the temporaries stay small (a few MB) whatever the dataset size.
    """
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for part in images.split(chunk):
        x = part.float()  # exact for 0..255; squares are exact in fp32 too
        total += x.sum(dim=(0, 2, 3), dtype=torch.float64)
        total_sq += (x * x).sum(dim=(0, 2, 3), dtype=torch.float64)
    n = images.numel() // images.shape[1]
    mean = total / n
    return mean.float(), (total_sq / n - mean * mean).clamp_min(0).float()


def topk_correct(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Counts of correct top-1 and top-5 predictions (top-k over min(5, classes))."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def maybe_compile(model: nn.Module, cfg: Config) -> nn.Module:
    """``torch.compile(model)`` when ``cfg.compile`` is set (checkpoints always save the unwrapped module)."""
    return torch.compile(model) if cfg.compile else model


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimiser over every parameter (the tutorial decays biases and norms too)."""
    if cfg.optimizer == "keras-adamw":
        return KerasAdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def infer(model: nn.Module, images: Tensor, precision: str = "fp32") -> Tensor:
    """Float32 logits of ``model`` (as it is: train or eval mode) for raw pixels on its device, resized to fit."""
    x = resize(images.float(), unwrap(model).cfg.image_size)
    return model(compute_input(x, precision)).float()


@torch.no_grad()
def evaluate(
    model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 500, precision: str = "fp32"
) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy of ``model`` on uint8 ``images`` (moved to the model's device)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros_like(top1)
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        y = y.to(device)
        logits = infer(model, x.to(device), precision)
        loss += F.cross_entropy(logits, y, reduction="sum")
        c1, c5 = topk_correct(logits, y)
        top1 += c1
        top5 += c5
    model.train(was_training)
    n = max(len(labels), 1)
    return {"loss": loss.item() / n, "acc": top1.item() / n, "top5": top5.item() / n}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """One optimiser step on a uint8 batch: resize, augment, forward, loss, backward, update.

    Returns:
        The loss (scalar) and the float32 logits, both detached.
    """
    x = resize(images.float(), cfg.model.image_size)
    x = augment_batch(x, flip=cfg.flip, zoom_amount=cfg.zoom, generator=generator)
    logits = model(compute_input(x, cfg.precision)).float()
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    generator: torch.Generator,
    progress: tqdm | None = None,
) -> dict[str, float]:
    """One pass over ``images`` (uint8, on the device) in shuffled batches; returns mean loss, top-1 and top-5."""
    model.train()
    device = images.device
    n = len(labels)
    perm = torch.randperm(n, device=device, generator=generator)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros_like(top1)
    for idx in perm.split(cfg.batch_size):
        y = labels[idx]
        loss, logits = train_step(model, optimizer, images[idx], y, cfg, generator)
        with torch.no_grad():
            loss_sum += loss * len(y)
            c1, c5 = topk_correct(logits, y)
            top1 += c1
            top5 += c5
        if progress is not None:
            progress.update(1)
    return {"loss": loss_sum.item() / n, "acc": top1.item() / n, "top5": top5.item() / n}


def default_run_dir(cfg: Config) -> Path:
    """``runs/<dataset>-<preset>-<YYYYmmdd-HHMMSS>``."""
    return Path("runs") / f"{cfg.dataset}-{cfg.preset or 'custom'}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(path: Path) -> Path:
    """Create the run directory; refuse one that already holds a run."""
    if (path / "config.json").exists() or (path / "last.pt").exists():
        raise ConfigError(f"--out {path} already holds a run; choose another directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    """Rewrite ``history.csv`` and ``history.jsonl`` with every epoch so far."""
    with open(run_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    with open(run_dir / "history.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in history)


def format_epoch(row: dict[str, float], epochs: int, steps: int) -> str:
    """A Keras-like epoch line: ``Epoch 3/100 - 352/352 - 15s - loss: ... - val_top5-acc: ... - lr: 0.003``."""
    names = (("loss", "loss"), ("acc", "acc"), ("top5", "top5-acc"))
    parts = [f"Epoch {int(row['epoch'])}/{epochs}", f"{steps}/{steps}", f"{row['seconds']:.0f}s"]
    parts += [f"{prefix}{name}: {row[prefix + key]:.4f}" for prefix in ("", "val_") for key, name in names
              if prefix + key in row]  # fmt: skip
    parts.append(f"lr: {row['lr']:.4g}")
    return " - ".join(parts)


def train(cfg: Config, dataset: Dataset | None = None) -> Result:
    """Train a gMLP as ``cfg`` says, evaluate it on the test split, and leave everything in the run directory.

    Args:
        cfg: the resolved run configuration.
        dataset: an already loaded dataset (default: load ``cfg.dataset`` from ``cfg.data`` or the cache).

    Returns:
        The run's `Result`.

    Raises:
        ConfigError: options that cannot work with this data or machine.
        DataError: the dataset cannot be loaded.
    """
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ds = (
        dataset
        if dataset is not None
        else load_dataset(
            cfg.dataset, cfg.data, download=cfg.download, verify_md5=cfg.verify_md5, progress=cfg.progress
        )
    )
    # Class count and channels are facts of the data, not choices.
    cfg = replace(cfg, model=replace(cfg.model, num_classes=ds.num_classes, in_chans=ds.in_chans))
    images, labels = ds.train.images, ds.train.labels
    if cfg.train_limit:
        images, labels = images[: cfg.train_limit], labels[: cfg.train_limit]
    n_train = int(math.floor(len(labels) * (1.0 - cfg.val_split)))  # Keras validation_split
    if n_train < 1:
        raise ConfigError(f"no training images left: {len(labels)} images with --val-split {cfg.val_split}")
    mean, var = channel_stats(images)  # from all training images, validation included (Keras adapt)

    run_dir = prepare_run_dir(Path(cfg.out) if cfg.out else default_run_dir(cfg))
    cfg = replace(cfg, out=str(run_dir))
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    torch.manual_seed(cfg.seed)
    model = GMLP(cfg.model)
    model.set_normalization(mean, var)
    model.to(device)
    optimizer = build_optimizer(cfg, model)
    model = maybe_compile(model, cfg)
    plateau = Plateau(optimizer, cfg.plateau_factor, cfg.plateau_patience, cfg.plateau_threshold)
    stopper = EarlyStopping(cfg.early_stop_patience)
    generator = torch.Generator(device).manual_seed(cfg.seed)

    train_x, train_y = images[:n_train].to(device), labels[:n_train].to(device)
    val_x, val_y = images[n_train:].to(device), labels[n_train:].to(device)
    steps = math.ceil(n_train / cfg.batch_size)
    log.info(
        "training %s on %s: %d train / %d validation images, %d steps per epoch, device %s, run dir %s",
        cfg.preset or "custom config",
        cfg.dataset,
        n_train,
        len(val_y),
        steps,
        device,
        run_dir,
    )
    history: list[dict[str, float]] = []
    best_state: dict[str, Tensor] | None = None
    stopped = False
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        with tqdm(total=steps, desc=f"epoch {epoch + 1}", leave=False, disable=not cfg.progress) as bar:
            row: dict[str, float] = {
                "epoch": epoch + 1,
                **train_one_epoch(model, optimizer, train_x, train_y, cfg, generator, bar),
            }
        if len(val_y):
            val = evaluate(model, val_x, val_y, batch_size=cfg.eval_batch_size, precision=cfg.precision)
            row.update({f"val_{k}": v for k, v in val.items()})
        row.update(lr=lr, seconds=time.perf_counter() - t0)
        history.append(row)
        write_history(run_dir, history)
        monitored = row.get("val_loss", row["loss"])  # Keras monitors val_loss; without validation, the train loss
        if monitored < stopper.best:
            best_state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
            _save(run_dir / "best.pt", cfg, model, ds, epoch + 1, steps * (epoch + 1), row)
        stopped = stopper.step(monitored, epoch)  # Keras callback order: EarlyStopping, then ReduceLROnPlateau
        plateau.step(monitored)
        train_state = {
            "optimizer": optimizer.state_dict(),
            "plateau": plateau.state_dict(),
            "early_stopping": stopper.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
        }
        _save(run_dir / "last.pt", cfg, model, ds, epoch + 1, steps * (epoch + 1), row, train_state)
        log.info(format_epoch(row, cfg.epochs, steps))
        if stopped:
            log.info("early stopping: no val_loss improvement for %d epochs", cfg.early_stop_patience)
            break

    restore = best_state is not None and (cfg.restore_best == "always" or (stopped and cfg.restore_best == "on-stop"))
    if restore:
        unwrap(model).load_state_dict(best_state)
        log.info("restored the weights of the best epoch (%d)", stopper.best_epoch + 1)
    test = evaluate(model, ds.test.images.to(device), ds.test.labels.to(device), batch_size=cfg.eval_batch_size,
                    precision=cfg.precision)  # fmt: skip
    final = "best.pt" if restore else "last.pt"
    summary = {"test": test, "final_checkpoint": final, "best_epoch": stopper.best_epoch + 1,
               "stopped_early": stopped, "epochs_run": len(history)}  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return Result(run_dir, history, test, final, stopper.best_epoch + 1, stopped)


def _save(
    path: Path, cfg: Config, model: nn.Module, ds: Dataset, epoch: int, step: int, metrics: dict[str, float],
    train_state: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    ckpt = Checkpoint(cfg, unwrap(model).state_dict(), ds.classes, epoch, step, metrics, train_state or {})
    save_checkpoint(path, ckpt)
