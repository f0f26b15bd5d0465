"""Hardening: broken weights never end a run "successfully", one writer per run dir, hostile configs and checkpoints.

Most cases go through the real CLI in a subprocess (``python -m gmlp_vision``), so they hold whatever the code behind
it looks like. Cases that would exhaust the machine on unguarded code run under an address-space limit and a timeout.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from gmlp_vision import train as train_mod
from gmlp_vision.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.errors import NonFiniteLossError
from gmlp_vision.model import GMLP
from gmlp_vision.rundir import resume_config, write_json
from gmlp_vision.step import EagerStep
from gmlp_vision.train import train
from synthetic import make_dataset

eager_step = EagerStep.step  # the real step, for the wrappers below that count or poison steps

MEMORY_LIMIT = 2 << 30  # bytes of address space: plenty for torch and a tiny model, far below a 40 GB allocation


def gmlp(*args, memory_limit=None, timeout=120, cwd=None):
    """Run the real ``gmlp`` command; returns the finished process (text output)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run(
        [sys.executable, "-m", "gmlp_vision", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        preexec_fn=limit if memory_limit else None,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def one_line_error(proc, code=1):
    """The process failed with ``code`` and said why in one line of stderr (no traceback)."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmlp: error: "), proc.stderr
    return lines[0]


DIGITS = ("train", "--dataset", "digits", "--threads", "1", "--no-progress")


# 1. Non-finite weights are never saved, and the run does not end with exit code 0.


def test_weights_blown_up_by_the_last_step_fail_the_run_and_save_nothing(tmp_path):
    run = tmp_path / "run"
    proc = gmlp(*DIGITS, "--train-limit", "64", "--batch-size", "64", "--epochs", "1", "--lr", "1e39", "--out", run)
    assert "weights became NaN or infinite in epoch 1" in one_line_error(proc)
    assert not list(run.glob("*.pt")) and not (run / "results.json").exists()


def test_a_mid_epoch_checkpoint_is_never_written_with_infinite_weights(tmp_path):
    run = tmp_path / "run"
    proc = gmlp(*DIGITS, "--train-limit", "200", "--epochs", "2", "--checkpoint-every", "1", "--lr", "1e39",
                "--out", run)  # fmt: skip
    assert "weights became NaN or infinite by step 1" in one_line_error(proc)
    assert not (run / "last.pt").exists()


def test_weights_that_diverge_later_keep_the_last_finite_checkpoint_which_resumes(monkeypatch, tmp_path):
    count = {"n": 0}

    def diverging(stepper, batch):
        out = eager_step(stepper, batch)
        count["n"] += 1
        if count["n"] == 11:  # epoch 2: the update leaves inf weights behind a finite loss
            with torch.no_grad():
                next(stepper.model.parameters()).fill_(float("inf"))
        return out

    cfg = from_preset("tiny", epochs=3, progress=False, out=str(tmp_path / "run"), val_split=0.2, batch_size=32,
                      checkpoint_every=1)  # fmt: skip
    monkeypatch.setattr(EagerStep, "step", diverging)
    with pytest.raises(NonFiniteLossError, match="by step 11 .* keeps the last finite weights"):
        train(cfg, make_dataset())
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last.step == 10 and all(torch.isfinite(v).all() for v in last.model_state.values())
    monkeypatch.undo()
    result = train(resume_config(tmp_path / "run", {}), make_dataset(), resume=True)
    assert len(result.history) == 3


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A finite checkpoint of a very small model, its config and its state."""
    cfg = from_preset("tiny", dataset="digits", in_chans=1, num_classes=10, image_size=8, patch_size=4, depth=1,
                      embed_dim=8, ffn_dim=8)  # fmt: skip
    state = GMLP(cfg.model).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, Checkpoint(cfg, state, tuple("0123456789"), 1, 1, {"loss": 1.0}))
    return path, cfg, state


def crafted(tmp_path, cfg, state, name="crafted.pt"):
    """A checkpoint with a valid digest but any content: the digest is a checksum, not a signature."""
    path = tmp_path / name
    ckpt = Checkpoint(cfg, state, tuple(str(i) for i in range(cfg.model.num_classes)), 1, 1, {})
    monkey = pytest.MonkeyPatch()
    # The writer's own guard, bypassed: a file made elsewhere.
    monkey.setattr("gmlp_vision.checkpoint.nonfinite_names", lambda state: [], raising=False)
    try:
        save_checkpoint(path, ckpt)
    finally:
        monkey.undo()
    return path


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "info"])
def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, tiny_checkpoint, command):
    _, cfg, state = tiny_checkpoint
    state = {k: v.clone() for k, v in state.items()}
    state["head.weight"][0, 0] = float("nan")
    path = crafted(tmp_path, cfg, state)
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    extra = {"predict": [str(tmp_path / "x.png")], "export": ["--format", "safetensors"]}.get(command, [])
    assert main([command, str(path), *extra]) == 1
    assert not (tmp_path / "export").exists()


