"""Issue 21, "trust nothing you load": a re-signed ``last.pt`` with a hostile resume state is refused in one line.

The digest is a checksum, not a signature: anyone can edit ``last.pt``'s payload and compute it again (`resign`). Each
hostile file goes through the real CLI (``gmlp train --resume RUN_DIR``): exit code 1, one line on stderr naming the
field, no traceback, and not one byte of the run directory changed. A property-based fuzz then throws random
mutations of a valid resume state at the library (the same checks, without the CLI): each one either resumes and
trains on, or is refused with a `CheckpointError`. Bounded for CI (``GMLP_FUZZ_EXAMPLES``, default 60); ``pytest -m
fuzz_long`` runs 2,000.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gmlp_vision.batches import BatchSource
from gmlp_vision.checkpoint import content_digest, load_checkpoint
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.data import load_dataset
from gmlp_vision.errors import CheckpointError, GmlpError, TrainingInterrupted
from gmlp_vision.loop import train_one_epoch
from gmlp_vision.metrics import METRICS
from gmlp_vision.model import GMLP
from gmlp_vision.optim import build_optimizer
from gmlp_vision.resume_check import ResumeTarget, check_resume_state, training_images
from gmlp_vision.rundir import write_json
from gmlp_vision.state import TrainState
from gmlp_vision.step import EagerStep
from gmlp_vision.train import train

eager_step = EagerStep.step  # the real step, for the wrappers below that count or poison steps

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = int(os.environ.get("GMLP_FUZZ_EXAMPLES", "60"))
common = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
long = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))

# digits, 64 images: 57 to train on, 4 steps of 16 an epoch. fp16 (a gradient scaler), --ema: last.pt has every field.
STOP_AT = 6  # SIGTERM in step 6: last.pt holds epoch 1's history row and epoch 2's permutation at batch 2
RUN = dict(dataset="digits", image_size=8, patch_size=4, train_limit=64, batch_size=16, epochs=2)
RUN.update(precision="fp16", ema=0.9, threads=1, progress=False)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped by SIGTERM mid-epoch 2: its ``last.pt`` holds a part-done epoch, a scaler, a weight average."""
    run = tmp_path_factory.mktemp("base") / "run"
    count = {"n": 0}

    def step(stepper: EagerStep, batch: Any) -> Any:
        count["n"] += 1
        if count["n"] == STOP_AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return eager_step(stepper, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EagerStep, "step", step)
        with pytest.raises(TrainingInterrupted):
            train(from_preset("tiny", out=str(run), **RUN))
    return run


def copy_run(run: Path, to: Path) -> Path:
    """A copy of ``run`` at ``to``, its config.json naming its new place (as if it had been made there)."""
    shutil.copytree(run, to)
    values = json.loads((to / "config.json").read_text())
    values["run"]["out"] = str(to)
    write_json(to / "config.json", values)
    return to


def resign(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit ``path``'s payload in place and give it a matching digest, as anyone can."""
    payload = torch.load(path, weights_only=True)
    payload.pop("sha256")
    edit(payload)
    payload["sha256"] = content_digest(payload)
    torch.save(payload, path)


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run directory, by path (the lock file records its holder, not the run)."""
    return {
        str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def ts(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets ``train_state[key]`` (a dotted path; numbers index lists and the optimiser's state)."""

    def edit(payload: dict[str, Any]) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in key.split(".")]
        node: Any = payload["train_state"]
        for k in parents:
            node = node[k]
        node[last] = value

    return edit


def top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload.__setitem__(key, value)


def both_steps(step: int) -> Callable[[dict[str, Any]], None]:
    def edit(payload: dict[str, Any]) -> None:
        payload["step"] = payload["train_state"]["epoch_progress"]["step"] = step

    return edit


def drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload["train_state"].pop(key)


def flood_history(payload: dict[str, Any]) -> None:
    row = payload["train_state"]["history"][0]
    payload["train_state"]["history"] = [row] * 10_000  # one pickled dict, referenced 10,000 times: a small file


def repeated_index(payload: dict[str, Any]) -> None:
    payload["train_state"]["epoch_progress"]["perm"][1] = payload["train_state"]["epoch_progress"]["perm"][0]


def shorter_perm(payload: dict[str, Any]) -> None:  # a valid permutation, of one image fewer than the run has
    payload["train_state"]["epoch_progress"]["perm"] = torch.randperm(56)


def negative_moment(payload: dict[str, Any]) -> None:
    payload["train_state"]["optimizer"]["state"][0]["exp_avg_sq"][0] = -1.0


def nan_average(payload: dict[str, Any]) -> None:
    payload["train_state"]["ema"]["weights"]["head.weight"][0, 0] = float("nan")


