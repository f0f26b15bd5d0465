import csv
import json

import pytest
import torch

from gmlp_vision import train as train_mod
from gmlp_vision.batches import BatchSource
from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.config import from_preset
from gmlp_vision.data.base import channel_stats
from gmlp_vision.evaluate import evaluate
from gmlp_vision.loop import train_one_epoch
from gmlp_vision.model import GMLP
from gmlp_vision.state import TrainState
from gmlp_vision.step import EagerStep
from gmlp_vision.train import train
from synthetic import make_dataset

RUN_FILES = {"config.json", "history.csv", "history.jsonl", "best.pt", "last.pt", "results.json"}


def tiny(tmp_path, **kw):
    values = dict(epochs=3, progress=False, out=str(tmp_path / "run"), val_split=0.2, threads=2)
    values.update(kw)
    return from_preset("tiny", **values)


def test_training_learns_and_writes_the_run_directory(tmp_path):
    result = train(tiny(tmp_path, epochs=3), make_dataset())  # 256 train images, batch 32: 24 steps
    run = result.run_dir
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.test["acc"] > 0.5  # 4 classes: chance is 0.25
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"loss", "acc", "top5", "val_loss", "val_acc", "val_top5", "lr"}
    assert len((run / "history.jsonl").read_text().splitlines()) == 3
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["num_classes"] == 4 and cfg["preset"] == "tiny"
    assert json.loads((run / "results.json").read_text())["test"]["acc"] == result.test["acc"]


def test_one_batch_can_be_overfit():
    torch.manual_seed(0)
    ds = make_dataset(n_train=32, num_classes=4)
    cfg = from_preset(
        "tiny",
        dropout=0.0,
        head_dropout=0.0,
        drop_path=0.0,
        flip=False,
        zoom=0.0,
        lr=3e-3,
        num_classes=4,
        batch_size=32,
    )
    model = GMLP(cfg.model)
    model.set_normalization(*channel_stats(ds.train.images))
    source = BatchSource(ds.train.images, ds.train.labels, cfg.optim.batch_size)
    optimizer, steps = torch.optim.Adam(model.parameters(), lr=3e-3), source.steps_per_epoch
    state = TrainState(cfg, model, optimizer, torch.Generator().manual_seed(0), steps_per_epoch=steps)
    step = EagerStep(model, state.optimizer, cfg, state.generator)
    for _ in range(60):
        metrics = train_one_epoch(state, source, step, source.new_epoch(state.order, state.step))
    assert state.step == 60
    assert metrics["acc"] == 1.0
    assert metrics["loss"] < 0.05


def test_same_seed_same_weights_bit_exact(tmp_path):
    a = train(tiny(tmp_path, out=str(tmp_path / "a"), epochs=1), make_dataset())
    b = train(tiny(tmp_path, out=str(tmp_path / "b"), epochs=1), make_dataset())
    wa, wb = load_checkpoint(a.run_dir / "last.pt").model_state, load_checkpoint(b.run_dir / "last.pt").model_state
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(tiny(tmp_path, out=str(tmp_path / "c"), epochs=1, seed=1), make_dataset())
    wc = load_checkpoint(c.run_dir / "last.pt").model_state
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    ds = make_dataset()
    result = train(tiny(tmp_path, epochs=1), ds)
    ckpt = load_checkpoint(result.run_dir / "last.pt")
    model = ckpt.build_model()
    assert ckpt.classes == ds.classes and ckpt.epoch == 1 and ckpt.step == 8
    assert {"optimizer", "plateau", "early_stopping", "order_generator", "ranks"} <= set(ckpt.train_state)
    again = load_checkpoint(result.run_dir / "last.pt").build_model()
    x = ds.test.images[:16]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    metrics = evaluate(model, ds.test.images, ds.test.labels)
    assert metrics["acc"] == pytest.approx(result.test["acc"])  # last.pt holds the final (unrestored) weights


