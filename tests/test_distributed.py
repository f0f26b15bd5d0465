"""Data-parallel training under torchrun (Gloo on CPU), checked against one process.

Every multi-process run here is started through torchrun's own launcher (``python -m torch.distributed.run``) on
127.0.0.1, on the embedded digits with a small model; each takes a few seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.config import from_preset, to_flags
from gmlp_vision.runtime import Dist
from gmlp_vision.train import train

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]

# Digits with a small model: 360 training images in batches of 47 (7 full batches, then 31 split 16 / 15).
SMALL = dict(embed_dim=16, ffn_dim=32, depth=2, train_limit=400, batch_size=47, epochs=2, progress=False, threads=1)
# Without augmentation and dropout the ranks' random streams do not enter the result: one process must match.
PLAIN = dict(flip=False, zoom=0.0, dropout=0.0, head_dropout=0.0, drop_path=0.0)

# Records, per rank, every file a process opens for writing, creates, renames or removes under GMLP_AUDIT_ROOT.
AUDIT = textwrap.dedent("""
    import os, sys
    root, log = os.environ.get("GMLP_AUDIT_ROOT"), os.environ.get("GMLP_AUDIT_LOG")
    if root and log and "RANK" in os.environ:
        fd = os.open(f"{log}.rank{os.environ['RANK']}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        def hook(event, args):
            if event == "open":
                path, mode, flags = args
                writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE)
            elif event in ("os.rename", "os.remove", "os.mkdir"):
                path, writes = args[0], True
            else:
                return
            if writes and isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(root):
                os.write(fd, (event + " " + os.fspath(path) + "\\n").encode())
        sys.addaudithook(hook)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(out: Path, **values):  # fp32: the comparisons below hold to float rounding, on every machine
    return from_preset("digits", **{"dataset": "digits", **SMALL, "precision": "fp32", **values, "out": str(out)})


def launch(cfg, launcher: list[str], env: dict[str, str] | None = None, resume: bool = False) -> subprocess.Popen:
    """``torchrun <launcher> -m gmlp_vision train <cfg as flags>`` in the background."""
    args = ["--resume", cfg.run.out, "--epochs", str(cfg.optim.epochs)] if resume else to_flags(cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "gmlp_vision", "train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun(cfg, nproc: int = 2, **kw) -> str:
    """Run ``cfg`` on ``nproc`` local processes; returns the combined output (fails the test on a non-zero exit)."""
    launcher = ["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    proc = launch(cfg, launcher, **kw)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    return out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt").model_state


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: the plain run in this process, one rank."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(config(out, **PLAIN))
    return out


def test_shares_of_a_global_batch_cover_it_once_in_order():
    batch = torch.arange(31)
    shares = [Dist(rank, 2).share(batch) for rank in range(2)]
    assert [len(s) for s in shares] == [16, 15] and torch.equal(torch.cat(shares), batch)
    shares = [Dist(rank, 4).share(torch.arange(3)) for rank in range(4)]
    assert [len(s) for s in shares] == [1, 1, 1, 0]  # the last rank takes part with a zero-weight image


def test_two_processes_match_one_and_only_rank_0_writes(tmp_path, single):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT)
    out = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
           "GMLP_AUDIT_ROOT": str(tmp_path / "run"), "GMLP_AUDIT_LOG": str(tmp_path / "audit")}  # fmt: skip
    log = torchrun(config(out, **PLAIN), env=env)

    assert max_difference(weights(out), weights(single)) < 1e-5
    two, one = load_checkpoint(out / "last.pt"), load_checkpoint(single / "last.pt")
    assert two.step == one.step == 16 and len(two.train_state["ranks"]) == 2
    for key in ("loss", "acc", "val_loss", "val_acc"):  # metrics are reduced over both ranks before they are logged
        assert two.metrics[key] == pytest.approx(one.metrics[key], rel=1e-4, abs=1e-6)
    assert log.count("Epoch 2/2") == 1 and log.count("Test accuracy") == 1  # only rank 0 logs and prints
    written = (tmp_path / "audit.rank0").read_text()
    assert "last.pt" in written and "config.json" in written and "history.csv" in written
    assert (tmp_path / "audit.rank1").read_text() == ""


def test_two_nodes_through_the_c10d_rendezvous_match_one_process(tmp_path, single):
    port, out = free_port(), tmp_path / "run"
    nodes = [
        launch(config(out, **PLAIN), ["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"])
        for rank in range(2)
    ]  # fmt: skip
    for node in nodes:
        log, _ = node.communicate(timeout=240)
        assert node.returncode == 0, log
    assert max_difference(weights(out), weights(single)) < 1e-5


def test_gradient_accumulation_matches_a_batch_k_times_larger(tmp_path):
    whole = train(config(tmp_path / "whole", **PLAIN, epochs=1, batch_size=48))
    parts = train(config(tmp_path / "parts", **PLAIN, epochs=1, batch_size=48, accum_steps=4))
    assert max_difference(weights(whole.run_dir), weights(parts.run_dir)) < 1e-5
    assert parts.history[0]["loss"] == pytest.approx(whole.history[0]["loss"], rel=1e-5)


def test_two_processes_stopped_by_sigterm_resume_to_the_same_weights(tmp_path):
    """With augmentation and dropout on: each rank must get its own random streams back."""
    straight, cut = config(tmp_path / "straight", epochs=12), config(tmp_path / "cut", epochs=12)
    torchrun(straight)
    launcher = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    proc = launch(cut, launcher)
    deadline = time.monotonic() + 120
    while not (Path(cut.run.out) / "history.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks, which must stop after the same step
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, log
    stopped = load_checkpoint(Path(cut.run.out) / "last.pt")
    assert 0 < stopped.step < load_checkpoint(Path(straight.run.out) / "last.pt").step, log

    torchrun(cut, resume=True)
    assert max_difference(weights(Path(cut.run.out)), weights(Path(straight.run.out))) == 0.0
