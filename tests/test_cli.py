import json
import os
from pathlib import Path

import pytest

from gmlp_vision.cli import main

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-python.tar.gz"


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert "gmlp-vision" in capsys.readouterr().out
    assert main(["train", "-h"]) == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--embed-dim", "--no-flip", "--restore-best", "--train-limit", "--data"):
        assert flag in out


def test_presets_and_info(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "seed" in out and "tiny" in out and "digits" in out
    assert main(["info", "--preset", "seed"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 236,004" in out and "torch" in out and "CPU threads" in out
    assert main(["info", "--preset", "seed", "--dataset", "cifar10"]) == 0
    assert "trainable parameters: 224,394" in capsys.readouterr().out  # head 128 -> 10
    assert main(["info", "--preset", "cifar10-fast", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "patch init whiten" in out and "trainable parameters: 326,922" in out
    assert "frozen parameters: 6,144 (the whitened patch embedding" in out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["train", "--preset", "nope"], 2, "unknown preset"),
        (["train", "--bogus"], 2, "unrecognized arguments"),
        (["train", "--preset", "tiny", "--patch-size", "5"], 2, "--patch-size 5"),
        (["train", "--preset", "tiny", "--ffn-dim", "33"], 2, "--ffn-dim must be even"),
        (["evaluate", "/no/such/checkpoint.pt"], 1, "checkpoint not found"),
    ],
)
def test_usage_and_input_errors(argv, code, message, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_missing_data_fails_cleanly_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "cifar10", "--data", str(tmp_path / "missing.tar.gz"), "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.tar.gz" in err
    assert not out.exists()


def test_cifar100_archive_given_for_cifar10_is_refused(tmp_path, cifar100_archive, capsys):
    argv = ["train", "--dataset", "cifar10", "--data", str(cifar100_archive), "--out", str(tmp_path / "r")]
    assert main(argv) == 1
    assert "CIFAR-100" in capsys.readouterr().err


def test_cifar100_prints_top5_as_the_tutorial_does(tmp_path, cifar100_archive, capsys):
    argv = ["train", "--preset", "tiny", "--dataset", "cifar100", "--data", str(cifar100_archive), "--epochs", "1",
            "--out", str(tmp_path / "run"), "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "val_top5-acc" in out and "Test accuracy:" in out and "Test top 5 accuracy:" in out


def test_train_then_evaluate_end_to_end(tmp_path, cifar10_archive, capsys):
    run = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--dataset", "cifar10", "--data", str(cifar10_archive), "--epochs", "2",
            "--batch-size", "16", "--out", str(run), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out and "val_acc" in out
    assert "Test accuracy:" in out and "top 5" not in out and "top5" not in out  # 10 classes: top-5 says little
    assert f"plots: {run / 'plots'} (loss.png, accuracy.png" in out
    assert max(len(line) for line in out.splitlines() if line.startswith("Epoch")) < 100
    assert {"config.json", "history.csv", "history.jsonl", "best.pt", "last.pt", "results.json"} <= set(os.listdir(run))
    # evaluate rebuilds the model from the checkpoint alone and finds the data through the embedded config.
    assert main(["evaluate", str(run / "last.pt"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    results = json.loads((run / "results.json").read_text())
    if results["final_checkpoint"] == "last.pt":
        assert metrics["acc"] == pytest.approx(results["test"]["acc"])
    assert metrics["images"] == 10
    assert main(["evaluate", str(run)]) == 0
    assert main(["info", str(run / "best.pt")]) == 0
    assert "trainable parameters" in capsys.readouterr().out


def test_checkpoint_from_another_model_is_refused(tmp_path, cifar10_archive, cifar100_archive, capsys):
    run = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--dataset", "cifar10", "--data", str(cifar10_archive), "--epochs", "1",
            "--out", str(run), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run / "last.pt"), "--dataset", "cifar100", "--data", str(cifar100_archive)]) == 2
    assert "10 classes" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert main(["evaluate", str(garbage)]) == 1
    assert "is not a gmlp-vision checkpoint (not a PyTorch zip archive)" in capsys.readouterr().err


@pytest.mark.slow
def test_seed_preset_one_epoch_on_real_cifar10(tmp_path, capsys):
    """The tutorial's model and recipe, one epoch on the first 10,000 real CIFAR-10 training images."""
    if not SHARED_CIFAR10.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the real CIFAR-10 archive at {SHARED_CIFAR10}")
        pytest.skip(f"real CIFAR-10 not found at {SHARED_CIFAR10}")
    run = tmp_path / "run"
    argv = ["train", "--dataset", "cifar10", "--data", str(SHARED_CIFAR10), "--train-limit", "10000", "--epochs", "1",
            "--out", str(run), "--no-progress", "--threads", "2"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["acc"] >= 0.25, results
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "seed" and config["model"]["num_classes"] == 10
