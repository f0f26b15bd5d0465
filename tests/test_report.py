"""Tests for gmlp_vision.report and `gmlp report`: every plot is a valid, sensibly sized PNG; tables; errors."""

import csv
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from gmlp_vision.checkpoint import load_model
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.errors import ReportError
from gmlp_vision.model import GMLP
from gmlp_vision.report import TensorBoardLogger, plot_history, write_report
from gmlp_vision.report_eval import evaluation_report
from gmlp_vision.train import train
from synthetic import make_dataset

HISTORY_PLOTS = ("loss.png", "accuracy.png", "lr.png")
EVAL_FILES = ("confusion.png", "confused_pairs.csv", "per_class_accuracy.png", "per_class.csv", "misclassified.png")


pytestmark = pytest.mark.usefixtures("one_thread")


def check_png(path: Path, min_width: int = 400, min_height: int = 250) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= min_height, image.size
        assert image.width <= 2500 and image.height <= 4000, image.size
        return image.size


def test_write_report_after_a_run(tmp_path):
    data = make_dataset()
    result = train(from_preset("tiny", epochs=2, progress=False, out=str(tmp_path / "run")), data)
    model, _ = load_model(result.run_dir / result.final_checkpoint)
    model.train()
    written = write_report(result.run_dir, model, data.test.images, data.test.labels, data.classes)
    plots = result.run_dir / "plots"
    assert sorted(p.name for p in written) == sorted(HISTORY_PLOTS + EVAL_FILES)
    for name in HISTORY_PLOTS + ("confusion.png", "per_class_accuracy.png", "misclassified.png"):
        check_png(plots / name, min_height=200)
    per_class = list(csv.DictReader(open(plots / "per_class.csv")))
    assert [r["class"] for r in per_class] == list(data.classes)
    assert sum(int(r["images"]) for r in per_class) == len(data.test.labels)
    pairs = list(csv.DictReader(open(plots / "confused_pairs.csv")))
    assert all(r["true"] != r["predicted"] for r in pairs)
    counts = [int(r["count"]) for r in pairs]
    assert counts == sorted(counts, reverse=True)
    assert model.training  # the caller's mode is restored


