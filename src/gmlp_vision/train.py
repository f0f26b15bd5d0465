"""Training and evaluation: the tutorial's ``model.fit`` / ``model.evaluate`` with Keras 2 semantics (SPEC.md).

The whole dataset lives on the training device as one uint8 tensor; an epoch is one ``randperm`` and a batch an index
slice, augmented on the device (`augment.py`). Validation is the LAST ``val_split`` fraction of the training images,
taken before any shuffling (Keras ``validation_split``); normalisation statistics come from all training images,
validation part included (Keras ``adapt``). After each epoch: metrics to ``history.csv``/``history.jsonl``, ``best.pt``
when the monitored loss improved, ``last.pt`` always, then the early-stopping and plateau rules (`optim.py`).
"""

from __future__ import annotations

import inspect
import logging
import math
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gmlp_vision.augment import augment_for_training
from gmlp_vision.checkpoint import Checkpoint, load_checkpoint, nonfinite_names, save_checkpoint
from gmlp_vision.config import Config
from gmlp_vision.data import Dataset, load_dataset
from gmlp_vision.data.stream import ImageFiles
from gmlp_vision.distributed import Dist, distributed, maybe_compile, unwrap
from gmlp_vision.errors import CheckpointError, ConfigError, NonFiniteLossError, TrainingInterrupted
from gmlp_vision.evaluate import compute_input, evaluate, infer, topk_correct
from gmlp_vision.loop import METRICS, EpochProgress, StopRequests, train_one_epoch, train_step
from gmlp_vision.model import GMLP
from gmlp_vision.optim import EarlyStopping, LrSchedule, Plateau, WeightEMA, build_optimizer
from gmlp_vision.rundir import (
    RunLock,
    check_same_run,
    default_run_dir,
    format_epoch,
    prepare_run_dir,
    remove_stale_temps,
    write_history,
    write_json,
)
from gmlp_vision.transfer import apply_pretrained, read_pretrained

log = logging.getLogger("gmlp_vision")

# The training API, and what moved out of this module but is still imported from here (evaluation, the optimiser).
__all__ = [
    "Result",
    "augment_for_training",
    "build_optimizer",
    "channel_stats",
    "compute_input",
    "evaluate",
    "infer",
    "maybe_compile",
    "topk_correct",
    "train",
    "train_one_epoch",
    "train_step",
]


@dataclass
class Result:
    """What a finished run produced."""

    run_dir: Path
    history: list[dict[str, float]]
    test: dict[str, float]
    final_checkpoint: str  # "best.pt" when the best weights were restored at the end, else "last.pt"
    best_epoch: int  # 1-based
    stopped_early: bool
    test_ema: dict[str, float] | None = None  # the weight average's test metrics (--ema)


