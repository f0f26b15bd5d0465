"""A ``last.pt``'s resume state checked field by field before any of it is put back.

A checkpoint's SHA-256 digest is a checksum, not a signature: anyone can edit ``last.pt`` and compute it again. So
what a file says about the run (optimiser, rules, scaler, random streams, history, the part-done epoch) goes through
`check_resume_state` first: each field's type and range, how the fields agree with each other (epoch, step, history,
the epoch's position) and with the run that takes them back (`ResumeTarget`: its parameters, training set and
processes). `rundir.open_run_dir` calls it before it rewrites the history files, `state.TrainState.load` before it
applies anything; a refusal is one `CheckpointError` line that names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import torch
from torch import Tensor

from gmlp_vision.config.core import Config
from gmlp_vision.config.groups import DataConfig
from gmlp_vision.errors import CheckpointError, shown
from gmlp_vision.metrics import EMA_FIELDS, HISTORY_FIELDS, ROW_NEEDS
from gmlp_vision.model import GMLP
from gmlp_vision.optim import KerasAdamW, build_optimizer
from gmlp_vision.optim_muon import MUON_KEY
from gmlp_vision.precision import precision_named

# The columns of a history row (history.csv's, in this order): every row has the first ones, and the same set.
_TRAIN_STATE = tuple("optimizer plateau early_stopping order_generator ema ranks history epoch_progress".split())
_SCALER = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
_MOMENTS = ("exp_avg", "exp_avg_sq")
_HYPER = ("betas", "eps", "weight_decay")  # a parameter group's constants: the run's config sets them (the lr moves)
MAX_PROCESSES = 1 << 16  # processes a last.pt may hold the random streams of
_INT64_MAX = (1 << 63) - 1
_EXACT = 1 << 53  # integers up to here are exact as floats


class SavedRun(Protocol):
    """What the check reads of a `checkpoint.Checkpoint` (a protocol: this module sits below ``checkpoint``)."""

    config: Config
    model_state: dict[str, Tensor]
    epoch: int
    step: int
    train_state: dict[str, Any]


@dataclass(frozen=True)
class ResumeTarget:
    """The run that takes a ``last.pt`` back; None where it is not known yet (before the data is loaded).

    Attributes:
        optimizer: a fresh optimiser over the model's parameters, in the run's parameter groups.
        sums: the names of an epoch's running sums (`metrics.METRICS`).
        ema: whether the run keeps a weight average (``--ema``).
        scaler: whether it trains with a gradient scaler (``--precision fp16``).
        generator: this rank's augmentation and dropout stream (its device decides the state's size).
        world: the number of processes, and ``rank`` this one's.
        train_images: the number of training images (an epoch's permutation has one entry each).
    """

    optimizer: torch.optim.Optimizer
    sums: tuple[str, ...]
    ema: bool
    scaler: bool
    generator: torch.Generator | None = None
    world: int | None = None
    rank: int = 0
    train_images: int | None = None

    @classmethod
    def described_by(cls, cfg: Config, sums: tuple[str, ...], train_images: int | None = None) -> ResumeTarget:
        """The target ``cfg`` describes, before any device: its model and optimiser on the meta device."""
        with torch.device("meta"):  # shapes only: nothing is allocated
            net = GMLP(cfg.model)
        optimizer = build_optimizer(cfg.optim, net)
        scaler = precision_named(cfg.run.precision).needs_scaler
        return cls(optimizer, sums, ema=bool(cfg.optim.ema), scaler=scaler, train_images=train_images)


def training_images(data: DataConfig, available: int, own_val: bool = False) -> int:
    """How many of ``available`` training-split images a run trains on: ``--train-limit``, less the validation tail.

    ``own_val``: the data has a validation split of its own (`data.Dataset.val`), so no tail is cut off.
    """
    kept = min(available, data.train_limit) if data.train_limit else available
    return kept if own_val else int(math.floor(kept * (1.0 - data.val_split)))  # Keras validation_split


def check_resume_state(saved: SavedRun, target: ResumeTarget) -> None:
    """Check everything ``saved`` (a ``last.pt``) holds to resume ``target``, before any of it is used.

    Raises:
        CheckpointError: "cannot resume from last.pt: ..." naming the first field of the wrong type, out of its
            range, or at odds with another field or with the run.
    """
    ts = saved.train_state
    if not isinstance(ts, dict) or not ts:
        _fail("it holds no training state (best.pt and ema.pt hold only weights)")
    if "ranks" not in ts:
        raise CheckpointError("last.pt comes from an earlier development version; this one cannot resume it")
    _entries(ts, "train_state", _TRAIN_STATE, optional=("scaler",))
    epoch = _int(saved.epoch, "epoch", 0, saved.config.optim.epochs, "the run's --epochs")
    step = _int(saved.step, "step", 0, _INT64_MAX)
    _history(ts["history"], epoch)
    mid_epoch = _counts(ts["epoch_progress"], epoch, step, saved.config.optim.batch_size, target)
    _rules(ts["plateau"], ts["early_stopping"], epoch)
    _optimizer(ts["optimizer"], target.optimizer, step)
    _random_state(ts["order_generator"], "order_generator", torch.Generator())
    _ranks(ts["ranks"], mid_epoch, target)
    _ema(ts["ema"], saved.model_state, target.ema, step)
    _scaler(ts.get("scaler"), target.scaler)


def _fail(reason: str) -> NoReturn:
    raise CheckpointError(f"cannot resume from last.pt: {reason}")


def _require(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        _fail(f"{field} must be {rule}, not {_described(value)}")


def _kind(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return f"{'an' if name[0] in 'aeio' else 'a'} {name}"


def _described(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{_kind(value.dtype)} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, dict)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value):,} entries"
    return shown(value)


def _real(value: Any, finite: bool = True) -> bool:
    """A Python int or float (not a bool, not NaN); finite unless ``finite`` is False."""
    if type(value) is int:
        return abs(value) <= _EXACT
    return type(value) is float and not math.isnan(value) and (math.isfinite(value) or not finite)


def _int(value: Any, field: str, low: int, high: int, why: str = "") -> int:
    rule = f"an integer >= {low}" if high == _INT64_MAX else f"an integer in {low}..{high}"
    _require(type(value) is int and low <= value <= high, field, rule + (f" ({why})" if why else ""), value)
    return value


def _entries(value: Any, field: str, needed: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[Any, Any]:
    """``value`` as a dict holding every ``needed`` key, and no others than the ``optional`` ones."""
    _require(isinstance(value, dict), field, f"a dict of {', '.join(needed)}" if needed else "an empty dict", value)
    missing = [k for k in needed if k not in value]
    if missing:
        _fail(f"{field} lacks {missing[0]!r}")
    extra = [k for k in value if k not in needed and k not in optional]
    if extra:
        _fail(f"{field} holds an unexpected entry {shown(extra[0])}")
    return value


def _tensor(value: Any, field: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> Tensor:
    """``value`` as a plain (dense) tensor of ``dtype`` and ``shape`` (any 1-D shape where None)."""
    ok = isinstance(value, Tensor) and value.layout == torch.strided and value.dtype == dtype
    ok = ok and (tuple(value.shape) == shape if shape is not None else value.dim() == 1)
    _require(ok, field, f"{_kind(dtype)} tensor of shape {shape if shape is not None else '(n,)'}", value)
    return value


def _finite(t: Tensor, field: str, at_least_zero: bool = False) -> None:
    if not bool(torch.isfinite(t).all()):
        _fail(f"{field} holds NaN or inf")
    if at_least_zero and not bool((t >= 0).all()):
        _fail(f"{field} holds negative values")


def _history(history: Any, epoch: int) -> None:
    """One row per epoch done, numbered from 1, each with the same columns, of finite numbers."""
    _require(type(history) is list, "history", "a list of one row per epoch", history)
    if len(history) != epoch:
        _fail(f"history has {len(history):,} rows, but last.pt is at epoch {epoch}: it keeps one row per epoch")
    allowed = frozenset(HISTORY_FIELDS + EMA_FIELDS)
    columns = None
    for i, row in enumerate(history):
        where = f"history[{i}]"
        _require(isinstance(row, dict) and all(type(k) is str for k in row), where, "a dict of named numbers", row)
        if columns is None:
            columns = row.keys()
            missing, unknown = sorted(ROW_NEEDS - columns), sorted(columns - allowed)
            if missing or unknown:
                _fail(
                    f"{where} " + (f"lacks {missing[0]!r}" if missing else f"has an unknown column {shown(unknown[0])}")
                )
        elif row.keys() != columns:
            _fail(f"{where} has other columns than history[0]")
        _require(type(row["epoch"]) is int and row["epoch"] == i + 1, f"{where}.epoch", str(i + 1), row["epoch"])
        for k, v in row.items():  # the weight average's validation loss may overflow: training records it as it is
            _require(_real(v, finite=k not in EMA_FIELDS), f"{where}.{k}", "a finite number", v)


def _counts(part: Any, epoch: int, step: int, batch_size: int, target: ResumeTarget) -> bool:
    """The part-done epoch, if any, and the step: ``epoch * steps per epoch + batch``. Returns True mid-epoch."""
    n = target.train_images
    if part is None:  # saved at the end of an epoch
        per_epoch = math.ceil(n / batch_size) if n is not None else None
        if per_epoch is not None and step != epoch * per_epoch:
            _fail(f"step must be {epoch * per_epoch:,} ({epoch} epoch(s) of {per_epoch} steps), not {step:,}")
        if not (step == 0 if epoch == 0 else step >= epoch and step % epoch == 0):
            _fail(f"step must be {epoch} epoch(s) of the same number of steps (at least one), not {step:,}")
        return False
    p = _entries(part, "epoch_progress", ("perm", "batch", "step"))
    perm = _tensor(p["perm"], "epoch_progress.perm", torch.int64)
    size = len(perm) if n is None else n
    if len(perm) != size or not size:
        _fail(f"epoch_progress.perm has {len(perm):,} entries; the run trains on {size:,} images")
    if not torch.equal(perm.sort().values, torch.arange(size)):
        _fail(f"epoch_progress.perm is not a permutation of 0..{size - 1}")
    per_epoch = math.ceil(size / batch_size)
    batch = _int(p["batch"], "epoch_progress.batch", 0, per_epoch, f"an epoch of {per_epoch} steps")
    _require(type(p["step"]) is int and p["step"] == step, "epoch_progress.step", f"{step} (last.pt's)", p["step"])
    if step != epoch * per_epoch + batch:
        done = f"{epoch} epoch(s) of {per_epoch} steps, then {batch} batches"
        _fail(f"step must be {epoch * per_epoch + batch:,} ({done}), not {step:,}")
    return True


def _rules(plateau: Any, stopping: Any, epoch: int) -> None:
    """The plateau and early-stopping rules: a best loss (inf before the first epoch) and counts of epochs."""
    p = _entries(plateau, "plateau", ("best", "wait"))
    _require(_real(p["best"], finite=False), "plateau.best", "a number (inf before any epoch)", p["best"])
    _int(p["wait"], "plateau.wait", 0, epoch, "epochs done")
    s = _entries(stopping, "early_stopping", ("best", "best_epoch", "wait"))
    _require(_real(s["best"], finite=False), "early_stopping.best", "a number (inf before any epoch)", s["best"])
    if s["best"] == math.inf:
        _int(s["best_epoch"], "early_stopping.best_epoch", -1, -1, "no best epoch while the best loss is inf")
    elif epoch == 0:
        _fail(f"early_stopping.best must be inf before any epoch, not {shown(s['best'])}")
    else:
        _int(s["best_epoch"], "early_stopping.best_epoch", 0, epoch - 1, "an epoch done")
    _int(s["wait"], "early_stopping.wait", 0, epoch, "epochs done")


def _optimizer(saved: Any, optimizer: torch.optim.Optimizer, step: int) -> None:
    """The run's parameter groups with their constants, and moments shaped like the parameters they belong to."""
    s = _entries(saved, "optimizer", ("state", "param_groups"))
    expected = optimizer.state_dict()["param_groups"]
    groups = s["param_groups"]
    rule = f"a list of {len(expected)} parameter groups"
    _require(type(groups) is list and len(groups) == len(expected), "optimizer.param_groups", rule, groups)
    for i, (group, want) in enumerate(zip(groups, expected, strict=True)):
        where = f"optimizer.param_groups[{i}]"
        # torch fills in the flags a file from another torch version lacks; these it cannot do without.
        needed = ("params", "lr", "lr_scale", MUON_KEY, "momentum", *_HYPER)  # lr_scale: --layer-decay; muon
        _entries(group, where, tuple(k for k in want if k in needed), optional=tuple(want))
        _require(_same(group["params"], want["params"]), f"{where}.params", shown(want["params"]), group["params"])
        _require(_real(group["lr"]) and group["lr"] >= 0, f"{where}.lr", "a finite number >= 0", group["lr"])
        for key in group.keys() - {"params", "lr"}:
            _require(_same(group[key], want[key]), f"{where}.{key}", f"{shown(want[key])} (the run's)", group[key])
    _moments(
        s["state"], [(p, bool(g.get(MUON_KEY))) for g in optimizer.param_groups for p in g["params"]], optimizer, step
    )


def _moments(states: Any, params: list[tuple[Tensor, bool]], optimizer: torch.optim.Optimizer, step: int) -> None:
    """Per parameter (by index): its count of updates and its two moments, finite, shaped like the parameter.

    A matrix in one of Muon's groups (``params``' flag) has one momentum instead, and no count.
    """
    _require(isinstance(states, dict), "optimizer.state", "a dict of parameter states", states)
    unknown = [k for k in states if not (type(k) is int and 0 <= k < len(params))]
    if unknown:
        _fail(f"optimizer.state holds an entry {shown(unknown[0])}; the model has parameters 0..{len(params) - 1}")
    for index, state in states.items():
        where, (p, muon) = f"optimizer.state[{index}]", params[index]
        if muon:
            _entries(state, where, ("momentum_buffer",))
            buffer = _tensor(state["momentum_buffer"], f"{where}.momentum_buffer", p.dtype, tuple(p.shape))
            _finite(buffer, f"{where}.momentum_buffer")
            continue
        _entries(state, where, ("step", *_MOMENTS))
        count = state["step"]
        if not isinstance(optimizer, KerasAdamW):  # torch's AdamW counts in a float32 scalar tensor
            value = _tensor(count, f"{where}.step", torch.float32, ()).item()
            count = int(value) if value.is_integer() else value
        _int(count, f"{where}.step", 0, step, "last.pt's step")
        for key in _MOMENTS:
            moment = _tensor(state[key], f"{where}.{key}", p.dtype, tuple(p.shape))
            _finite(moment, f"{where}.{key}", at_least_zero=key == "exp_avg_sq")


def _same(value: Any, want: Any) -> bool:
    """``value == want`` for plain values of the same type (a tensor never equals a number here)."""
    if type(value) is not type(want):
        return False
    if isinstance(want, (list, tuple)):
        return len(value) == len(want) and all(_same(v, w) for v, w in zip(value, want, strict=True))
    return bool(value == want)


def _random_state(value: Any, field: str, generator: torch.Generator) -> None:
    """A state that ``generator`` (a scratch one, of the kind the state goes to) accepts."""
    _tensor(value, field, torch.uint8, (generator.get_state().numel(),))
    try:
        generator.set_state(value)
    except RuntimeError:
        _fail(f"{field} is not a valid state of a {generator.device.type} random generator")


def _ranks(ranks: Any, mid_epoch: bool, target: ResumeTarget) -> None:
    """Each process's random streams and (mid-epoch) running sums; this rank's states must fit its generators."""
    rule = f"a list of 1..{MAX_PROCESSES:,} processes' random streams"
    _require(type(ranks) is list and 1 <= len(ranks) <= MAX_PROCESSES, "ranks", rule, ranks)
    cpu = torch.Generator()
    for r, entry in enumerate(ranks):
        where = f"ranks[{r}]"
        e = _entries(entry, where, ("generator", "torch_rng", "cuda_rng", "sums"))
        _tensor(e["generator"], f"{where}.generator", torch.uint8)
        _tensor(e["torch_rng"], f"{where}.torch_rng", torch.uint8, (cpu.get_state().numel(),))
        cuda = e["cuda_rng"]
        _require(type(cuda) is list and len(cuda) <= 1024, f"{where}.cuda_rng", "a list of a state per GPU", cuda)
        for d, state in enumerate(cuda):
            _tensor(state, f"{where}.cuda_rng[{d}]", torch.uint8)
        sums = _entries(e["sums"], f"{where}.sums", target.sums if mid_epoch else ())
        for k, v in sums.items():
            _tensor(v, f"{where}.sums.{k}", torch.float64, ())
            _finite(v, f"{where}.sums.{k}", at_least_zero=True)
    if target.world != len(ranks) or target.generator is None:
        return  # another number of processes: new streams (`TrainState.load`)
    mine, name = ranks[target.rank], f"ranks[{target.rank}]"
    _random_state(mine["generator"], f"{name}.generator", torch.Generator(target.generator.device))
    _random_state(mine["torch_rng"], f"{name}.torch_rng", cpu)
    if mine["cuda_rng"] and target.generator.device.type == "cuda":
        count = torch.cuda.device_count()
        rule = f"at most {count} states (the GPUs here)"
        _require(len(mine["cuda_rng"]) <= count, f"{name}.cuda_rng", rule, mine["cuda_rng"])
        for d, state in enumerate(mine["cuda_rng"]):
            _tensor(state, f"{name}.cuda_rng[{d}]", torch.uint8, (torch.cuda.get_rng_state(d).numel(),))


def _ema(ema: Any, weights: dict[str, Tensor], kept: bool, step: int) -> None:
    """The weight average (``--ema`` only): the model's tensors, finite, and its count of updates (one a step)."""
    if not kept:
        _require(ema is None, "ema", "None (the run keeps no weight average)", ema)
        return
    e = _entries(ema, "ema", ("weights", "updates"))
    averaged = e["weights"]
    ok = isinstance(averaged, dict) and averaged.keys() == weights.keys()
    _require(ok, "ema.weights", f"the model's {len(weights)} tensors by name", averaged)
    for key, w in weights.items():
        _finite(_tensor(averaged[key], f"ema.weights[{key!r}]", w.dtype, tuple(w.shape)), f"ema.weights[{key!r}]")
    _int(e["updates"], "ema.updates", 0, step, "last.pt's step")


def _scaler(scaler: Any, used: bool) -> None:
    """The fp16 gradient scaler: a finite scale above 0 (in float32), sane growth and backoff, counts in range.

    An fp16 run's file may hold none (0.1 and 0.2 saved no scaler): the scaler then starts afresh.
    """
    if scaler is None:
        return
    _require(used, "scaler", "None (the run trains without a gradient scaler)", scaler)
    s = _entries(scaler, "scaler", _SCALER)
    scale = s["scale"]
    as_float32 = torch.tensor(float(scale), dtype=torch.float32).item() if _real(scale) else math.nan
    rule = "a finite number above 0 (in float32)"
    _require(math.isfinite(as_float32) and as_float32 > 0, "scaler.scale", rule, scale)
    growth, backoff = s["growth_factor"], s["backoff_factor"]
    _require(_real(growth) and 1 < growth <= 2**16, "scaler.growth_factor", "a number in (1, 65536]", growth)
    _require(_real(backoff) and 2**-16 <= backoff < 1, "scaler.backoff_factor", "a number in [2^-16, 1)", backoff)
    interval = _int(s["growth_interval"], "scaler.growth_interval", 1, 2**31 - 1)
    _int(s["_growth_tracker"], "scaler._growth_tracker", 0, interval - 1, "steps since the scale last changed")