# 5. A tiny file cannot make the process allocate a huge model.


@pytest.mark.parametrize("command", ["info", "evaluate", "predict", "export"])
def test_a_tiny_checkpoint_describing_a_huge_model_is_refused_before_anything_is_built(
    tmp_path, tiny_checkpoint, command
):
    _, cfg, state = tiny_checkpoint
    huge = from_preset("tiny", dataset="digits", in_chans=1, num_classes=10, image_size=8, patch_size=4, depth=1,
                       embed_dim=100_000, ffn_dim=100_000)  # fmt: skip
    path = crafted(tmp_path, huge, state)
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    assert path.stat().st_size < 20_000
    extra = {"predict": [tmp_path / "x.png"], "export": ["--format", "safetensors"]}.get(command, [])
    proc = gmlp(command, path, *extra, memory_limit=MEMORY_LIMIT, timeout=60)
    assert "weights do not fit the model its config describes" in one_line_error(proc)


def test_a_checkpoint_claiming_millions_of_blocks_is_refused_at_once(tmp_path, tiny_checkpoint):
    _, cfg, state = tiny_checkpoint
    path = crafted(tmp_path, from_preset("tiny", in_chans=1, num_classes=10, depth=10**8), state)
    proc = gmlp("info", path, memory_limit=MEMORY_LIMIT, timeout=60)
    assert "config describes 100000000 blocks but its weights hold 1" in one_line_error(proc)


