"""The training seams: the batch source, the steppers, the precision object, the metrics row, and the callbacks."""

import logging

import pytest
import torch

from gmlp_vision.batches import CROP_KEY_STRIDE, BatchSource
from gmlp_vision.callbacks import Callback
from gmlp_vision.config import from_preset
from gmlp_vision.data.stream import ImageFiles
from gmlp_vision.errors import ConfigError
from gmlp_vision.loop import train_one_epoch
from gmlp_vision.metrics import EMA_FIELDS, HISTORY_FIELDS, epoch_row, format_epoch
from gmlp_vision.model import GMLP
from gmlp_vision.optim import build_optimizer
from gmlp_vision.precision import PRECISIONS, Precision, precision_named
from gmlp_vision.predict import Classifier
from gmlp_vision.runtime import Dist
from gmlp_vision.state import TrainState
from gmlp_vision.step import EagerStep
from gmlp_vision.train import train
from synthetic import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def source_of(n, batch_size, **kw):
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 2, 2)
    return BatchSource(images, torch.arange(n), batch_size, **kw)


def test_a_batch_source_cuts_one_permutation_into_batches_and_gathers_them():
    source = source_of(10, 4)
    assert len(source) == 10 and source.steps_per_epoch == 3 and not source.streamed
    progress = source.new_epoch(torch.Generator().manual_seed(0), step=7)
    assert sorted(progress.perm.tolist()) == list(range(10)) and progress.step == 7 and progress.batch == 0
    again = source.new_epoch(torch.Generator().manual_seed(0), step=7)
    assert torch.equal(progress.perm, again.perm)  # the order generator alone decides it
    batches = list(source.batches(progress))
    assert [b.number for b in batches] == [0, 1, 2] and [len(b.index) for b in batches] == [4, 4, 2]
    for b in batches:  # the pixels are the images at the indices, the labels theirs
        assert torch.equal(b.images[:, 0, 0, 0].long(), b.index) and torch.equal(b.labels, b.index)
        assert b.weight == 1 / len(b.index) and torch.equal(b.weights(), torch.full((len(b.index),), b.weight))
    assert torch.equal(torch.cat([b.index for b in batches]), progress.perm)
    progress.batch = 2  # a resumed epoch goes on from its next batch
    rest = list(source.batches(progress, gather=False))
    assert [b.number for b in rest] == [2] and rest[0].images is None and torch.equal(rest[0].index, batches[2].index)


def test_each_process_trains_its_share_and_an_empty_share_takes_a_weightless_stand_in():
    shares = {}
    for rank in (0, 1, 2):
        source = source_of(7, 4, ctx=Dist(rank=rank, world=3))
        progress = source.new_epoch(torch.Generator().manual_seed(1), step=0)
        shares[rank] = [(b.index.tolist(), b.weight) for b in source.batches(progress, gather=False)]
    perm = source.new_epoch(torch.Generator().manual_seed(1), step=0).perm.tolist()
    # Global batches of 4 and 3: shares of 2/1/1, then 1/1/1; every weight is world / global batch.
    assert [s for r in (0, 1, 2) for s, _ in shares[r][:1]] == [perm[0:2], perm[2:3], perm[3:4]]
    assert all(w == 3 / 4 for r in (0, 1, 2) for _, w in shares[r][:1])
    assert [shares[r][1] for r in (0, 1, 2)] == [([perm[4]], 1.0), ([perm[5]], 1.0), ([perm[6]], 1.0)]
    two = {r: source_of(5, 4, ctx=Dist(rank=r, world=4)) for r in (0, 3)}
    last = {r: list(s.batches(s.new_epoch(torch.Generator().manual_seed(2), step=0)))[-1] for r, s in two.items()}
    assert last[0].weight == 4.0 and last[3].weight == 0.0 and len(last[3].index) == 1  # a last batch of 1 image


def test_streamed_crops_are_keyed_to_the_seed_the_step_and_the_image(monkeypatch, tmp_path):
    seen = []

    def batches(self, index_batches, keys=None):
        seen.append((index_batches, keys))
        for b in index_batches:
            yield torch.zeros(len(b), 3, 4, 4, dtype=torch.uint8), torch.ones(len(b), dtype=torch.bool)

    monkeypatch.setattr(ImageFiles, "batches", batches)
    files = ImageFiles([str(tmp_path / f"{i}.png") for i in range(5)], 4)
    source = BatchSource(files, torch.arange(5), 2, crop_seed=3)
    assert source.streamed and source.crops
    progress = source.new_epoch(torch.Generator().manual_seed(0), step=10)
    out = list(source.batches(progress))
    (index_batches, keys) = seen[0]
    assert index_batches == [b.index.tolist() for b in out]
    assert keys == [[(3 * CROP_KEY_STRIDE + 10 + n) << 32 | i for i in b] for n, b in enumerate(index_batches)]
    assert all(b.cropped and b.readable is not None for b in out)
    whole = BatchSource(files, torch.arange(5), 2)  # no crop seed: whole images, no keys
    list(whole.batches(whole.new_epoch(torch.Generator(), step=0)))
    assert seen[1][1] is None and not whole.crops