def scripted_validation(monkeypatch, losses):
    """Make every validation pass report the next scripted loss (the test split still gets real metrics)."""
    calls = iter(losses)

    def fake(model, images, labels, **kw):
        out = evaluate(model, images, labels, **kw)
        if len(labels) == 64:  # the validation split in these tests
            out["loss"] = next(calls)
        return out

    monkeypatch.setattr(train_mod, "evaluate", fake)


def test_early_stop_restores_best_and_plateau_halves_lr(monkeypatch, tmp_path):
    losses = [3.0, 2.0] + [2.5] * 12
    scripted_validation(monkeypatch, losses)
    cfg = tiny(tmp_path, epochs=30, plateau_patience=5, early_stop_patience=10, restore_best="on-stop")
    result = train(cfg, make_dataset())
    assert result.stopped_early and len(result.history) == 12  # epoch 2 best, then 10 without improvement
    assert result.best_epoch == 2 and result.final_checkpoint == "best.pt"
    lrs = [row["lr"] for row in result.history]
    assert lrs[:7] == [3e-3] * 7 and lrs[7:] == [1.5e-3] * 5  # halved after epoch 7, the 5th without improvement
    best = load_checkpoint(result.run_dir / "best.pt")
    assert best.epoch == 2


def test_all_epochs_run_keeps_last_weights_unless_always(monkeypatch, tmp_path):
    scripted_validation(monkeypatch, [1.0, 2.0, 3.0])
    result = train(tiny(tmp_path, epochs=3, restore_best="on-stop"), make_dataset())
    assert not result.stopped_early and result.final_checkpoint == "last.pt"
    scripted_validation(monkeypatch, [1.0, 2.0, 3.0])
    result = train(tiny(tmp_path, epochs=3, restore_best="always", out=str(tmp_path / "b")), make_dataset())
    assert result.final_checkpoint == "best.pt" and result.best_epoch == 1


def test_validation_split_is_the_last_images_and_stats_include_them(monkeypatch, tmp_path):
    ds = make_dataset(n_train=100)
    seen = {}

    def spy(model, images, labels, **kw):
        seen.setdefault("val", images.clone())
        return evaluate(model, images, labels, **kw)

    monkeypatch.setattr(train_mod, "evaluate", spy)
    result = train(tiny(tmp_path, epochs=1, val_split=0.1), ds)
    assert torch.equal(seen["val"], ds.train.images[90:])
    model = load_checkpoint(result.run_dir / "last.pt").build_model()
    mean, var = channel_stats(ds.train.images)
    torch.testing.assert_close(model.pixel_mean, mean)
    torch.testing.assert_close(model.pixel_std, var.sqrt())


def test_run_directory_is_never_overwritten(tmp_path):
    train(tiny(tmp_path, epochs=1), make_dataset())
    from gmlp_vision.errors import ConfigError

    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny(tmp_path, epochs=1), make_dataset())


def test_channel_stats_population_variance():
    x = torch.tensor([[[[0, 2]], [[10, 10]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    mean, var = channel_stats(x)
    torch.testing.assert_close(mean, torch.tensor([1.0, 10.0]))
    torch.testing.assert_close(var, torch.tensor([1.0, 0.0]))


def test_the_progress_bar_shows_the_running_loss_and_the_lr():
    import io

    from tqdm import tqdm

    from gmlp_vision.loop import _BarPostfix

    out = io.StringIO()
    bar = tqdm(total=3, file=out, mininterval=0, ascii=True)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.003)
    shown = _BarPostfix(bar)
    shown.step(torch.tensor([1.0, 3.0]), optimizer, synced=True)
    optimizer.param_groups[0]["lr"] = 0.0015
    shown.step(torch.tensor([5.0, 7.0]), optimizer, synced=False)  # read at the next sync, not now
    assert "loss=2.0000" in out.getvalue() and "lr=0.003" in out.getvalue()
    shown.step(torch.tensor([9.0]), optimizer, synced=True)
    bar.refresh()
    assert "loss=5.0000, lr=0.0015" in out.getvalue() and bar.n == 3
    assert _BarPostfix(tqdm(total=1, disable=True)).bar is None  # --no-progress: nothing is added up
