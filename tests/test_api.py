"""The Python API as people expect it from Keras: train() prints the run's lines (verbose=1), a run without out gets
a fresh folder each time, Keras-named callbacks, and an in-memory dataset recorded truthfully."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gmlp_vision.callbacks import Callback
from gmlp_vision.config import from_preset
from gmlp_vision.data import Dataset, Split
from gmlp_vision.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = textwrap.dedent(
    """
    import sys
    from gmlp_vision import from_preset
    from gmlp_vision.train import train

    cfg = from_preset("digits", dataset="digits", epochs=1, threads=1)
    for verbose in (1, 1, 0):  # twice as a notebook cell run twice, then quietly
        result = train(cfg, verbose=verbose)
        print("RUN", result.run_dir, file=sys.stderr)
    """
)


def test_train_prints_the_cli_lines_and_gets_a_fresh_folder_each_time(tmp_path):
    """A plain script (no logging set up): the lines appear with verbose=1 only, and out=None never collides."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    runs = [line.split(" ", 1)[1] for line in done.stderr.splitlines() if line.startswith("RUN ")]
    assert len(set(runs)) == 3 and all(r.startswith("runs/digits-digits-") for r in runs)
    assert all((tmp_path / r / "results.json").is_file() for r in runs)
    out = done.stdout
    assert out.count("Epoch 1/1 - ") == 2 and out.count("Test accuracy: ") == 2  # the third run was quiet
    assert out.count("training digits on digits: ") == 2 and f"run directory: {runs[1]}" in out


class Keras(Callback):
    """Written as for Keras: the hooks take an epoch index and logs."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, logs=None):
        self.seen.append(("begin", self.run.cfg.optim.epochs))

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append((epoch, sorted(k for k in logs if k.startswith("val_"))))

    def on_train_end(self, logs=None):
        self.seen.append(("end", logs["test"]["acc"] >= 0, logs["final_checkpoint"]))


def test_an_in_memory_dataset_trains_and_is_recorded_as_such(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.arange(48) % 3
    mine = Dataset("mine", Split(images[:36], labels[:36]), Split(images[36:], labels[36:]), ("a", "b", "c"))
    cfg = from_preset("tiny", image_size=8, patch_size=4, epochs=2, progress=False, out=str(tmp_path / "run"))
    callback = Keras()
    result = train(cfg, mine, callbacks=[callback], verbose=0)
    assert callback.seen == [("begin", 2), (0, ["val_acc", "val_loss", "val_top5"]),
                             (1, ["val_acc", "val_loss", "val_top5"]), ("end", True, "last.pt")]  # fmt: skip
    results = json.loads((result.run_dir / "results.json").read_text())
    assert results["command"] is None  # no command could rebuild these tensors
    assert results["data"] == "a Dataset passed to train() in memory ('mine')"
    assert results["images"] == {"train": 32, "validation": 4, "test": 12}


def test_evaluate_of_a_run_on_in_memory_data_asks_for_the_data(tmp_path, capsys):
    from gmlp_vision.cli import main

    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.arange(40) % 10  # as many classes as CIFAR-10: the config's kind would load and fit
    mine = Dataset("mine", Split(images[:30], labels[:30]), Split(images[30:], labels[30:]), tuple("abcdefghij"))
    cfg = from_preset("tiny", image_size=8, patch_size=4, epochs=1, progress=False, out=str(tmp_path / "run"))
    train(cfg, mine, verbose=0)
    assert main(["evaluate", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "the run trained on a Dataset passed to train() in memory ('mine'): pass --dataset and --data" in err
