"""Imbalanced classes: --class-weights balanced (loss weights from the training counts) and --sampler balanced (each
class drawn equally often), recorded in the run and on the card."""

import json

import pytest
import torch

from gmlp_vision.batches import BatchSource
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.model import GMLP
from gmlp_vision.step import train_step
from gmlp_vision.train import train
from synthetic import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)  # 90 / 9 / 1 images


def source(**balance) -> BatchSource:
    images = torch.zeros(len(LABELS), 3, 4, 4, dtype=torch.uint8)
    return BatchSource(images, LABELS, batch_size=10, **balance)


def test_balanced_class_weights_are_n_over_classes_times_count():
    weights = source(class_weights="balanced").class_weights
    assert weights.tolist() == pytest.approx([100 / (3 * 90), 100 / (3 * 9), 100 / 3])
    assert source().class_weights is None
    first = next(source(class_weights="balanced").batches(source().new_epoch(torch.Generator().manual_seed(0), 0)))
    assert first.weights().tolist() == pytest.approx((0.1 * weights[first.labels]).tolist())
    # Each class's images then weigh the same in all: 90 x 0.37 = 9 x 3.7 = 1 x 33.3.
    assert (torch.bincount(LABELS) * weights).tolist() == pytest.approx([100 / 3] * 3)


def test_the_balanced_sampler_draws_each_class_about_equally_and_from_the_order_stream():
    balanced = source(sampler="balanced")
    drawn = torch.cat([balanced.new_epoch(torch.Generator().manual_seed(s), 0).perm for s in range(30)])
    share = torch.bincount(LABELS[drawn], minlength=3).double() / len(drawn)
    assert share.tolist() == pytest.approx([1 / 3] * 3, abs=0.03)  # against 0.90 / 0.09 / 0.01 in the data
    again = balanced.new_epoch(torch.Generator().manual_seed(0), 0).perm
    assert torch.equal(again, balanced.new_epoch(torch.Generator().manual_seed(0), 0).perm)
    plain = source().new_epoch(torch.Generator().manual_seed(0), 0).perm
    assert sorted(plain.tolist()) == list(range(100))  # the default: each image once


def test_class_weights_change_the_gradient_as_sample_weights_do():
    ds = make_dataset(n_train=16, num_classes=4)
    cfg = from_preset("tiny", num_classes=4)
    results = []
    for weights in (None, torch.tensor([1.0, 0.0, 0.0, 0.0])[ds.train.labels] / 16):
        torch.manual_seed(0)
        model = GMLP(cfg.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        train_step(model, optimizer, ds.train.images, ds.train.labels, cfg, torch.Generator().manual_seed(0),
                   weights=weights)  # fmt: skip
        results.append(model.head.bias.detach().clone())
    assert not torch.allclose(results[0], results[1])


def test_a_run_records_its_balance_and_the_card_shows_it(tmp_path, capsys):
    ds = make_dataset(n_train=120, num_classes=3)
    keep = torch.cat([torch.nonzero(ds.train.labels == c).flatten()[:n] for c, n in ((0, 60), (1, 12), (2, 6))])
    imbalanced = type(ds)(
        ds.name, type(ds.train)(ds.train.images[keep], ds.train.labels[keep]), ds.test, ds.classes[:3]
    )
    cfg = from_preset("tiny", epochs=1, progress=False, threads=1, out=str(tmp_path / "run"), class_weights="balanced",
                      sampler="balanced", val_split=0.0)  # fmt: skip
    result = train(cfg, imbalanced)
    recorded = json.loads((result.run_dir / "results.json").read_text())
    counts = torch.bincount(imbalanced.train.labels).tolist()
    assert counts[0] > 4 * counts[2]  # imbalanced indeed
    assert recorded["class_weights"] == pytest.approx([sum(counts) / (3 * c) for c in counts])
    config = json.loads((result.run_dir / "config.json").read_text())
    assert (config["optim"]["class_weights"], config["data"]["sampler"]) == ("balanced", "balanced")
    assert main(["export", str(result.run_dir), "--format", "safetensors", "--out", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| class balance | class weights balanced, sampler balanced |" in card
