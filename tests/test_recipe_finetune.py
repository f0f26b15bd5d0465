"""The finetune recipe chosen with --init, and layer-wise lr decay: its groups, its lr, its log line, its resume."""

import logging

import pytest
import torch

from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.cli import main
from gmlp_vision.config import ModelConfig, from_preset, resolve_config
from gmlp_vision.errors import ConfigError
from gmlp_vision.model import GMLP
from gmlp_vision.optim import LrSchedule, build_optimizer, layer_groups
from gmlp_vision.rundir import resume_config
from gmlp_vision.train import train
from synthetic import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_init_chooses_the_finetune_recipe_for_what_is_left_unset():
    plain = resolve_config({"dataset": "digits"})
    tuned = resolve_config({"dataset": "digits", "init": "weights.pt"})
    assert plain.optim.recipe == "auto" and tuned.optim.recipe == "finetune" and plain.optim.layer_decay == 1.0
    o, p = tuned.optim, plain.optim
    assert (o.lr, o.schedule, o.warmup_epochs, o.layer_decay) == (p.lr, "cosine", 1.0, 0.75)
    assert o.epochs == min(p.epochs, 30) and o.plateau_patience == 0  # a schedule sets the lr itself
    mine = resolve_config({"dataset": "digits", "init": "weights.pt", "lr": 0.5, "layer_decay": 0.9})
    assert (mine.optim.lr, mine.optim.layer_decay, mine.optim.schedule) == (0.5, 0.9, "cosine")  # flags win
    scratch = resolve_config({"dataset": "digits", "init": "weights.pt", "recipe": "scratch"})
    assert scratch.optim == plain.optim.__class__(**{**plain.optim.__dict__, "recipe": "scratch"})
    everything = {**tuned.to_flat(), "preset": None}  # a run's own config.json: every value set, none applied
    assert resolve_config({k: v for k, v in everything.items() if v is not None}).optim == tuned.optim
    asked = resolve_config({"dataset": "digits", "recipe": "finetune"})
    assert asked.optim.layer_decay == 0.75 and asked.optim.lr == p.lr and asked.optim.schedule == "cosine"
    with pytest.raises(ConfigError, match=r"--layer-decay must be in \(0, 1\] \(1: off\), got 1.5"):
        from_preset("tiny", layer_decay=1.5)


def test_layer_groups_scale_the_lr_from_the_head_down():
    model = GMLP(ModelConfig(image_size=16, patch_size=4, embed_dim=8, ffn_dim=16, depth=3, num_classes=2))
    groups = layer_groups(model, 0.5)
    assert [g["lr_scale"] for g in groups] == [0.5**4, 0.5**3, 0.5**2, 0.5, 1.0]  # stem, blocks 0-2, head
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert groups[0]["params"] == list(model.patch_embed.parameters())
    assert groups[-1]["params"] == [*model.norm.parameters(), *model.head.parameters()]
    split = layer_groups(model, 0.5, decay_vectors=False)
    assert len(split) == 10 and all(g.get("weight_decay") == 0.0 for g in split if g["params"][0].ndim == 1)
    cfg = from_preset("tiny", layer_decay=0.5, schedule="cosine", plateau_patience=0, lr=1e-3)
    optimizer = build_optimizer(cfg.optim, model)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3 * g["lr_scale"] for g in optimizer.param_groups]
    schedule = LrSchedule.from_config(cfg.optim, 10)
    schedule.apply(optimizer, 7)
    expected = schedule.lr_at(7)
    assert [g["lr"] for g in optimizer.param_groups] == [expected * g["lr_scale"] for g in optimizer.param_groups]
    assert schedule.reported(optimizer, 7) == expected


def test_a_fine_tuning_run_says_its_recipe_and_resumes_exactly(tmp_path, caplog):
    first = train(from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "pre")), make_dataset())
    init = str(first.run_dir / "last.pt")

    def cfg(name, **kw):
        values = dict(epochs=2, progress=False, out=str(tmp_path / name), val_split=0.2, ema=0.9)
        return resolve_config({**values, **kw, "init": init}, preset="tiny")

    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        straight = train(cfg("straight"), make_dataset())
    assert "recipe finetune (--init): --lr 0.003, --schedule cosine with --warmup-epochs 1, " in caplog.text
    assert "--layer-decay 0.75, --epochs 2" in caplog.text
    train(cfg("cut", epochs=1), make_dataset())
    resumed = train(resume_config(tmp_path / "cut", {"epochs": 2}), make_dataset(), resume=True)
    a, b = (load_checkpoint(r.run_dir / "last.pt") for r in (straight, resumed))
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    groups = a.train_state["optimizer"]["param_groups"]
    assert len(groups) == 2 + 2 and groups[-1]["lr_scale"] == 1.0  # stem, 2 blocks, head; saved and resumed


def test_the_command_line_logs_the_recipe(tmp_path, capsys):
    argv = ["train", "--preset", "digits", "--dataset", "digits", "--epochs", "1", "--threads", "1", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "pre")]) == 0
    capsys.readouterr()
    assert main([*argv, "--init", str(tmp_path / "pre" / "last.pt"), "--out", str(tmp_path / "ft")]) == 0
    out = capsys.readouterr().out
    assert "initialised from" in out and "recipe finetune (--init): --lr 0.003" in out