def channel_stats(images: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population variance of (N, C, H, W) uint8 pixels, accumulated in float64.

    Works through ``chunk`` images at a time, so the temporaries stay small (a few MB) whatever the dataset size.
    """
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    n = 0
    for part in images.split(chunk):
        x = part.float()  # exact for 0..255; squares are exact in fp32 too
        total += x.sum(dim=(0, 2, 3), dtype=torch.float64)
        total_sq += (x * x).sum(dim=(0, 2, 3), dtype=torch.float64)
        n += x.numel() // x.shape[1]
    mean = total / n
    return mean.float(), (total_sq / n - mean * mean).clamp_min(0).float()


EpochCallback = Callable[[dict[str, float], nn.Module, "nn.Module | None"], None]


def train(
    cfg: Config, dataset: Dataset | None = None, *, resume: bool = False, on_epoch_end: EpochCallback | None = None
) -> Result:
    """Train a gMLP as ``cfg`` says, evaluate it on the test split, and leave everything in the run directory.

    Started by ``torchrun``, every process calls this with the same config: they train one model data-parallel
    (see `gmlp_vision.distributed`), and rank 0 alone logs and writes the run directory.

    Args:
        cfg: the resolved run configuration.
        dataset: an already loaded dataset (default: load ``cfg.dataset`` from ``cfg.data`` or the cache).
        resume: continue the run in ``cfg.out`` from its ``last.pt`` (exactly: weights, optimiser, schedules,
            position in the epoch, every RNG), or start it there if it never saved one.
        on_epoch_end: called on every rank after each epoch's row is complete, with the row, the model and the
            weight average (``--ema``; else None), both unwrapped; e.g. to evaluate on the test set on the way.

    Returns:
        The run's `Result`.

    Raises:
        ConfigError: options that cannot work with this data or machine.
        DataError: the dataset cannot be loaded.
        NonFiniteLossError: the loss became NaN or infinite (the last good ``last.pt`` is kept).
        TrainingInterrupted: SIGINT or SIGTERM; ``last.pt`` was saved at the step where training stopped.
        CheckpointError: a checkpoint could not be written (the previous one is intact) or resumed.
    """
    with distributed(cfg.device) as (ctx, device), ExitStack() as held:
        return _train(cfg, dataset, resume, ctx, device, on_epoch_end, held)


def _train(
    cfg: Config, dataset: Dataset | None, resume: bool, ctx: Dist, device: torch.device,
    on_epoch_end: EpochCallback | None, held: ExitStack,
) -> Result:  # fmt: skip
    info = log.info if ctx.main else (lambda *args: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Resuming: take the run directory's lock before the data is loaded, so a second writer is told at once.
    locked = resume and ctx.main and bool(cfg.out) and Path(cfg.out or "").is_dir()
    if locked:
        held.enter_context(RunLock(Path(cfg.out or "")))
    ds = dataset if dataset is not None else ctx.main_first(lambda: load_dataset(
        cfg.dataset, cfg.data, download=cfg.download, verify_md5=cfg.verify_md5, progress=cfg.progress and ctx.main,
        image_size=cfg.model.image_size, skip_bad=cfg.skip_bad_images, folder_mode=cfg.folder_mode,
        workers=cfg.workers, crop_scale=cfg.crop_scale,
    ))  # fmt: skip
    # Class count and channels are facts of the data, not choices.
    cfg = replace(cfg, model=replace(cfg.model, num_classes=ds.num_classes, in_chans=ds.in_chans))
    images, labels = ds.train.images, ds.train.labels
    if cfg.train_limit:
        images, labels = images[: cfg.train_limit], labels[: cfg.train_limit]
    n_train = int(math.floor(len(labels) * (1.0 - cfg.val_split)))  # Keras validation_split
    if n_train < 1:
        raise ConfigError(f"no training images left: {len(labels)} images with --val-split {cfg.val_split}")

    # Pretrained weights are read and checked before anything is written: a bad --init leaves no run directory.
    pretrained = read_pretrained(cfg.init, cfg.model) if cfg.init else None
    run_dir, saved, best_state = ctx.on_main(lambda: _open_run_dir(cfg, resume, None if locked else held))
    cfg = replace(cfg, out=str(run_dir))

    torch.manual_seed(cfg.seed)
    model = GMLP(cfg.model)
    model.set_normalization(*channel_stats(_stats_sample(images, cfg.seed)))  # validation included (Keras adapt)
    if pretrained is not None and saved is None:  # pretrained weights bring their own normalisation
        apply_pretrained(model, pretrained)
    model.to(device)
    net = model  # the module itself, whatever wraps it below
    optimizer = build_optimizer(cfg, model)
    plateau = Plateau(optimizer, cfg.plateau_factor, cfg.plateau_patience, cfg.plateau_threshold)
    stopper = EarlyStopping(cfg.early_stop_patience)
    # Augmentation and dropout draw from per-rank streams (rank 0's is the single-process one); the epoch order comes
    # from one CPU generator that every rank seeds the same.
    if ctx.rank:
        torch.manual_seed(_rank_seed(cfg.seed, ctx.rank))
    generator = torch.Generator(device).manual_seed(_rank_seed(cfg.seed, ctx.rank))
    order = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    epoch_state: EpochProgress | None = None
    start_epoch, step = 0, 0
    if saved is not None:
        start_epoch, step, history, epoch_state = _restore(saved, model, optimizer, plateau, stopper, generator,
                                                           order, device, ctx)  # fmt: skip
        info("resuming %s at epoch %d, step %d", run_dir, start_epoch + 1, step)
    ema = WeightEMA(net, cfg.ema) if cfg.ema else None
    if ema is not None and saved is not None:
        try:
            ema.load_state_dict(saved.train_state["ema"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"cannot resume the weight average from last.pt: {e}") from None
    if ctx.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids, **_NO_BUFFER_SYNC)
    model = maybe_compile(model, cfg)

    train_x, train_y = images[:n_train].to(device), labels[:n_train].to(device)
    val_x, val_y = images[n_train:].to(device), labels[n_train:].to(device)
    steps = math.ceil(n_train / cfg.batch_size)
    schedule = LrSchedule.from_config(cfg, steps)
    info(
        "training %s on %s: %d train / %d validation images, %d steps per epoch, device %s, run dir %s",
        cfg.preset or "custom config", cfg.dataset, n_train, len(val_y), steps, device, run_dir,
    )  # fmt: skip
    if ctx.enabled:
        share = math.ceil(cfg.batch_size / ctx.world)
        info("data parallel over %d processes (%s): each global batch of %d is split into shares of %d or fewer",
             ctx.world, torch.distributed.get_backend(), cfg.batch_size, share)  # fmt: skip

    def save_last(epoch: int, row: dict[str, float] | None, progress: EpochProgress | None) -> None:
        rank_state = {
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "sums": {k: v.cpu() for k, v in progress.sums.items()} if progress is not None else {},
        }
        ranks = ctx.gather(rank_state)  # every rank's random streams and sums, so each can resume its own
        train_state = {
            "optimizer": optimizer.state_dict(),
            "plateau": plateau.state_dict(),
            "early_stopping": stopper.state_dict(),
            "order_generator": order.get_state(),
            "ema": ema.state_dict() if ema is not None else None,
            "ranks": ranks,
            "history": history,
            "epoch_progress": progress.state_dict() if progress is not None else None,
        }
        step_now = progress.step if progress is not None else step
        _require_finite(run_dir, f"by step {step_now}", net, ema.module if ema is not None else None)
        ctx.on_main(partial(_save, run_dir / "last.pt", cfg, model, ds, epoch, step_now, row or {}, train_state))

    stops = StopRequests()
    stopped = False
    board = None
    if cfg.tensorboard and ctx.main:
        from gmlp_vision.report import TensorBoardLogger  # optional extra, imported only when asked for

        board = TensorBoardLogger(run_dir)

    def after_step(progress: EpochProgress, stop: bool) -> None:
        if ema is not None:
            ema.update(net)
        if stop:
            save_last(epoch, None, progress)
            signum = stops.signum or signal.SIGTERM  # under torchrun the signal may have reached another rank first
            raise TrainingInterrupted(
                f"{signal.Signals(signum).name}: stopped after step {progress.step}; "
                f"resume with: gmlp train --resume {run_dir}",
                signum,
            )
        if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0 and progress.batch < steps:
            save_last(epoch, None, progress)

    with stops.installed():
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            if epoch_state is None:
                epoch_state = EpochProgress(torch.randperm(n_train, generator=order).to(device), step=step)
            lr = schedule.reported(optimizer, epoch_state.step - epoch_state.batch)  # the epoch's first step's
            with tqdm(total=steps, initial=epoch_state.batch, desc=f"epoch {epoch + 1}", leave=False,
                      disable=not (cfg.progress and ctx.main)) as bar:  # fmt: skip
                metrics = train_one_epoch(
                    model, optimizer, train_x, train_y, cfg, generator, bar, state=epoch_state, ctx=ctx,
                    stop_requested=lambda: stops.signum is not None, after_step=after_step,
                )  # fmt: skip
            step, epoch_state = epoch_state.step, None
            averaged = ema.module if ema is not None else None
            _require_finite(run_dir, f"in epoch {epoch + 1} (by step {step})", net, averaged)
            row: dict[str, float] = {"epoch": epoch + 1, **metrics}
            if len(val_y):
                val = evaluate(model, val_x, val_y, batch_size=cfg.eval_batch_size, precision=cfg.precision, ctx=ctx)
                if not math.isfinite(val["loss"]):  # finite weights can still overflow the logits
                    raise NonFiniteLossError(f"the validation loss became {val['loss']} in epoch {epoch + 1}; "
                                             f"{_kept(run_dir)}")  # fmt: skip
                row.update({f"val_{k}": v for k, v in val.items()})
                if ema is not None:
                    val = evaluate(ema.module, val_x, val_y, batch_size=cfg.eval_batch_size, precision=cfg.precision,
                                   ctx=ctx)  # fmt: skip
                    row.update({f"val_ema_{k}": v for k, v in val.items()})
            row.update(lr=lr, seconds=time.perf_counter() - t0)
            history.append(row)
            monitored = row.get("val_loss", row["loss"])  # Keras monitors val_loss; without validation, the train loss
            if monitored < stopper.best:  # every rank sees the same reduced metrics, so every rank decides the same
                best_state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
                ctx.on_main(partial(_save, run_dir / "best.pt", cfg, model, ds, epoch + 1, step, row))
            stopped = stopper.step(monitored, epoch)  # Keras callback order: EarlyStopping, then ReduceLROnPlateau
            plateau.step(monitored)
            save_last(epoch + 1, row, None)
            if ctx.main:
                write_history(run_dir, history)
                if board is not None:
                    board.log_epoch(row)
            info(format_epoch(row, cfg.epochs, steps))
            if on_epoch_end is not None:
                on_epoch_end(row, net, ema.module if ema is not None else None)
            if stopped:
                info("early stopping: no val_loss improvement for %d epochs", cfg.early_stop_patience)
                break

    if board is not None:
        board.close()
    restore = best_state is not None and (cfg.restore_best == "always" or (stopped and cfg.restore_best == "on-stop"))
    if restore:
        unwrap(model).load_state_dict(best_state)
        info("restored the weights of the best epoch (%d)", stopper.best_epoch + 1)
    test = evaluate(model, ds.test.images, ds.test.labels, batch_size=cfg.eval_batch_size, precision=cfg.precision,
                    ctx=ctx)  # fmt: skip
    final = "best.pt" if restore else "last.pt"
    summary = {"test": test, "final_checkpoint": final, "best_epoch": stopper.best_epoch + 1,
               "stopped_early": stopped, "epochs_run": len(history)}  # fmt: skip
    if ema is not None:
        summary["test_ema"] = evaluate(ema.module, ds.test.images, ds.test.labels, batch_size=cfg.eval_batch_size,
                                       precision=cfg.precision, ctx=ctx)  # fmt: skip
        ctx.on_main(partial(_save, run_dir / "ema.pt", cfg, ema.module, ds, len(history), step, summary["test_ema"]))

    def finish() -> None:
        write_json(run_dir / "results.json", summary)
        from gmlp_vision.report import write_report  # report uses infer() from here: imported at use, not at load

        write_report(run_dir, unwrap(model), ds.test.images, ds.test.labels, ds.classes,
                     batch_size=cfg.eval_batch_size, precision=cfg.precision)  # fmt: skip

    ctx.on_main(finish)
    return Result(run_dir, history, test, final, stopper.best_epoch + 1, stopped, summary.get("test_ema"))


STATS_SAMPLE = 10_000  # streamed folders: images the normalisation statistics are computed from


def _stats_sample(images: Tensor | ImageFiles, seed: int) -> Tensor | ImageFiles:
    """All training images in memory; a fixed random sample of `STATS_SAMPLE` streamed files."""
    if isinstance(images, Tensor) or len(images) <= STATS_SAMPLE:
        return images
    return images.subset(torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE])


# The model's buffers (normalisation statistics) are the same on every rank: no broadcast before each forward.
# torch 2.13 renamed the option; older releases only know the old name.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)

# Rank r > 0 seeds its augmentation and dropout with seed + r * stride (rank 0 keeps the seed: one process as before).
RANK_SEED_STRIDE = 1_000_003


def _rank_seed(seed: int, rank: int) -> int:
    return seed + RANK_SEED_STRIDE * rank


def _open_run_dir(
    cfg: Config, resume: bool, held: ExitStack | None
) -> tuple[Path, Checkpoint | None, dict[str, Tensor] | None]:
    """Rank 0's part of starting a run: the locked run directory with its config.json, and what to resume from.

    Args:
        held: where to keep the run directory's lock until training ends (None: the caller holds it already).
    """
    saved = best = None
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    if held is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(RunLock(run_dir))  # before anything in it is read, deleted or written
    if resume:
        remove_stale_temps(run_dir)
        if (run_dir / "last.pt").exists():
            saved = load_checkpoint(run_dir / "last.pt")
            check_same_run(cfg, saved.config, run_dir / "last.pt")
            if (run_dir / "best.pt").exists():
                best_ckpt = load_checkpoint(run_dir / "best.pt")
                check_same_run(cfg, best_ckpt.config, run_dir / "best.pt")
                best = best_ckpt.model_state
            # A kill between last.pt and history.csv left the CSV one epoch behind.
            write_history(run_dir, list(saved.train_state.get("history", [])))
    else:
        prepare_run_dir(run_dir)
    write_json(run_dir / "config.json", replace(cfg, out=str(run_dir)).to_dict())
    return run_dir, saved, best


def _require_finite(run_dir: Path, where: str, *models: nn.Module | None) -> None:
    """Stop the run when a model's weights hold NaN or inf (one device sync): they must never be saved or reported.

    Raises:
        NonFiniteLossError: naming the step and the checkpoint that stays (every saved one is finite).
    """
    for model in models:
        bad = nonfinite_names(unwrap(model).state_dict()) if model is not None else []
        if bad:
            raise NonFiniteLossError(
                f"the weights became NaN or infinite {where} ({len(bad)} tensors, e.g. {bad[0]}); {_kept(run_dir)}"
            )


def _kept(run_dir: Path) -> str:
    """What a run stopped for NaN or inf leaves behind, and what to try."""
    if not (run_dir / "last.pt").exists():
        return "no checkpoint was written; a lower --lr or --clip-grad may help"
    last = run_dir / "last.pt"
    return f"{last} keeps the last finite weights; go on from them with --init {last} and a lower --lr or --clip-grad"


def _restore(
    saved: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plateau: Plateau,
    stopper: EarlyStopping,
    generator: torch.Generator,
    order: torch.Generator,
    device: torch.device,
    ctx: Dist,
) -> tuple[int, int, list[dict[str, float]], EpochProgress | None]:
    """Load a ``last.pt`` into the fresh training objects; returns epoch, step, history and a partial epoch.

    Each rank takes back its own random streams and running sums. Resumed on another number of processes, the
    weights, optimiser and epoch order carry on exactly; the sums move to rank 0 (only their total counts) and
    augmentation and dropout continue with new streams (a warning says so).
    """
    ts = saved.train_state
    try:
        model.load_state_dict(saved.model_state)
        optimizer.load_state_dict(ts["optimizer"])
        plateau.load_state_dict(ts["plateau"])
        stopper.load_state_dict(ts["early_stopping"])
        if "ranks" not in ts:
            raise CheckpointError("last.pt comes from an earlier development version; this one cannot resume it")
        order.set_state(ts["order_generator"])
        ranks = ts["ranks"]
        if len(ranks) == ctx.world:
            mine = ranks[ctx.rank]
            generator.set_state(mine["generator"])
            torch.set_rng_state(mine["torch_rng"])
            if mine["cuda_rng"] and device.type == "cuda":
                torch.cuda.set_rng_state_all(mine["cuda_rng"])
            sums = mine["sums"]
        else:
            if ctx.main:
                log.warning("last.pt was saved by %d processes and is resumed by %d: augmentation and dropout "
                            "continue with new random streams", len(ranks), ctx.world)  # fmt: skip
            reseed = _rank_seed(saved.config.seed, ctx.rank) + 7919 * saved.step
            generator.manual_seed(reseed)
            torch.manual_seed(reseed)
            sums = {k: sum(r["sums"][k] for r in ranks) for k in METRICS} if ctx.main and ranks[0]["sums"] else {}
        part = ts.get("epoch_progress")
        progress = None
        if part is not None:
            sums = {k: v.to(device) for k, v in sums.items()}
            progress = EpochProgress(part["perm"].to(device), int(part["batch"]), int(part["step"]), sums)
        return saved.epoch, saved.step, list(ts["history"]), progress
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot resume from last.pt: {str(e).splitlines()[0]}") from None


def _save(
    path: Path, cfg: Config, model: nn.Module, ds: Dataset, epoch: int, step: int, metrics: dict[str, float],
    train_state: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    ckpt = Checkpoint(cfg, unwrap(model).state_dict(), ds.classes, epoch, step, metrics, train_state or {})
    try:
        save_checkpoint(path, ckpt)
    except OSError as e:
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"could not write {path}: {e.strerror or e}; {kept}") from None
