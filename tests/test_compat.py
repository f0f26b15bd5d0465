"""Files written by gmlp-vision 0.1.0 (tests/fixtures/v0_1_0) keep working: evaluate, predict, export, init, resume."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "v0_1_0" / "run"


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def test_the_fixture_is_an_unfinished_run():
    last = load_checkpoint(FIXTURE / "last.pt")
    assert last.epoch == 1 and last.step == 21 and last.train_state["epoch_progress"]["batch"] == 4
    assert load_checkpoint(FIXTURE / "best.pt").epoch == 1


def test_evaluate_predict_and_export_read_it(old_run, tmp_path, capsys):
    assert main(["evaluate", str(old_run / "best.pt"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 355 and 0.0 <= metrics["acc"] <= 1.0
    Image.new("L", (8, 8), 200).save(tmp_path / "x.png")
    assert main(["predict", str(old_run), str(tmp_path / "x.png"), "--json", "--top-k", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["top_k"]) == 3
    pytest.importorskip("onnxruntime")
    assert main(["export", str(old_run / "best.pt"), "--check", "--out", str(tmp_path / "m.onnx")]) == 0


def test_init_from_its_checkpoint(old_run, tmp_path):
    model = ["--image-size", "8", "--patch-size", "4", "--embed-dim", "16", "--ffn-dim", "32", "--depth", "2"]
    init = ["--init", str(old_run / "best.pt"), "--out", str(tmp_path / "new")]
    argv = ["train", "--preset", "tiny", "--dataset", "digits", *model, "--train-limit", "100", "--epochs", "1",
            "--threads", "1", "--no-progress", *init]  # fmt: skip
    assert main(argv) == 0


def test_resume_finishes_it(old_run):
    first = (old_run / "history.jsonl").read_text().splitlines()[0]
    assert main(["train", "--resume", str(old_run), "--threads", "1"]) == 0
    rows = (old_run / "history.jsonl").read_text().splitlines()
    assert len(rows) == 3 and rows[0] == first
    assert load_checkpoint(old_run / "last.pt").step == 51