def test_the_state_and_the_source_agree_on_the_steps_of_an_epoch():
    cfg = from_preset("tiny", num_classes=4, schedule="onecycle", plateau_patience=0, epochs=2)
    model = GMLP(cfg.model)
    source = source_of(10, cfg.optim.batch_size)
    with pytest.raises(ValueError, match="steps_per_epoch must be at least 1, got 0"):
        TrainState(cfg, model, build_optimizer(cfg.optim, model), torch.Generator(), steps_per_epoch=0)
    state = TrainState(cfg, model, build_optimizer(cfg.optim, model), torch.Generator(), steps_per_epoch=5)
    stepper = EagerStep(model, state.optimizer, cfg, state.generator)
    with pytest.raises(ValueError, match="the state expects 5 steps per epoch, the source has 1"):
        train_one_epoch(state, source, stepper, source.new_epoch(state.order, 0))


def test_a_classifier_refuses_an_unknown_precision():
    model = GMLP(from_preset("tiny", num_classes=2).model)
    with pytest.raises(ConfigError, match="--precision must be one of fp32, bf16, fp16, got 'float32'"):
        Classifier(model, ["a", "b"], precision="float32")


def test_the_precision_object_holds_every_decision():
    x = torch.rand(2, 3, 4, 4)
    assert [PRECISIONS[n].cast(x).dtype for n in ("fp32", "bf16", "fp16")] == [
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ]
    assert [PRECISIONS[n].needs_scaler for n in ("fp32", "bf16", "fp16")] == [False, False, True]
    assert PRECISIONS["bf16"].not_capturable is None and "fp16" in PRECISIONS["fp16"].not_capturable
    assert precision_named("bf16") is PRECISIONS["bf16"] and precision_named(PRECISIONS["fp16"]) is PRECISIONS["fp16"]
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        precision_named("fp8")
    assert isinstance(PRECISIONS["fp16"].scaler(torch.device("cpu")), torch.amp.GradScaler)
    assert Precision("fp32", torch.float32).scaler(torch.device("cpu")) is None


def test_the_history_row_has_one_layout():
    metrics = {"loss": 1.0, "acc": 0.5, "top5": 0.9}
    row = epoch_row(3, metrics, metrics, metrics, lr=0.1, seconds=2.0)
    assert tuple(row) == HISTORY_FIELDS[:-2] + EMA_FIELDS + HISTORY_FIELDS[-2:]
    assert tuple(epoch_row(1, metrics, lr=0.1, seconds=2.0)) == ("epoch", "loss", "acc", "top5", "lr", "seconds")
    line = format_epoch(row, 10, top5=False)
    assert line.startswith("Epoch 3/10 - 2s - loss: 1.0000 - acc: 0.5000 - val_loss") and "top5" not in line


class Recorder(Callback):
    def __init__(self, events):
        self.events = events

    def on_train_begin(self, logs=None):
        run = self.run
        self.events.append(("start", run.run_dir.is_dir(), run.main, run.averaged is not None, logs))

    def on_epoch_end(self, epoch, logs=None):
        run = self.run
        assert (run.run_dir / "last.pt").is_file() and (run.run_dir / "history.csv").is_file()
        assert epoch == logs["epoch"] - 1  # Keras' 0-based epoch index; the row counts from 1
        self.events.append(("epoch", logs["epoch"], round(logs["loss"], 6)))

    def on_train_end(self, logs=None):
        run = self.run
        self.events.append(("finish", sorted(logs), (run.run_dir / "results.json").is_file()))
        path = run.run_dir / "note.txt"
        path.write_text("written by a callback")
        self.files = [path]


class FailAtEpoch(Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise ConfigError("stop here")


def test_callbacks_see_the_run_start_each_epoch_and_the_finish(tmp_path, caplog):
    cfg = from_preset("tiny", epochs=2, progress=False, out=str(tmp_path / "run"), val_split=0.2, ema=0.9)
    events = []
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        result = train(cfg, make_dataset(n_train=64, n_test=16), callbacks=[Recorder(events)])
    losses = [round(r["loss"], 6) for r in result.history]
    assert events[:3] == [("start", True, True, True, {}), ("epoch", 1, losses[0]), ("epoch", 2, losses[1])]
    assert events[3][0] == "finish" and "test" in events[3][1] and events[3][2]
    assert result.plots == [tmp_path / "run" / "note.txt"]  # what the callbacks wrote
    with pytest.raises(ConfigError, match="stop here"):  # a hook's error ends the run as training's would
        train(cfg.replace(out=str(tmp_path / "failed")), make_dataset(n_train=64, n_test=16), callbacks=[FailAtEpoch()])
    assert (tmp_path / "failed" / "last.pt").is_file() and not (tmp_path / "failed" / "results.json").exists()
