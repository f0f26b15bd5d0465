"""Training and evaluation: the tutorial's ``model.fit`` / ``model.evaluate`` with Keras 2 semantics.

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
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gmlp_vision.config import Config, train_command
from gmlp_vision.cpu import use_cpu_threads
from gmlp_vision.data import Dataset, load_dataset
from gmlp_vision.data.base import channel_stats
from gmlp_vision.data.stream import ImageFiles, stats_sample
from gmlp_vision.distributed import distributed, maybe_compile
from gmlp_vision.errors import ConfigError, NonFiniteLossError
from gmlp_vision.evaluate import evaluate
from gmlp_vision.graphs import GraphStep, unsupported
from gmlp_vision.loop import train_one_epoch
from gmlp_vision.model import GMLP
from gmlp_vision.optim import LrSchedule, build_optimizer
from gmlp_vision.pretrained import read_pretrained
from gmlp_vision.resume_check import training_images
from gmlp_vision.rundir import RunLock, format_epoch, open_run_dir, write_history, write_json
from gmlp_vision.runtime import Dist
from gmlp_vision.state import EpochProgress, TrainState, rank_seed
from gmlp_vision.transfer import apply_pretrained

log = logging.getLogger("gmlp_vision")

__all__ = ["EpochCallback", "Result", "train"]


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
    test_split: str = "test"  # what the data calls the split ``test`` was measured on (a folder's val/ or test/)
    plots: list[Path] = field(default_factory=list)  # the PNGs and CSVs written under RUN_DIR/plots
    shows_top5: bool = True  # `Dataset.shows_top5`: whether the output mentions top-5 accuracy


EpochCallback = Callable[[dict[str, float], nn.Module, "nn.Module | None"], None]


def train(
    cfg: Config, dataset: Dataset | None = None, *, resume: bool = False, on_epoch_end: EpochCallback | None = None
) -> Result:
    """Train a gMLP as ``cfg`` says, evaluate it on the test split, and leave everything in the run directory.

    Started by ``torchrun``, every process calls this with the same config: they train one model data-parallel
    (see `gmlp_vision.distributed`), and rank 0 alone logs and writes the run directory.

    Args:
        cfg: the resolved run configuration.
        dataset: an already loaded dataset (default: load ``cfg.data.dataset`` from ``cfg.data.data`` or the cache).
        resume: continue the run in ``cfg.run.out`` from its ``last.pt`` (exactly: weights, optimiser, schedules,
            position in the epoch, every RNG), or start it there if it never saved one.
        on_epoch_end: called on every rank after each epoch's row is complete, with the row, the model and the
            weight average (``--ema``; else None), both unwrapped; e.g. to evaluate on the test set on the way.

    Returns:
        The run's `Result`.

    Raises:
        ConfigError: options that cannot work with this data or machine.
        DataError: the dataset cannot be loaded.
        NonFiniteLossError: the loss, the weights or the validation loss became NaN or infinite (every checkpoint
            kept is finite).
        TrainingInterrupted: SIGINT or SIGTERM; ``last.pt`` was saved at the step where training stopped.
        CheckpointError: a checkpoint could not be written (the previous one is intact) or resumed.
    """
    if cfg.run.tensorboard:  # a missing extra is told before the data loads or the run directory is made
        from gmlp_vision.report import require_tensorboard

        require_tensorboard()
    with distributed(cfg.run.device) as (ctx, device), ExitStack() as held:
        _use_threads(ctx, cfg.run.threads, held)
        # Resuming: take the run directory's lock before the data is loaded, so a second writer is told at once.
        locked = resume and ctx.main and bool(cfg.run.out) and Path(cfg.run.out or "").is_dir()
        if locked:
            held.enter_context(RunLock(Path(cfg.run.out or "")))
        ds = dataset if dataset is not None else ctx.main_first(partial(_load_data, cfg, ctx.main))
        state, data, partial_epoch = _start(cfg, ds, resume, ctx, device, None if locked else held)
        stopped = False
        with state.stops.installed():
            while state.epoch < state.cfg.optim.epochs:
                row = _run_epoch(state, data, partial_epoch)
                partial_epoch = None
                stopped = _end_epoch(state, row)
                if on_epoch_end is not None:
                    on_epoch_end(row, state.net, state.averaged)
                if stopped:
                    _say(ctx, "early stopping: no val_loss improvement for %d epochs", cfg.optim.early_stop_patience)
                    break
        data = replace(data, graphs=None)  # the captured graphs' memory is not needed to test
        return _finish(state, data, stopped)


@dataclass(frozen=True)
class _Data:
    """A run's images on the training device: the training part, the validation tail, and their label tensors."""

    train_x: Tensor | ImageFiles
    train_y: Tensor
    val_x: Tensor | ImageFiles
    val_y: Tensor
    graphs: GraphStep | None = None  # the training step captured as CUDA graphs (`graphs.unsupported` says when)


