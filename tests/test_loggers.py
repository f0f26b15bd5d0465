"""Loggers people already use: MLflow (a real sqlite tracking store in a temporary folder, read back), Weights & Biases
(its offline mode, the run file read back), and TensorBoard's hyper-parameters and test metrics."""

import json
import struct
import sys

import pytest

from gmlp_vision.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
DIGITS = ["train", "--dataset", "digits", "--preset", "tiny", "--image-size", "8", "--patch-size", "4", "--threads",
          "1", "--no-progress", "--ema", "0.9"]  # fmt: skip


def test_mlflow_gets_the_params_every_epoch_and_the_test_metrics_and_a_resume_continues_its_run(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    store, run = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    assert main([*DIGITS, "--epochs", "2", "--mlflow", store, "--out", str(run)]) == 0
    capsys.readouterr()
    ids = json.loads((run / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=store)
    logged = client.get_run(ids["mlflow"])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert logged.data.params["epochs"] == "2" and logged.data.params["dataset"] == "digits"
    assert logged.data.params["lr"] == repr(json.loads((run / "config.json").read_text())["optim"]["lr"])
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    val = client.get_metric_history(ids["mlflow"], "val_loss")
    assert [(m.step, m.value) for m in val] == [(r["epoch"], pytest.approx(r["val_loss"])) for r in history]
    results = json.loads((run / "results.json").read_text())
    assert logged.data.metrics["test_acc"] == pytest.approx(results["test"]["acc"])
    assert logged.data.metrics["test_ema_acc"] == pytest.approx(results["test_ema"]["acc"])
    assert logged.data.tags["gmlp_vision.shipped"] == results["final_checkpoint"]
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0  # the same MLflow run goes on
    assert json.loads((run / "trackers.json").read_text())["mlflow"] == ids["mlflow"]
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "val_loss")] == [1, 2, 3]
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "run"]  # nothing else written anywhere


def wandb_records(path):
    """The records of a W&B run file (``run-ID.wandb``): LevelDB's log format (32 KiB blocks of checksummed
    chunks) after W&B's 7-byte header, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, records, chunks, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if (pos % 32768) + 7 > 32768:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def items(update):
    """A W&B record's items as a dict (newer versions name an item by ``nested_key``, older ones by ``key``)."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in update}


def test_wandb_offline_holds_the_config_every_epoch_and_the_test_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main([*DIGITS, "--epochs", "2", "--wandb", "gmlp-tests", "--out", str(run)]) == 0
    capsys.readouterr()
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    files = list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    records = wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    started = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert started.project == "gmlp-tests" and started.display_name == "run"
    config = items(started.config.update)
    assert config["epochs"] == 2 and config["dataset"] == "digits"
    logged = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    steps = [items(h.item) for h in logged]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h.step.num for h in logged] == [1, 2]
    assert [float(s["val_loss"]) for s in steps] == pytest.approx([r["val_loss"] for r in history])
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    results = json.loads((run / "results.json").read_text())
    assert (
        summary["test_acc"] == pytest.approx(results["test"]["acc"])
        and summary["shipped"] == results["final_checkpoint"]
    )
    assert "exit" in kinds  # finished


def test_tensorboard_gets_the_hyper_parameters_and_the_test_metrics(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main([*DIGITS, "--epochs", "1", "--tensorboard", "--out", str(run)]) == 0
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    results = json.loads((run / "results.json").read_text())
    assert events.Scalars("test/acc")[0].value == pytest.approx(results["test"]["acc"])
    assert "loss/val" in events.Tags()["scalars"]
    assert "_hparams_/session_start_info" in events.summary_metadata


@pytest.mark.parametrize(
    ("flags", "module", "message"),
    [
        (["--mlflow", "sqlite:///x.db"], "mlflow", "--mlflow needs MLflow: pip install 'gmlp-vision[mlflow]'"),
        (["--wandb", "proj"], "wandb", "--wandb needs Weights & Biases: pip install 'gmlp-vision[wandb]'"),
    ],
)
def test_a_missing_extra_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, flags, module, message):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package raises: ImportError
    assert main([*DIGITS, "--epochs", "1", *flags, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"gmlp: error: {message}"
    assert not (tmp_path / "run").exists()


def test_wandb_online_without_a_login_is_refused_at_once(tmp_path, monkeypatch, capsys):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert main([*DIGITS, "--epochs", "1", "--wandb", "proj", "--out", str(tmp_path / "run")]) == 2
    assert "no W&B login; run `wandb login`" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mlflow", "mlruns"], "--mlflow takes a tracking URI"),
        (["--wandb", "team/proj"], "--wandb takes a W&B project"),
    ],
)
def test_impossible_tracker_values_are_usage_errors(tmp_path, capsys, flags, message):
    assert main([*DIGITS, *flags, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