def test_an_export_config_describing_a_huge_model_is_refused(tmp_path, tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    assert main(["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    config["model_args"].update(embed_dim=100_000, ffn_dim=100_000)
    (tmp_path / "st" / "config.json").write_text(json.dumps(config))
    code = f"from gmlp_vision.artifacts import load_safetensors; load_safetensors({str(tmp_path / 'st')!r})"

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=limit)
    assert proc.returncode == 1 and "CheckpointError" in proc.stderr
    assert "do not fit the model its config describes" in proc.stderr


# 3. One writer per run directory.


def test_a_live_run_cannot_be_resumed_twice_and_a_killed_one_can(tmp_path):
    run = tmp_path / "run"
    live = subprocess.Popen([sys.executable, "-m", "gmlp_vision", *DIGITS, "--epochs", "500", "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        end = time.monotonic() + 90
        while not (run / "last.pt").exists():
            assert live.poll() is None and time.monotonic() < end, "the live run ended or never saved"
            time.sleep(0.05)
        config = (run / "config.json").read_bytes()
        second = gmlp("train", "--resume", run, "--epochs", "2")
        message = one_line_error(second)
        assert "is in use by a gmlp run" in message and f"pid {live.pid}" in message
        assert (run / "config.json").read_bytes() == config and live.poll() is None
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    third = gmlp("train", "--resume", run, "--epochs", "1")  # the kernel dropped the dead run's lock
    assert third.returncode == 0, third.stderr


def test_a_new_run_into_a_live_run_dir_is_refused(tmp_path):
    from gmlp_vision.errors import RunDirBusy
    from gmlp_vision.rundir import RunLock

    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            with RunLock(tmp_path / "run"):
                pass
        assert main([*DIGITS, "--epochs", "1", "--out", str(tmp_path / "run")]) == 1
        assert not (tmp_path / "run" / "config.json").exists()
    with RunLock(tmp_path / "run"):  # released on exit
        pass


# 4. A full disk gives one line, keeps what was there, and leaves no temp files.


def test_torch_save_failing_mid_write_is_one_line_and_leaves_no_temp(monkeypatch, tmp_path, capsys):
    def full(obj, f, *args, **kw):
        f.write(b"PK")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
            "Exception raised from write_record ...\nframe #0: c10::...\nframe #1: ..."
        )

    monkeypatch.setattr(torch, "save", full)
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--dataset", "digits", "--image-size", "8", "--patch-size", "4",
                 "--train-limit", "64", "--epochs", "1", "--no-progress", "--out", str(run)]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write" in err[0] and "MB free on that file system" in err[0]
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*.pt"))


@pytest.fixture
def small_disk(tmp_path):
    """A real 400 KiB tmpfs (root only; skipped where it cannot be mounted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_fails_the_run_in_one_line(small_disk):
    run = small_disk / "run"
    proc = gmlp(*DIGITS, "--epochs", "1", "--out", run)
    message = one_line_error(proc)
    assert "could not write" in message and "it is full" in message, message
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".*.tmp*"))


# 6. --resume takes only the run's own checkpoints.


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ds = make_dataset(n_train=96, n_test=20)
    for name, kw in {"a": {}, "b": {"lr": 0.05}, "wide": {"embed_dim": 48}}.items():
        train(from_preset("tiny", epochs=1, progress=False, out=str(root / name), val_split=0.2, **kw), ds)
    return root, ds


@pytest.mark.parametrize(("donor", "file", "flag"), [("b", "last.pt", "--lr"), ("wide", "best.pt", "--embed-dim")])
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, two_runs, monkeypatch, donor, file, flag):
    root, ds = two_runs
    run = tmp_path / "a"
    shutil.copytree(root / "a", run)
    shutil.copy(root / donor / file, run / file)
    history = (run / "history.csv").read_bytes()
    monkeypatch.setattr(train_mod, "load_dataset", lambda *args, **kw: ds)
    with pytest.raises(Exception, match=f"{file} belongs to another run: its {flag}"):
        train(resume_config(run, {"epochs": 2}), ds, resume=True)
    assert (run / "history.csv").read_bytes() == history


# 7. Config files: every field typed and bounded, rc 2, one line naming the field, nothing created.

BAD_CONFIGS = [
    ({"epochs": 1.5}, "--epochs must be an integer"),
    ({"batch_size": 2.5}, "--batch-size must be an integer"),
    ({"device": 5}, "--device must be a string"),
    ({"device": "meta"}, "--device must be auto, cpu, cuda or cuda:N"),
    ({"preset": ["seed"]}, "unknown preset"),
    ({"model": {"image_size": 8.0}}, "--image-size must be an integer"),
    ({"seed": "x"}, "--seed must be an integer"),
    ({"seed": -1}, "--seed must be in"),
    ({"data": 5}, "--data must be a string or null"),
    ({"init": 12}, "--init must be a string or null"),
    ({"flip": "no"}, "--flip must be true or false"),
    ({"flip": 0}, "--flip must be true or false"),
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"lr": float("inf")}, "--lr must be a finite number"),
    ({"weight_decay": float("nan")}, "--weight-decay must be a finite number"),
    ({"model": {"norm_eps": float("nan")}}, "--norm-eps must be a finite number"),
    ({"dataset": "imagenet"}, "--dataset must be one of"),
    ({"dataset": [1]}, "--dataset must be one of"),
    ({"model": 5}, "config key 'model' must hold an object"),
    ({"model": []}, "config key 'model' must hold an object"),
    ({"epochs": True}, "--epochs must be an integer"),
    ({"zoom": "0.2"}, "--zoom must be a finite number"),
    ({"nope": 1}, "unknown config keys: nope"),
    ({"eval_batch_size": 10**20}, "--eval-batch-size must be at most 2,147,483,647"),
    ({"threads": 100_000}, "--threads must be in 0..1024"),
    ({"weight_decay": 1.5}, "keras-adamw multiplies the weights by (1 - decay)"),
    ({"lr": 10**400}, "--lr must be a finite number"),
    ({"gelu": "x" * 400}, "--gelu must be one of exact, tanh"),
    ({"model": {"image_size": 32768, "patch_size": 4}}, "--image-size must be at most 16,384"),
    ({"model": {"image_size": 1024, "patch_size": 2}}, "262,144 tokens; at most 65,536"),
]


@pytest.mark.parametrize(("values", "message"), BAD_CONFIGS)
def test_a_bad_config_file_is_one_line_rc2_and_creates_nothing(tmp_path, capsys, values, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(values))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--lr=nan", "--lr=inf", "--weight-decay=-inf", "--zoom=nan"])
def test_non_finite_numbers_on_the_command_line_are_refused(tmp_path, capsys, flag):
    assert main([*DIGITS, flag, "--out", str(tmp_path / "run")]) == 2
    assert "must be a finite number" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_config_file_that_never_ends_is_refused_at_once(tmp_path):
    proc = gmlp("train", "--config", "/dev/zero", "--out", tmp_path / "run", memory_limit=MEMORY_LIMIT, timeout=60)
    assert "is not a regular file" in one_line_error(proc, 2) and not (tmp_path / "run").exists()
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20) + "{}")
    assert "larger than 1 MiB" in one_line_error(gmlp("train", "--config", big), 2)


def test_a_string_for_a_switch_is_refused_through_the_real_cli(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"flip": "no"}')
    proc = gmlp("train", "--config", path, "--out", tmp_path / "run")
    assert "--flip must be true or false, got 'no'" in one_line_error(proc, 2) and not (tmp_path / "run").exists()


# 10. Flags of evaluate, predict and report.


@pytest.mark.parametrize("command", ["evaluate", "predict", "report"])
@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--batch-size", "-3"], ["--device", "meta"]])
def test_bad_batch_sizes_and_devices_are_usage_errors(tmp_path, tiny_checkpoint, capsys, command, flags):
    path, _, _ = tiny_checkpoint
    extra = [str(tmp_path / "x.png")] if command == "predict" else []
    assert main([command, str(path.parent if command == "report" else path), *extra, *flags]) == 2
    assert "error: argument" in capsys.readouterr().err


# 11. Messages.


def test_damaged_checkpoint_messages_are_whole_single_lines(tmp_path, capsys):
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "text.pt").write_text("e" * 200)
    zipped = tmp_path / "zip.pt"
    torch.save({"x": torch.zeros(3)}, zipped)
    data = bytearray(zipped.read_bytes())
    data[len(data) // 2 :] = os.urandom(len(data) - len(data) // 2)
    zipped.write_bytes(bytes(data))
    for name in ("random.pt", "text.pt", "zip.pt"):
        assert main(["evaluate", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith((")", "archive)")), err
        assert "weights_only" not in err[0] and "PyTorch 2.6" not in err[0]


def test_results_and_history_are_strict_json(tmp_path):
    write_json(tmp_path / "r.json", {"test": {"loss": float("nan"), "acc": 0.5}, "rows": [float("inf")]})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"test": {"loss": None, "acc": 0.5}, "rows": [None]}