def _use_threads(ctx: Dist, requested: int, held: ExitStack) -> None:
    """Set torch's CPU threads as `cpu.use_cpu_threads` decides, and say why; the previous count returns at the end."""
    held.callback(torch.set_num_threads, torch.get_num_threads())
    choice = use_cpu_threads(requested)
    _say(ctx, "%s", choice.describe())
    if choice.warning and ctx.main:
        log.warning("%s", choice.warning)


def _say(ctx: Dist, message: str, *args: Any) -> None:
    """Log on rank 0 only."""
    if ctx.main:
        log.info(message, *args)


def _load_data(cfg: Config, main: bool) -> Dataset:
    return load_dataset(cfg.data.dataset, cfg.data.data, **cfg.load_options(progress=cfg.run.progress and main))


def _start(
    cfg: Config, ds: Dataset, resume: bool, ctx: Dist, device: torch.device, held: ExitStack | None
) -> tuple[TrainState, _Data, EpochProgress | None]:
    """Everything before the first step: the run directory, the model, optimiser and rules, or the resumed state."""
    # Class count and channels are facts of the data, not choices.
    cfg = cfg.replace(num_classes=ds.num_classes, in_chans=ds.in_chans)
    images, labels = ds.train.images[: cfg.data.train_limit or None], ds.train.labels[: cfg.data.train_limit or None]
    n_train = training_images(cfg.data, len(ds.train.labels))  # Keras validation_split
    if n_train < 1:
        raise ConfigError(f"no training images left: {len(labels)} images with --val-split {cfg.data.val_split}")
    # Pretrained weights are read and checked before anything is written: a bad --init leaves no run directory.
    pretrained = read_pretrained(cfg.run.init, cfg.model) if cfg.run.init else None
    run_dir, saved, best = ctx.on_main(partial(open_run_dir, cfg, resume, held, n_train))
    cfg = cfg.replace(out=str(run_dir))
    net = _new_model(cfg, images, pretrained if saved is None else None, device)
    state = _new_state(cfg, run_dir, ds, ctx, net, math.ceil(n_train / cfg.optim.batch_size))
    partial_epoch = state.load(saved) if saved is not None else None
    if saved is not None:
        _say(ctx, "resuming %s at epoch %d, step %d", run_dir, state.epoch + 1, state.step)
    state.model, state.best = _wrap(net, cfg, ctx, device), best
    train_x, train_y = images[:n_train].to(device), labels[:n_train].to(device)
    data = _Data(
        train_x, train_y, images[n_train:].to(device), labels[n_train:].to(device), _graphs(state, train_x, train_y)
    )
    if cfg.run.tensorboard and ctx.main:
        from gmlp_vision.report import TensorBoardLogger  # optional extra, imported only when asked for

        state.board = TensorBoardLogger(run_dir)
    message = "training %s on %s: %d train / %d validation images, %d steps per epoch, device %s, run dir %s"
    _say(
        ctx,
        message,
        cfg.preset or "custom config",
        cfg.data.dataset,
        n_train,
        len(data.val_y),
        state.steps_per_epoch,
        device,
        run_dir,
    )
    return state, data, partial_epoch