def test_hundred_classes_stay_readable(tmp_path):
    cfg = from_preset("tiny").model
    model = GMLP(replace(cfg, num_classes=100))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (600, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(100).repeat(6)
    classes = [f"class_with_a_long_name_{i}" for i in range(100)]
    evaluation_report(tmp_path, model, images, labels, classes, split="val")
    width, height = check_png(tmp_path / "plots" / "confusion.png", min_width=1000, min_height=700)
    assert width <= 1600 and height <= 1600  # the matrix, and the pairs' table under it
    _, height = check_png(tmp_path / "plots" / "per_class_accuracy.png")
    assert height >= 100 * 12  # at least 12 px per class row
    check_png(tmp_path / "plots" / "misclassified.png", min_width=300, min_height=300)


def test_history_edge_cases(tmp_path):
    header = "epoch,loss,acc,top5,val_loss,val_acc,val_top5,lr,seconds\n"
    (tmp_path / "history.csv").write_text(header + "1,2.0,0.3,0.8,,,,0.003,1.5\n")
    for path in plot_history(tmp_path):  # one epoch, no validation columns
        check_png(path)
    with pytest.raises(ReportError, match="not found"):
        plot_history(tmp_path / "nowhere")
    (tmp_path / "history.csv").write_text("epoch,loss\n")
    with pytest.raises(ReportError, match="holds no epochs"):
        plot_history(tmp_path)
    with pytest.raises(ReportError, match="labels"):
        evaluation_report(tmp_path, GMLP(from_preset("tiny").model), torch.zeros(0, 3, 32, 32), torch.zeros(0), [])


def test_cli_report_end_to_end(tmp_path, cifar10_archive, capsys):
    run = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--dataset", "cifar10", "--data", str(cifar10_archive), "--epochs", "2",
            "--val-split", "0.2", "--out", str(run), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    # Training writes the whole report itself; `gmlp report` rebuilds it.
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(HISTORY_PLOTS + EVAL_FILES)
    for p in (run / "plots").iterdir():
        p.unlink()
    assert main(["report", str(run), "--no-evaluate"]) == 0
    assert capsys.readouterr().out.count("wrote ") == len(HISTORY_PLOTS)
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(HISTORY_PLOTS)
    assert main(["report", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == len(HISTORY_PLOTS + EVAL_FILES)
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(HISTORY_PLOTS + EVAL_FILES)
    for name in ("confusion.png", "misclassified.png"):
        check_png(run / "plots" / name, min_height=200)


def test_cli_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "history.csv not found" in err and "Traceback" not in err


def test_tensorboard_logger(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when tensorboard is not installed
    with pytest.raises(ReportError, match=r"--tensorboard needs tensorboard: pip install 'gmlp-vision\[tensorboard\]'"):
        TensorBoardLogger(tmp_path)
    monkeypatch.undo()
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    with TensorBoardLogger(tmp_path) as logger:
        logger.log_epoch({"epoch": 1, "loss": 2.0, "val_loss": 1.9, "acc": 0.3, "lr": 0.003, "seconds": 1.0})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_train_logs_to_tensorboard_and_plots_when_asked(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from gmlp_vision.reporting import default_callbacks

    cfg = from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run"), tensorboard=True, threads=1)
    result = train(cfg, make_dataset(n_train=64, n_test=16), callbacks=default_callbacks(cfg))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in result.plots) == sorted(HISTORY_PLOTS + EVAL_FILES)
    assert all(p.parent == tmp_path / "run" / "plots" and p.is_file() for p in result.plots)
    # Without callbacks the loop writes the run's own files and no plot or event file.
    bare = train(cfg.replace(out=str(tmp_path / "bare")), make_dataset(n_train=64, n_test=16))
    assert bare.plots == [] and not (tmp_path / "bare" / "plots").exists()
    assert not (tmp_path / "bare" / "tensorboard").exists() and (tmp_path / "bare" / "results.json").is_file()


def test_tensorboard_without_its_extra_stops_before_the_data_or_the_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when tensorboard is not installed
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--dataset", "cifar10", "--data", str(tmp_path / "nowhere"), "--no-download"]
    assert main([*argv, "--tensorboard", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--tensorboard needs tensorboard" in err and "nowhere" not in err  # the data was never looked for
    assert not out.exists()


@pytest.mark.parametrize("k", [3, 10, 60])
def test_the_confusion_png_has_no_empty_third(tmp_path, k):
    """The pairs' table sits under the matrix, as tall as its lines: no wide blank strip right or below."""
    import numpy as np
    from PIL import Image

    from gmlp_vision.report_eval import plot_confusion

    rng = np.random.default_rng(0)
    cm = np.diag(rng.integers(20, 40, k)) + rng.integers(0, 3, (k, k)) * (rng.random((k, k)) < 0.2)
    png = np.asarray(Image.open(plot_confusion(cm, [f"class {i}" for i in range(k)], tmp_path / "c.png")).convert("L"))
    inked_cols, inked_rows = np.flatnonzero((png < 250).any(axis=0)), np.flatnonzero((png < 250).any(axis=1))
    assert png.shape[1] - 1 - inked_cols.max() < 0.06 * png.shape[1]  # right margin
    assert png.shape[0] - 1 - inked_rows.max() < 0.06 * png.shape[0]  # bottom margin
    blank_cols = ~(png < 250).any(axis=0)
    longest = max(
        (len(run) for run in np.split(blank_cols, np.flatnonzero(np.diff(blank_cols)) + 1) if run[0]), default=0
    )
    assert longest < 0.1 * png.shape[1]  # no blank band between the matrix and anything beside it


@pytest.mark.parametrize(
    ("top5", "drawn"), [(True, {"acc", "val_acc", "top5", "val_top5"}), (False, {"acc", "val_acc"})]
)
def test_top5_curves_only_where_they_say_something(tmp_path, monkeypatch, top5, drawn):
    import gmlp_vision.report as report

    header = "epoch,loss,acc,top5,val_loss,val_acc,val_top5,lr,seconds\n"
    (tmp_path / "history.csv").write_text(header + "1,2.0,0.3,0.8,1.9,0.35,0.85,0.003,1.5\n")
    seen = []
    real = report._curves
    monkeypatch.setattr(
        report, "_curves", lambda ax, rows, series, scale: seen.append(series) or real(ax, rows, series, scale)
    )
    report.plot_history(tmp_path, top5=top5)
    assert {key for key, *_ in seen[1]} == drawn  # the accuracy plot
