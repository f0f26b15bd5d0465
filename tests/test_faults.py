"""Fault tests with real processes: SIGKILL at random points, then resume; SIGTERM and SIGINT save and exit."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from archives import make_cifar, write_tar
from gmlp_vision.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    fake = make_cifar("cifar10", per_batch=40, n_test=20)
    return write_tar(tmp_path_factory.mktemp("data") / fake.archive, fake.files())


def command(archive, run, *extra):
    base = [sys.executable, "-m", "gmlp_vision", "train"]
    if "--resume" in extra:
        return [*base, *extra]
    return [*base, "--preset", "tiny", "--dataset", "cifar10", "--data", str(archive), "--epochs", "3",
            "--batch-size", "8", "--checkpoint-every", "1", "--threads", "1", "--no-progress", "--out", str(run),
            *extra]  # fmt: skip


def weights(path):
    return load_checkpoint(path).model_state


def assert_same(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def stamp(path):
    return path.stat().st_mtime_ns if path.exists() else None


def wait_for_new(path, proc, before=None, timeout=60.0):
    """Wait until ``path`` is (re)written by ``proc``: its modification stamp differs from ``before``."""
    end = time.monotonic() + timeout
    while stamp(path) in (None, before):
        if proc.poll() is not None or time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


@pytest.fixture(scope="module")
def straight(archive, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(command(archive, run), check=True, capture_output=True, timeout=120)
    return run


def test_sigkill_at_random_points_then_resume_gives_identical_weights(archive, straight, tmp_path):
    rng = random.Random(1234)
    run = tmp_path / "run"
    cmd = command(archive, run)
    killed_at = []
    for _ in range(4):
        before = stamp(run / "last.pt")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait_for_new(run / "last.pt", proc, before):  # it resumed and took a step: now kill it anywhere
            time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            killed_at.append(load_checkpoint(run / "last.pt").step if (run / "last.pt").exists() else 0)
        cmd = command(archive, run, "--resume", str(run))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert killed_at, "no kill landed before the run finished"
    assert_same(straight / "last.pt", run / "last.pt")
    assert_same(straight / "best.pt", run / "best.pt")
    print(f"killed with SIGKILL after steps {killed_at}; resumed to identical weights")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_a_resumable_checkpoint(archive, straight, tmp_path, signum, code):
    run = tmp_path / "run"
    proc = subprocess.Popen(command(archive, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_new(run / "last.pt", proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == code, err
    assert f"resume with: gmlp train --resume {run}" in err and "Traceback" not in err
    assert load_checkpoint(run / "last.pt").train_state["epoch_progress"] is not None or "Epoch" in out
    done = subprocess.run(command(archive, run, "--resume", str(run)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_same(straight / "last.pt", run / "last.pt")