def _new_model(cfg: Config, images: Tensor | ImageFiles, pretrained: Any, device: torch.device) -> GMLP:
    """The model, seeded, with the training images' normalisation (or ``pretrained`` weights), on ``device``."""
    torch.manual_seed(cfg.run.seed)
    net = GMLP(cfg.model)
    net.set_normalization(*channel_stats(stats_sample(images, cfg.run.seed)))  # validation included (Keras adapt)
    if pretrained is not None:  # pretrained weights bring their own normalisation
        apply_pretrained(net, pretrained)
    return net.to(device)


def _new_state(cfg: Config, run_dir: Path, ds: Dataset, ctx: Dist, net: GMLP, steps: int) -> TrainState:
    """A fresh state around ``net``: its optimiser and this rank's random stream (the rules follow from ``cfg``)."""
    optimizer = build_optimizer(cfg.optim, net)
    # Augmentation and dropout draw from per-rank streams (rank 0's is the single-process one); the epoch order comes
    # from one CPU generator that every rank seeds the same (`TrainState.order`).
    if ctx.rank:
        torch.manual_seed(rank_seed(cfg.run.seed, ctx.rank))
    device = next(net.parameters()).device
    generator = torch.Generator(device).manual_seed(rank_seed(cfg.run.seed, ctx.rank))
    return TrainState(cfg, net, optimizer, generator, ctx=ctx, run_dir=run_dir, ds=ds, steps_per_epoch=steps)


def _wrap(net: nn.Module, cfg: Config, ctx: Dist, device: torch.device) -> nn.Module:
    """The model as training runs it: DDP under torchrun, compiled with ``--compile``."""
    model = net
    if ctx.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(net, device_ids=ids, **_NO_BUFFER_SYNC)
        share = math.ceil(cfg.optim.batch_size / ctx.world)
        _say(
            ctx,
            "data parallel over %d processes (%s): each global batch of %d is split into shares of %d or fewer",
            ctx.world,
            torch.distributed.get_backend(),
            cfg.optim.batch_size,
            share,
        )
    return maybe_compile(model, cfg.run.compile)


def _graphs(state: TrainState, images: Tensor | ImageFiles, labels: Tensor) -> GraphStep | None:
    """The run's training step as CUDA graphs where it can be captured; on CUDA the log says which, and why not."""
    device, ctx = labels.device, state.ctx
    why = unsupported(state.cfg, device, distributed=ctx.enabled, streamed=isinstance(images, ImageFiles))
    if why is None:  # not streamed: the images are a tensor on the device
        _say(ctx, "CUDA graphs: each training step is captured once per batch size and replayed")
        return GraphStep(state.model, state.net, state.optimizer, state.cfg, state.generator, images, labels)
    if device.type == "cuda":
        _say(ctx, "CUDA graphs off: %s", why)
    return None


def _run_epoch(state: TrainState, data: _Data, resumed: EpochProgress | None) -> dict[str, float]:
    """Train one epoch (or the rest of a resumed one) and validate; returns the epoch's history row."""
    cfg, epoch = state.cfg, state.epoch
    t0 = time.perf_counter()
    progress = resumed or EpochProgress(
        torch.randperm(len(data.train_y), generator=state.order).to(data.train_y.device), step=state.step
    )
    schedule = LrSchedule.from_config(cfg.optim, state.steps_per_epoch)
    lr = schedule.reported(state.optimizer, progress.step - progress.batch)  # the epoch's first step's
    with tqdm(
        total=state.steps_per_epoch,
        initial=progress.batch,
        desc=f"epoch {epoch + 1}",
        leave=False,
        disable=not (cfg.run.progress and state.ctx.main),
    ) as bar:
        metrics = train_one_epoch(state, data.train_x, data.train_y, progress, bar, data.graphs)
    state.epoch = epoch + 1
    state.require_finite(f"in epoch {epoch + 1} (by step {state.step})")
    row: dict[str, float] = {"epoch": epoch + 1, **metrics}
    if len(data.val_y):
        val = evaluate(
            state.model,
            data.val_x,
            data.val_y,
            batch_size=cfg.run.eval_batch_size,
            precision=cfg.run.precision,
            ctx=state.ctx,
        )
        if not math.isfinite(val["loss"]):  # finite weights can still overflow the logits
            raise NonFiniteLossError(f"the validation loss became {val['loss']} in epoch {epoch + 1}; {state.kept()}")
        row.update({f"val_{k}": v for k, v in val.items()})
        if state.ema is not None:
            val = evaluate(
                state.ema.module,
                data.val_x,
                data.val_y,
                batch_size=cfg.run.eval_batch_size,
                precision=cfg.run.precision,
                ctx=state.ctx,
            )
            row.update({f"val_ema_{k}": v for k, v in val.items()})
    row.update(lr=lr, seconds=time.perf_counter() - t0)
    return row