# What a hostile-test round found, and more of the same kind: each edit, and what the one line says.
HOSTILE = {
    "scale-nan": (ts("scaler.scale", math.nan), "scaler.scale must be a finite number above 0 (in float32), not nan"),
    "scale-inf": (ts("scaler.scale", math.inf), "scaler.scale must be a finite number above 0 (in float32), not inf"),
    "scale-str": (
        ts("scaler.scale", "65536"),
        "scaler.scale must be a finite number above 0 (in float32), not '65536'",
    ),
    "scale-f32-inf": (ts("scaler.scale", 1e39), "scaler.scale must be a finite number above 0 (in float32), not 1e+39"),
    "scale-zero": (ts("scaler.scale", 0.0), "scaler.scale must be a finite number above 0 (in float32), not 0.0"),
    "tracker": (ts("scaler._growth_tracker", -1), "scaler._growth_tracker must be an integer in 0..1999"),
    "growth": (ts("scaler.growth_factor", 0.5), "scaler.growth_factor must be a number in (1, 65536], not 0.5"),
    "backoff": (ts("scaler.backoff_factor", 2.0), "scaler.backoff_factor must be a number in [2^-16, 1), not 2.0"),
    "interval": (ts("scaler.growth_interval", 0), "scaler.growth_interval must be an integer in 1..2147483647, not 0"),
    "history-junk": (ts("history", ["junk"]), "history[0] must be a dict of named numbers, not 'junk'"),
    "history-str": (ts("history.0.loss", "x"), "history[0].loss must be a finite number, not 'x'"),
    "history-nan": (ts("history.0.val_loss", math.nan), "history[0].val_loss must be a finite number, not nan"),
    "history-short": (ts("history", []), "history has 0 rows, but last.pt is at epoch 1: it keeps one row per epoch"),
    "history-epoch": (ts("history.0.epoch", 7), "history[0].epoch must be 1, not 7"),
    "batch-negative": (ts("epoch_progress.batch", -1), "epoch_progress.batch must be an integer in 0..4"),
    "batch-past-end": (ts("epoch_progress.batch", 99), "epoch_progress.batch must be an integer in 0..4"),
    "perm-repeats": (repeated_index, "epoch_progress.perm is not a permutation of 0..56"),
    "perm-float": (ts("epoch_progress.perm", torch.rand(57)), "epoch_progress.perm must be an int64 tensor"),
    # The run's training set decides this one: train passes its size to open_run_dir, which checks it first.
    "perm-short": (shorter_perm, "epoch_progress.perm has 56 entries; the run trains on 57 images"),
    "step-inconsistent": (both_steps(7), "step must be 6 (1 epoch(s) of 4 steps, then 2 batches), not 7"),
    "progress-step": (ts("epoch_progress.step", 5), "epoch_progress.step must be 6 (last.pt's), not 5"),
    "epoch-negative": (top("epoch", -1), "epoch must be an integer in 0..2 (the run's --epochs), not -1"),
    "step-negative": (top("step", -5), "step must be an integer >= 0, not -5"),
    "ranks-empty": (ts("ranks", []), "ranks must be a list of 1..65,536 processes' random streams, not []"),
    "ranks-junk": (ts("ranks.0", 3), "ranks[0] must be a dict of generator, torch_rng, cuda_rng, sums, not 3"),
    "rank-no-generator": (lambda p: p["train_state"]["ranks"][0].pop("generator"), "ranks[0] lacks 'generator'"),
    "rank-generator-size": (
        ts("ranks.0.generator", torch.zeros(16, dtype=torch.uint8)),
        "ranks[0].generator must be a uint8 tensor of shape (5056,), not a uint8 tensor of shape (16,)",
    ),
    "rank-sum-nan": (
        ts("ranks.0.sums.loss", torch.tensor(math.nan, dtype=torch.float64)),
        "ranks[0].sums.loss holds NaN",
    ),
    "order-generator": (
        ts("order_generator", torch.zeros(5056, dtype=torch.uint8)),
        "order_generator is not a valid state of a cpu random generator",
    ),
    "moment-shape": (
        ts("optimizer.state.0.exp_avg", torch.zeros(3)),
        "optimizer.state[0].exp_avg must be a float32 tensor of shape",
    ),
    "moment-negative": (negative_moment, "optimizer.state[0].exp_avg_sq holds negative values"),
    "adam-step": (ts("optimizer.state.0.step", -1), "optimizer.state[0].step must be an integer in 0..6"),
    "adam-unknown-param": (
        ts("optimizer.state.999", {}),
        "optimizer.state holds an entry 999; the model has parameters",
    ),
    "lr-nan": (
        ts("optimizer.param_groups.0.lr", math.nan),
        "optimizer.param_groups[0].lr must be a finite number >= 0",
    ),
    "eps": (
        ts("optimizer.param_groups.0.eps", 0.0),
        "optimizer.param_groups[0].eps must be 1e-07 (the run's), not 0.0",
    ),
    "plateau-wait": (ts("plateau.wait", "x"), "plateau.wait must be an integer in 0..1 (epochs done), not 'x'"),
    "best-epoch": (ts("early_stopping.best_epoch", 5), "early_stopping.best_epoch must be an integer in 0..0"),
    "stop-best-nan": (ts("early_stopping.best", math.nan), "early_stopping.best must be a number (inf before any"),
    "ema-updates": (ts("ema.updates", -10), "ema.updates must be an integer in 0..6 (last.pt's step), not -10"),
    "ema-nan": (nan_average, "ema.weights['head.weight'] holds NaN or inf"),
    "unknown-key": (ts("surprise", 1), "train_state holds an unexpected entry 'surprise'"),
    "missing-key": (drop("plateau"), "train_state lacks 'plateau'"),
    "no-train-state": (top("train_state", {}), "it holds no training state (best.pt and ema.pt hold only weights)"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_resume_state_is_refused_in_one_line_and_changes_nothing(stopped_run, tmp_path, capsys, case):
    edit, message = HOSTILE[case]
    run = copy_run(stopped_run, tmp_path / "run")
    resign(run / "last.pt", edit)
    load_checkpoint(run / "last.pt")  # the digest matches: only the resume state is wrong
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("gmlp: error: cannot resume from last.pt: ") and message in lines[0], lines[0]
    assert snapshot(run) == before


def test_a_flooded_history_is_refused_before_its_digest_is_computed(stopped_run, tmp_path, capsys):
    """A million rows of one pickled dict make a small file whose digest took 18 s; the row count is checked first."""
    run = copy_run(stopped_run, tmp_path / "run")
    resign(run / "last.pt", flood_history)
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "last.pt is damaged: its history has 10,000 rows for 1 epochs" in err, err
    assert snapshot(run) == before


def test_a_resigned_but_unchanged_state_resumes_through_the_cli(stopped_run, tmp_path, capsys):
    """The control: re-signing alone changes nothing that resuming needs."""
    run = copy_run(stopped_run, tmp_path / "run")
    resign(run / "last.pt", lambda payload: None)
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    last = load_checkpoint(run / "last.pt")
    assert last.epoch == 2 and last.step == 8 and len(last.train_state["history"]) == 2
    assert len((run / "history.csv").read_text().splitlines()) == 3


# The fuzz: random edits of the stopped run's resume state, re-signed, loaded and resumed with the library.

KEYS = st.one_of(st.text(max_size=6), st.integers(-3, 1000))
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(-3, 3), max_size=4),
    st.tuples(st.floats(), st.floats()),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=3),
    st.sampled_from([torch.zeros(0), torch.ones(3), torch.zeros(5056, dtype=torch.uint8), torch.tensor(1.5)]),
)
# Numbers at the edges, and plausible ones that a check may well accept (the fuzz must see resumes too).
EDGES = st.sampled_from(
    [math.nan, math.inf, -math.inf, -1, 0, 1, 2, 3, 0.5, 1e-3, 2.0**20, -0.0, True, -(10**30), 10**30, 2**63]
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in ``node`` (dict keys and list indices, nested), itself included."""
    out = [prefix]
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        items = []
    for key, child in items:
        out += paths(child, (*prefix, key))
    return out


def tensor_edit(t: torch.Tensor, data: st.DataObject) -> torch.Tensor:
    kind = data.draw(st.sampled_from(["poke", "dtype", "shorter", "longer", "reshape", "empty"]))
    if kind == "poke" and t.numel():
        t = t.clone().reshape(-1)
        if t.is_floating_point():
            value: Any = data.draw(st.sampled_from([math.nan, math.inf, -1.0, 1e30, 0.0]))
        else:
            value = data.draw(st.integers(0, 255) if t.dtype == torch.uint8 else st.integers(-2, 2**40))
        t[data.draw(st.integers(0, t.numel() - 1))] = value
        return t
    if kind == "dtype":
        return t.to(data.draw(st.sampled_from([torch.float64, torch.float16, torch.int32, torch.uint8, torch.bool])))
    if kind == "shorter":
        return t.reshape(-1)[:-1].clone()
    if kind == "longer":
        return torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
    if kind == "reshape":
        return t.unsqueeze(0)
    return t.new_empty(0)


def nudged(value: Any, data: st.DataObject) -> Any:
    """``value`` moved a little, its type kept: a count by a few, a number within its range, one tensor entry."""
    if type(value) is int:
        return value + data.draw(st.integers(-2, 2))
    if type(value) is float:
        return value * data.draw(st.sampled_from([0.0, 0.5, 2.0, 10.0])) if math.isfinite(value) else 1.0
    t = value.clone().reshape(-1)
    if t.numel():
        i = data.draw(st.integers(0, t.numel() - 1))
        t[i] = t[data.draw(st.integers(0, t.numel() - 1))] if not t.is_floating_point() else t[i] * 2
    return t.reshape(value.shape)


def mutate(payload: dict[str, Any], data: st.DataObject) -> None:
    """One random edit of the resume state (or of the epoch and step beside it), in a field drawn first."""
    state = payload.get("train_state")
    fields = [("train_state", k) for k in state] if isinstance(state, dict) else [("train_state",)]
    field = data.draw(st.sampled_from([*fields, ("epoch",), ("step",)]))
    parent: Any = payload
    for k in field[:-1]:
        parent = parent[k]
    place = field + data.draw(st.sampled_from(paths(parent[field[-1]])))
    for k in place[len(field) - 1 : -1]:
        parent = parent[k]
    key, value = place[-1], parent[place[-1]]
    kind = data.draw(st.sampled_from(["nudge", "nudge", "junk", "edge", "delete", "extra", "grow", "tensor"]))
    if kind == "nudge" and type(value) in (int, float, torch.Tensor):  # a plausible value: checks must let many pass
        parent[key] = nudged(value, data)
    elif kind == "delete" and place not in (("train_state",), ("epoch",), ("step",)):
        del parent[key]
    elif kind == "extra" and isinstance(value, dict):
        value[data.draw(KEYS)] = data.draw(JUNK)
    elif kind == "grow" and isinstance(value, list) and value:
        value.extend([value[-1]] * data.draw(st.integers(1, 3000)))  # shared references: a small file
    elif kind == "tensor" and isinstance(value, torch.Tensor):
        parent[key] = tensor_edit(value, data)
    elif kind == "edge":
        parent[key] = data.draw(EDGES)
    else:
        kind, parent[key] = "junk", data.draw(JUNK)
    event(f"{kind} at {'.'.join(str(k) for k in place[:3])}")


@pytest.fixture(scope="module")
def fuzz_base(stopped_run: Path) -> dict[str, Any]:
    """The stopped run's payload, and what a fresh process of that run starts from (data, config)."""
    payload = torch.load(stopped_run / "last.pt", weights_only=True)
    payload.pop("sha256")
    cfg = load_checkpoint(stopped_run / "last.pt").config
    ds = load_dataset(cfg.data.dataset, None, **cfg.load_options(progress=False))
    n = training_images(cfg.data, len(ds.train.labels))
    return {"payload": payload, "cfg": cfg, "ds": ds, "train": (ds.train.images[:n], ds.train.labels[:n])}


def resume_or_refuse(base: dict[str, Any], payload: dict[str, Any]) -> str:
    """Re-sign ``payload``, load it, check it, resume a fresh state from it and train out the epoch."""
    payload = dict(payload, sha256=content_digest(payload))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "last.pt"
        torch.save(payload, path)
        try:
            saved = load_checkpoint(path)
        except CheckpointError:
            return "refused by load_checkpoint"
    try:
        check_resume_state(saved, ResumeTarget.described_by(saved.config, METRICS))
        early = "passed"
    except CheckpointError:
        early = "refused"
    cfg, ds = base["cfg"], base["ds"]
    net = GMLP(cfg.model)
    state = TrainState(cfg, net, build_optimizer(cfg.optim, net), torch.Generator(), ds=ds, steps_per_epoch=4)
    rng = torch.get_rng_state()
    try:
        progress = state.load(saved)
    except CheckpointError as e:
        event(f"refused: {str(e).removeprefix('cannot resume from last.pt: ').split()[0]}")
        return f"early check {early}, refused by TrainState.load"
    finally:
        torch.set_rng_state(rng)
    assert early == "passed", "TrainState.load took what the early check refused"
    try:
        source = BatchSource(*base["train"], cfg.optim.batch_size)
        stepper = EagerStep(net, state.optimizer, cfg, state.generator, state.scaler)
        train_one_epoch(state, source, stepper, progress or source.new_epoch(state.order, state.step))
    except GmlpError as e:  # e.g. an accepted lr of 1e30 makes the loss NaN: the run stops in one line
        return f"resumed, then {type(e).__name__}"
    return "resumed"


def fuzz_one(base: dict[str, Any], data: st.DataObject) -> None:
    payload = copy.deepcopy(base["payload"])
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(payload, data)
    event(resume_or_refuse(base, payload))


def test_the_fuzz_starts_from_a_state_that_resumes(fuzz_base):
    assert resume_or_refuse(fuzz_base, copy.deepcopy(fuzz_base["payload"])) == "resumed"


@common
@given(data=st.data())
def test_fuzzed_resume_states_resume_or_raise_checkpoint_error(fuzz_base, data):
    fuzz_one(fuzz_base, data)


@pytest.mark.fuzz_long
@long
@given(data=st.data())
def test_long_resume_states(fuzz_base, data):
    fuzz_one(fuzz_base, data)
