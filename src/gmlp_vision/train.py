"""Training and evaluation: the tutorial's ``model.fit`` / ``model.evaluate`` with Keras 2 semantics.

`train` reads top to bottom: start (data, run directory, model or the resumed state, the batch source and the
stepper), then per epoch the steps (`loop.train_one_epoch`), validation and the epoch's end, then the finish (test
metrics, ``results.json``). The training set lives on the device as one uint8 tensor (`batches.BatchSource`; streamed
files are decoded per batch); validation is the LAST ``val_split`` fraction of the training images, taken before any
shuffling (Keras ``validation_split``); normalisation statistics come from all training images, validation part
included (Keras ``adapt``). After each epoch: the row to ``history.csv``/``history.jsonl``, ``best.pt`` when the
monitored loss improved, ``last.pt`` always, then the early-stopping and plateau rules (`optim.py`). Plots and
TensorBoard are callbacks (`callbacks`, `reporting`): training itself loads neither.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gmlp_vision.augment import alternates_flips, streams_crop
from gmlp_vision.batches import BatchSource, EpochProgress
from gmlp_vision.callbacks import Callback, RunInfo
from gmlp_vision.checkpoint import after_nonfinite
from gmlp_vision.config import Config, recipe_line, train_command
from gmlp_vision.console import run_lines
from gmlp_vision.cpu import use_cpu_threads
from gmlp_vision.data import Dataset, load_dataset
from gmlp_vision.data.layout import read_holdout
from gmlp_vision.data.stream import ImageFiles
from gmlp_vision.distributed import distributed, maybe_compile
from gmlp_vision.errors import ConfigError, NonFiniteLossError
from gmlp_vision.evaluate import evaluate
from gmlp_vision.graphs import GraphStep, unsupported
from gmlp_vision.initial import new_model
from gmlp_vision.loop import train_one_epoch
from gmlp_vision.metrics import epoch_row, format_epoch, result_lines, shows_top5, split_label
from gmlp_vision.model import GMLP
from gmlp_vision.optim import build_optimizer
from gmlp_vision.precision import choose_precision
from gmlp_vision.pretrained import read_pretrained
from gmlp_vision.resume_check import training_images
from gmlp_vision.rundir import RunLock, open_run_dir, write_history, write_holdout, write_json
from gmlp_vision.runtime import Dist
from gmlp_vision.state import TrainState, rank_seed
from gmlp_vision.step import EagerStep, Stepper

log = logging.getLogger("gmlp_vision")

__all__ = ["Result", "train"]


@dataclass
class Result:
    """What a finished run produced."""

    run_dir: Path
    history: list[dict[str, float]]
    test: dict[str, float]
    final_checkpoint: str  # the file the run ships: best.pt (restored), last.pt, or ema.pt (`train._shipped`)
    best_epoch: int  # 1-based
    stopped_early: bool
    test_ema: dict[str, float] | None = None  # the weight average's test metrics (--ema)
    test_split: str = "test"  # what the data calls the split ``test`` was measured on (a folder's val/ or test/)
    plots: list[Path] = field(default_factory=list)  # what the callbacks wrote (`reporting.PlotReport`: RUN_DIR/plots)
    shows_top5: bool = True  # `metrics.shows_top5`: whether the output mentions top-5 accuracy
    test_checkpoint: str = "last.pt"  # the file ``test`` was measured on: best.pt (restored) or last.pt


def train(
    cfg: Config,
    dataset: Dataset | None = None,
    *,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    verbose: int = 1,
) -> Result:
    """Train a gMLP as ``cfg`` says, evaluate it on the test split, and leave everything in the run directory.

    Under ``torchrun`` every process calls this with the same config (`gmlp_vision.distributed`); rank 0 writes.

    Args:
        cfg: the resolved run configuration.
        dataset: a loaded `data.Dataset`, of your own tensors too (default: ``cfg.data``'s); ``results.json`` then
            says the data came from memory and records no command (none could rebuild it).
        resume: continue the run in ``cfg.run.out`` from its ``last.pt`` (exactly: weights, optimiser, schedules,
            position in the epoch, every RNG), or start it there if it never saved one.
        callbacks: `callbacks.Callback`s (Keras' method names); `reporting.default_callbacks` makes what ``gmlp
            train`` runs with (plots, TensorBoard, MLflow, W&B).
        verbose: 1: the lines ``gmlp train`` prints (`console.run_lines`; logging already set up decides); 0: none.

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
    with distributed(cfg.run.device) as (ctx, device), ExitStack() as held:
        if verbose:
            held.enter_context(run_lines(ctx.main))
        _use_threads(ctx, cfg.run.threads, held)
        # Resuming: take the run directory's lock before the data is loaded, so a second writer is told at once.
        locked = resume and ctx.main and bool(cfg.run.out) and Path(cfg.run.out or "").is_dir()
        if locked:
            held.enter_context(RunLock(Path(cfg.run.out or "")))
        ds = dataset if dataset is not None else ctx.main_first(partial(_load_data, cfg, ctx.main, resume))
        state, source, stepper, val, part = _start(cfg, ds, resume, ctx, device, None if locked else held)
        run = RunInfo(state.cfg, Path(state.cfg.run.out or ""), ds, ctx, state.model, state.averaged)
        for callback in callbacks:
            callback.set_run(run)
            callback.on_train_begin({})
        stopped = False
        with state.stops.installed():
            while state.epoch < state.cfg.optim.epochs:
                row = _run_epoch(state, source, stepper, val, part)
                part = None
                stopped = _end_epoch(state, row)
                for callback in callbacks:
                    callback.on_epoch_end(state.epoch - 1, dict(row))
                if stopped:
                    _say(ctx, "early stopping: no val_loss improvement for %d epochs", cfg.optim.early_stop_patience)
                    break
        del stepper  # the captured graphs' memory is not needed to test
        return _finish(state, source, len(val[1]), stopped, callbacks, in_memory=dataset is not None)


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


def _load_data(cfg: Config, main: bool, resume: bool) -> Dataset:
    """The run's data; a resumed run tests on the files its start held out (``holdout.json``), whatever was added."""
    options = cfg.load_options(progress=cfg.run.progress and main)
    if resume and cfg.run.out:
        options["holdout_files"] = read_holdout(Path(cfg.run.out))
    return load_dataset(cfg.data.dataset, cfg.data.data, **options)


def _start(
    cfg: Config, ds: Dataset, resume: bool, ctx: Dist, device: torch.device, held: ExitStack | None
) -> tuple[TrainState, BatchSource, Stepper, tuple[Tensor | ImageFiles, Tensor], EpochProgress | None]:
    """Everything before the first step: the run directory, the model, optimiser and rules, or the resumed state.

    Returns:
        The state, the training batches, the stepper, the validation images and labels, and a part-done epoch.
    """
    # Class count and channels are facts of the data, not choices; the run records the precision ``auto`` chose.
    precision = choose_precision(cfg.run.precision, device)
    cfg = cfg.replace(num_classes=ds.num_classes, in_chans=ds.in_chans, precision=precision.name)
    images, labels = ds.train.images[: cfg.data.train_limit or None], ds.train.labels[: cfg.data.train_limit or None]
    n_train = training_images(cfg.data, len(ds.train.labels), ds.val is not None)  # Keras validation_split
    if n_train < 1:
        raise ConfigError(f"no training images left: {len(labels)} images with --val-split {cfg.data.val_split}")
    # Pretrained weights are read and checked before anything is written: a bad --init leaves no run directory.
    pretrained = None
    resumed = resume and bool(cfg.run.out) and (Path(cfg.run.out or "") / "last.pt").exists()
    if cfg.run.init and not resumed:  # a resumed run's weights come from its last.pt
        pretrained = read_pretrained(cfg.run.init, cfg.model, classes=ds.classes, reset_head=cfg.run.reset_head)
    run_dir, saved, best = ctx.on_main(partial(open_run_dir, cfg, resume, held, n_train, ds.name))
    cfg = cfg.replace(out=str(run_dir))
    if ds.holdout:  # the test files the loader held out, for a resumed run and `gmlp evaluate` to test on again
        ctx.on_main(partial(write_holdout, run_dir, ds.holdout, cfg.data.holdout))
    crop_seed = cfg.run.seed if streams_crop(cfg.augment) else None
    flips = cfg.run.seed if alternates_flips(cfg.augment) else None
    balance = dict(class_weights=cfg.optim.class_weights, sampler=cfg.data.sampler, flip_seed=flips)
    train_set = (images[:n_train].to(device), labels[:n_train].to(device), cfg.optim.batch_size)
    source = BatchSource(*train_set, ctx=ctx, crop_seed=crop_seed, **balance)
    fresh = images[:n_train] if saved is None and pretrained is None else None  # from scratch: may be whitened
    model, started = new_model(cfg, images, pretrained if saved is None else None, fresh)
    model = model.to(device)
    state = _new_state(cfg, run_dir, ds, ctx, model, source.steps_per_epoch)
    part = state.load(saved) if saved is not None else None
    if saved is not None:
        _say(ctx, "resuming %s at epoch %d, step %d", run_dir, state.epoch + 1, state.step)
    state.wrapped, state.best = _wrap(model, cfg, ctx, device), best
    stepper = _stepper(state, source)
    own = ds.val  # the data's own validation split, else the training split's tail
    val = (own.images, own.labels) if own else (images[n_train:], labels[n_train:])
    val = (val[0].to(device), val[1].to(device))
    message = "training %s on %s: %d train / %d validation images, %d steps per epoch, device %s, run dir %s"
    preset = cfg.preset or "custom config"
    _say(ctx, message, preset, ds.name, n_train, len(val[1]), state.steps_per_epoch, device, run_dir)
    _say(ctx, "%s", _splits_line(cfg, ds))
    _say(ctx, "%s", precision.line)
    if started:
        _say(ctx, "%s", started)
    for warning in (state.schedule.warning(), precision.warning):
        if warning and ctx.main:
            log.warning("warning: %s", warning)
    _say(ctx, "%s", recipe_line(cfg))
    return state, source, stepper, val, part


def _splits_line(cfg: Config, ds: Dataset) -> str:
    """Which images validate (the epoch lines' ``val_*``) and which test, named so that the two are never confused."""
    own = "the data's own val split" if ds.val is not None else f"the last {cfg.data.val_split:.0%} of training"
    test = f"{split_label(ds.test_split)}, {len(ds.test.labels)} images"
    return f"data: {ds.layout + '; ' if ds.layout else ''}validation (val_*): {own}; final evaluation: {test}"


def _new_state(cfg: Config, run_dir: Path, ds: Dataset, ctx: Dist, model: GMLP, steps: int) -> TrainState:
    """A fresh state around ``model``: its optimiser and this rank's random stream (the rules follow from ``cfg``)."""
    optimizer = build_optimizer(cfg.optim, model)
    # Augmentation and dropout draw from per-rank streams (rank 0's is the single-process one); the epoch order comes
    # from one CPU generator that every rank seeds the same (`TrainState.order`).
    if ctx.rank:
        torch.manual_seed(rank_seed(cfg.run.seed, ctx.rank))
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(rank_seed(cfg.run.seed, ctx.rank))
    return TrainState(cfg, model, optimizer, generator, ctx=ctx, run_dir=run_dir, ds=ds, steps_per_epoch=steps)


def _wrap(model: nn.Module, cfg: Config, ctx: Dist, device: torch.device) -> nn.Module:
    """The model as training runs it: DDP under torchrun, compiled with ``--compile``."""
    wrapped = model
    if ctx.enabled:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids, **_NO_BUFFER_SYNC)
        share = math.ceil(cfg.optim.batch_size / ctx.world)
        _say(
            ctx,
            "data parallel over %d processes (%s): each global batch of %d is split into shares of %d or fewer",
            ctx.world,
            torch.distributed.get_backend(),
            cfg.optim.batch_size,
            share,
        )
    return maybe_compile(wrapped, cfg.run.compile)


def _stepper(state: TrainState, source: BatchSource) -> Stepper:
    """The run's one way of stepping: CUDA graphs where the step can be captured, else eager; the log says which."""
    ctx, device = state.ctx, source.device
    why = unsupported(state.cfg, device, distributed=ctx.enabled, streamed=source.streamed)
    if why is None:
        _say(ctx, "CUDA graphs: each training step is captured once per batch size and replayed")
        return GraphStep(state.wrapped, state.model, state.optimizer, state.cfg, state.generator, source)
    if device.type == "cuda":
        _say(ctx, "CUDA graphs off: %s", why)
    return EagerStep(state.wrapped, state.optimizer, state.cfg, state.generator, state.scaler)


def _run_epoch(
    state: TrainState,
    source: BatchSource,
    stepper: Stepper,
    val: tuple[Tensor | ImageFiles, Tensor],
    resumed: EpochProgress | None,
) -> dict[str, float]:
    """Train one epoch (or the rest of a resumed one) and validate; returns the epoch's history row."""
    epoch, t0 = state.epoch, time.perf_counter()
    progress = resumed or source.new_epoch(state.order, state.step)
    lr = state.schedule.reported(state.optimizer, progress.step - progress.batch)  # the epoch's first step's
    with tqdm(
        total=state.steps_per_epoch,
        initial=progress.batch,
        desc=f"epoch {epoch + 1}",
        leave=False,
        disable=not (state.cfg.run.progress and state.ctx.main),
    ) as bar:
        trained = train_one_epoch(state, source, stepper, progress, bar)
    state.epoch = epoch + 1
    state.require_finite(f"in epoch {epoch + 1} (by step {state.step})")
    validated = averaged = None
    if len(val[1]):
        validated = _evaluate(state, state.wrapped, *val)
        if not math.isfinite(validated["loss"]):  # finite weights can still overflow the logits
            loss = validated["loss"]
            raise NonFiniteLossError(
                f"the validation loss became {loss} in epoch {epoch + 1}; {after_nonfinite(state.run_dir)}"
            )
        if state.averaged is not None:
            averaged = _evaluate(state, state.averaged, *val)
    return epoch_row(epoch + 1, trained, validated, averaged, lr=lr, seconds=time.perf_counter() - t0)


def _evaluate(state: TrainState, model: nn.Module, images: Tensor | ImageFiles, labels: Tensor) -> dict[str, float]:
    """`evaluate.evaluate` as the run is configured: its batch size, precision and processes."""
    run = state.cfg.run
    return evaluate(model, images, labels, batch_size=run.eval_batch_size, precision=state.precision, ctx=state.ctx)


def _end_epoch(state: TrainState, row: dict[str, float]) -> bool:
    """Keep the row, save best.pt and last.pt, apply the Keras rules; returns whether early stopping ends the run."""
    state.history.append(row)
    monitored = row.get("val_loss", row["loss"])  # Keras monitors val_loss; without validation, the train loss
    if monitored < state.stopper.best:  # every rank sees the same reduced metrics, so every rank decides the same
        state.best = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        state.save("best.pt", state.model, row)
    stopped = state.stopper.step(monitored, state.epoch - 1)  # Keras callback order: EarlyStopping, then plateau
    state.plateau.step(monitored)
    state.save_last(row, None)
    if state.ctx.main:
        write_history(state.run_dir, state.history)
    _say(state.ctx, format_epoch(row, state.cfg.optim.epochs, top5=shows_top5(state.ds.num_classes)))
    return stopped


def _finish(
    state: TrainState, source: BatchSource, n_val: int, stopped: bool, callbacks: Sequence[Callback], in_memory: bool
) -> Result:
    """After the last epoch: the final weights, test metrics, ema.pt, results.json, and the callbacks' finish.

    ``final_checkpoint`` in results.json names the file the run ships: what ``evaluate``, ``predict``, ``export`` and
    ``report`` take from the run directory (`checkpoint.resolve_checkpoint`).
    """
    cfg, ctx, ds = state.cfg, state.ctx, state.ds
    restore = state.best is not None and (
        cfg.optim.restore_best == "always" or (stopped and cfg.optim.restore_best == "on-stop")
    )
    if restore:
        state.model.load_state_dict(state.best)
        _say(ctx, "restored the weights of the best epoch (%d)", state.stopper.best_epoch + 1)
    test = _evaluate(state, state.wrapped, ds.test.images, ds.test.labels)
    weights = "best.pt" if restore else "last.pt"
    summary = {
        "test": test,
        "test_checkpoint": weights,  # the file ``test`` was measured on (``test_ema``: ema.pt's)
        "final_checkpoint": state.shipped(weights),
        "best_epoch": state.stopper.best_epoch + 1,
        "stopped_early": stopped,
        "epochs_run": len(state.history),
        "test_split": ds.test_split,
        "images": {"train": len(source), "validation": n_val, "test": len(ds.test.labels)},
        **({"data_layout": ds.layout} if ds.layout else {}),
        **({"class_weights": source.class_weights.tolist()} if source.class_weights is not None else {}),
        "command": None if in_memory else train_command(cfg),  # no command rebuilds data passed in memory
        **({"data": f"a Dataset passed to train() in memory ({ds.name!r})"} if in_memory else {}),
    }
    if state.averaged is not None:
        summary["test_ema"] = _evaluate(state, state.averaged, ds.test.images, ds.test.labels)
        state.epoch = len(state.history)
        state.save("ema.pt", state.averaged, summary["test_ema"])
    ctx.on_main(partial(write_json, state.run_dir / "results.json", summary))
    for line in result_lines(summary, shows_top5(ds.num_classes)):
        _say(ctx, "%s", line)
    for callback in callbacks:
        callback.on_train_end(dict(summary))
    written = [path for callback in callbacks for path in getattr(callback, "files", [])]
    _say(ctx, "run directory: %s (shipped weights: %s)", state.run_dir, summary["final_checkpoint"])
    if written:
        names = ", ".join(p.name for p in written if p.suffix == ".png")
        _say(ctx, "plots: %s (%s)", written[0].parent, names)
    return Result(
        state.run_dir,
        state.history,
        test,
        summary["final_checkpoint"],
        state.stopper.best_epoch + 1,
        stopped,
        test_ema=summary.get("test_ema"),
        test_split=ds.test_split,
        plots=written,
        shows_top5=shows_top5(ds.num_classes),
        test_checkpoint=weights,
    )


# The model's buffers (normalisation statistics) are the same on every rank: no broadcast before each forward.
# torch 2.13 renamed the option; older releases only know the old name.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)