def _end_epoch(state: TrainState, row: dict[str, float]) -> bool:
    """Keep the row, save best.pt and last.pt, apply the Keras rules; returns whether early stopping ends the run."""
    state.history.append(row)
    monitored = row.get("val_loss", row["loss"])  # Keras monitors val_loss; without validation, the train loss
    if monitored < state.stopper.best:  # every rank sees the same reduced metrics, so every rank decides the same
        state.best = {k: v.detach().clone() for k, v in state.net.state_dict().items()}
        state.save("best.pt", state.model, row)
    stopped = state.stopper.step(monitored, state.epoch - 1)  # Keras callback order: EarlyStopping, then plateau
    state.plateau.step(monitored)
    state.save_last(row, None)
    if state.ctx.main:
        write_history(state.run_dir, state.history)
        if state.board is not None:
            state.board.log_epoch(row)
    _say(state.ctx, format_epoch(row, state.cfg.optim.epochs, top5=state.ds.shows_top5))
    return stopped


def _finish(state: TrainState, data: _Data, stopped: bool) -> Result:
    """After the last epoch: the final weights, test metrics, ema.pt, results.json and the report."""
    cfg, ctx = state.cfg, state.ctx
    if state.board is not None:
        state.board.close()
    best = state.best
    restore = best is not None and (
        cfg.optim.restore_best == "always" or (stopped and cfg.optim.restore_best == "on-stop")
    )
    if restore:
        state.net.load_state_dict(best)
        _say(ctx, "restored the weights of the best epoch (%d)", state.stopper.best_epoch + 1)
    test_x, test_y = state.ds.test.images, state.ds.test.labels
    test = evaluate(
        state.model, test_x, test_y, batch_size=cfg.run.eval_batch_size, precision=cfg.run.precision, ctx=ctx
    )
    final = "best.pt" if restore else "last.pt"
    summary = {
        "test": test,
        "final_checkpoint": final,
        "best_epoch": state.stopper.best_epoch + 1,
        "stopped_early": stopped,
        "epochs_run": len(state.history),
        "test_split": state.ds.test_split,
        "images": {"train": len(data.train_y), "validation": len(data.val_y), "test": len(test_y)},
        "command": train_command(cfg),
    }
    if state.ema is not None:
        summary["test_ema"] = evaluate(
            state.ema.module, test_x, test_y, batch_size=cfg.run.eval_batch_size, precision=cfg.run.precision, ctx=ctx
        )
        state.epoch = len(state.history)
        state.save("ema.pt", state.ema.module, summary["test_ema"])
    plots = ctx.on_main(partial(_write_results, state, summary))
    return Result(
        state.run_dir,
        state.history,
        test,
        final,
        state.stopper.best_epoch + 1,
        stopped,
        test_ema=summary.get("test_ema"),
        test_split=state.ds.test_split,
        plots=plots,
        shows_top5=state.ds.shows_top5,
    )


def _write_results(state: TrainState, summary: dict[str, Any]) -> list[Path]:
    from gmlp_vision.report import write_report  # matplotlib loads only when a run ends

    write_json(state.run_dir / "results.json", summary)
    cfg, test = state.cfg, state.ds.test
    return write_report(
        state.run_dir,
        state.net,
        test.images,
        test.labels,
        state.ds.classes,
        batch_size=cfg.run.eval_batch_size,
        precision=cfg.run.precision,
        split=state.ds.test_split,
    )


# The model's buffers (normalisation statistics) are the same on every rank: no broadcast before each forward.
# torch 2.13 renamed the option; older releases only know the old name.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)
