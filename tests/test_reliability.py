"""Crash safety: exact resume, signals, the non-finite-loss guard, full disks, hostile checkpoints."""

import errno
import os
import pickle
import signal

import pytest
import torch

from gmlp_vision import checkpoint as checkpoint_mod
from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.errors import CheckpointError, ConfigError, NonFiniteLossError, TrainingInterrupted
from gmlp_vision.rundir import resume_config
from gmlp_vision.step import EagerStep
from gmlp_vision.train import train
from synthetic import make_dataset

eager_step = EagerStep.step  # the real step, for the wrappers below that count or poison steps


def cfg_for(tmp_path, name, **kw):
    values = dict(epochs=3, progress=False, out=str(tmp_path / name), val_split=0.2, threads=2, batch_size=32)
    values.update(kw)
    return from_preset("tiny", **values)


def same_weights(a, b):
    sa, sb = load_checkpoint(a).model_state, load_checkpoint(b).model_state
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def interrupt_at(monkeypatch, calls, signum=signal.SIGTERM):
    """Deliver ``signum`` to this process during optimiser step number ``calls`` (1-based)."""
    count = {"n": 0}

    def step(stepper, batch):
        count["n"] += 1
        if count["n"] == calls:
            os.kill(os.getpid(), signum)
        return eager_step(stepper, batch)

    monkeypatch.setattr(EagerStep, "step", step)


# The modern recipe's random ops and the weight average must resume exactly too.
MODERN = dict(ema=0.9, policy="trivial", erase=0.5, crop="pad", mixup=0.2, label_smoothing=0.1)


# Mid epoch 1, the end of epoch 1 (8 steps per epoch), epoch 2; the modern recipe mid epoch 1; a cosine schedule
# mid epoch 2 (the history's lr is the epoch's first step's, resumed or not).
COSINE = dict(schedule="cosine", plateau_patience=0, warmup_epochs=0.5)


# Muon beside AdamW (one state dict for both), alternating flips (by image index and epoch) and a whitened, frozen
# patch embedding (no optimiser state), mid epoch 2.
MUON = dict(
    optimizer="muon",
    weight_decay=0.05,
    decay_norms_biases=False,
    flip_mode="alternate",
    crop="pad",
    patch_init="whiten",
)


@pytest.mark.parametrize(("stop_step", "recipe"), [(3, {}), (8, {}), (13, {}), (5, MODERN), (11, COSINE), (10, MUON)])
def test_interrupted_and_resumed_run_equals_straight_run(monkeypatch, tmp_path, stop_step, recipe):
    ds = make_dataset()
    straight = train(cfg_for(tmp_path, "straight", **recipe), ds)
    interrupt_at(monkeypatch, stop_step)
    with pytest.raises(TrainingInterrupted, match="SIGTERM: stopped after step") as info:
        train(cfg_for(tmp_path, "cut", **recipe), ds)
    assert info.value.signum == signal.SIGTERM
    assert load_checkpoint(tmp_path / "cut" / "last.pt").step == stop_step
    monkeypatch.undo()
    resumed = train(resume_config(tmp_path / "cut", {}), ds, resume=True)
    assert same_weights(straight.run_dir / "last.pt", resumed.run_dir / "last.pt")
    assert same_weights(straight.run_dir / "best.pt", resumed.run_dir / "best.pt")
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert resumed.test == straight.test
    if "ema" in recipe:
        assert same_weights(straight.run_dir / "ema.pt", resumed.run_dir / "ema.pt")
        assert resumed.test_ema == straight.test_ema and "val_ema_acc" in resumed.history[-1]


def test_periodic_checkpoints_within_an_epoch(tmp_path):
    train(cfg_for(tmp_path, "run", epochs=1, checkpoint_every=3), make_dataset())
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt.epoch == 1 and ckpt.step == 8 and ckpt.train_state["epoch_progress"] is None


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path):
    count = {"n": 0}

    def poisoned(stepper, batch):
        count["n"] += 1
        if count["n"] == 11:  # epoch 2, after the epoch-1 checkpoint
            with torch.no_grad():
                stepper.model.head.weight.fill_(float("nan"))
        return eager_step(stepper, batch)

    monkeypatch.setattr(EagerStep, "step", poisoned)
    with pytest.raises(NonFiniteLossError, match="became nan at step 11"):
        train(cfg_for(tmp_path, "run"), make_dataset())
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last.epoch == 1 and all(torch.isfinite(v).all() for v in last.model_state.values())


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(monkeypatch, tmp_path):
    ds = make_dataset()
    train(cfg_for(tmp_path, "run", epochs=1), ds)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("last.pt", "best.pt")}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_mod.os, "fsync", full)
    with pytest.raises(CheckpointError, match=r"No space left on device; the previous (best|last)\.pt is intact"):
        train(resume_config(tmp_path / "run", {"epochs": 2}), ds, resume=True)
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before
    assert not list((tmp_path / "run").glob(".*.tmp"))


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_checkpoint_crafted_to_run_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"format": "gmlp-vision-checkpoint", "version": 1, "payload": _Exploit(target)}, bad)
    with pytest.raises(CheckpointError, match="was refused: it holds Python objects other than tensors"):
        load_checkpoint(bad)
    assert not target.exists()
    # The same payload really does create the file when unpickled without restrictions.
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Exploit(target)))
    pickle.loads(plain.read_bytes())
    assert target.exists()


def test_resume_refuses_flags_that_change_the_run(tmp_path, capsys):
    train(cfg_for(tmp_path, "run", epochs=1), make_dataset())
    with pytest.raises(ConfigError, match="--depth"):
        resume_config(tmp_path / "run", {"depth": 8, "epochs": 3})
    assert resume_config(tmp_path / "run", {"epochs": 3}).optim.epochs == 3
    assert main(["train", "--resume", str(tmp_path / "run"), "--lr", "0.1"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2


def test_run_killed_before_its_first_checkpoint_starts_over_in_place(tmp_path):
    ds = make_dataset()
    train(cfg_for(tmp_path, "straight", epochs=1), ds)
    cfg = cfg_for(tmp_path, "cut", epochs=1)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text(__import__("json").dumps(cfg.to_dict()))
    (tmp_path / "cut" / ".last.pt.abc.tmp").write_bytes(b"half a checkpoint")
    train(resume_config(tmp_path / "cut", {}), ds, resume=True)
    assert same_weights(tmp_path / "straight" / "last.pt", tmp_path / "cut" / "last.pt")
    assert not (tmp_path / "cut" / ".last.pt.abc.tmp").exists()
