"""Modern recipe options: lr schedules, label smoothing, gradient clipping, no decay on norms and biases."""

import math

import pytest
import torch

import gmlp_vision.augment as augment_mod
from gmlp_vision.augment import mix_batch
from gmlp_vision.config import from_preset
from gmlp_vision.errors import ConfigError
from gmlp_vision.model import GMLP
from gmlp_vision.optim import build_optimizer, scheduled_lr
from gmlp_vision.step import train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cosine_schedule_warms_up_linearly_then_decays_to_min_lr():
    lrs = [scheduled_lr(t, 100, lr=1.0, schedule="cosine", warmup=10, min_lr=0.01) for t in range(100)]
    assert lrs[:10] == pytest.approx([(t + 1) / 10 for t in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[55] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_onecycle_rises_from_a_25th_to_the_peak_then_falls():
    lrs = [scheduled_lr(t, 50, lr=2.0, schedule="onecycle", warmup=10) for t in range(50)]
    assert lrs[0] == pytest.approx(2.0 / 25) and max(lrs) == pytest.approx(2.0) and lrs.index(max(lrs)) == 10
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(7, 50, lr=2.0, schedule="constant", warmup=0) == 2.0


def test_a_schedule_and_plateau_halving_cannot_both_set_the_lr():
    with pytest.raises(ConfigError, match="--plateau-patience 0"):
        from_preset("tiny", schedule="cosine", plateau_patience=3)
    with pytest.raises(ConfigError, match="label-smoothing"):
        from_preset("tiny", label_smoothing=1.0)


def test_no_decay_on_norms_and_biases():
    cfg = from_preset("tiny", num_classes=10, decay_norms_biases=False, optimizer="adamw", weight_decay=0.05)
    model = GMLP(cfg.model)
    decayed, plain = build_optimizer(cfg.optim, model).param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decayed["params"]) and {names[id(p)] for p in plain["params"]} >= {
        "head.bias", "norm.weight", "blocks.0.sgu.proj.bias"}  # fmt: skip
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def step_once(**values):
    torch.manual_seed(0)
    cfg = from_preset("tiny", num_classes=10, flip=False, zoom=0.0, dropout=0.0, head_dropout=0.0, drop_path=0.0,
                      **values)  # fmt: skip
    model = GMLP(cfg.model)
    optimizer = build_optimizer(cfg.optim, model)
    seen = {}
    real_step = optimizer.step

    def record(*args, **kw):
        seen["norm"] = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        return real_step(*args, **kw)

    optimizer.step = record
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    losses, logits = train_step(model, optimizer, images, labels, cfg, torch.Generator().manual_seed(0))
    return losses, logits, seen["norm"]


def test_gradient_clipping_bounds_the_global_norm():
    _, _, free = step_once()
    _, _, clipped = step_once(clip_grad=0.01)
    assert free > 0.02 and clipped == pytest.approx(0.01, rel=1e-4)


def test_label_smoothing_is_the_smoothed_cross_entropy():
    losses, logits, _ = step_once(label_smoothing=0.1)
    labels = torch.arange(16) % 10
    logp = logits.log_softmax(1)
    expected = -(0.9 * logp.gather(1, labels[:, None])[:, 0] + 0.1 * logp.mean(1))
    assert torch.allclose(losses, expected, atol=1e-5)


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_keep_label_mass_one_and_lam_is_the_kept_share(mixup, cutmix):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.arange(6 * 3 * 16 * 16, dtype=torch.float32).reshape(6, 3, 16, 16)  # every pixel distinct
    for _ in range(10):
        mixed, partner, lam = mix_batch(images, mixup, cutmix, generator)
        assert 0.0 <= lam <= 1.0 and torch.equal(partner, torch.arange(5, -1, -1))
        target = lam * torch.eye(10)[torch.arange(6)] + (1 - lam) * torch.eye(10)[partner]
        assert torch.allclose(target.sum(1), torch.ones(6))
        kept = (mixed == images).float().mean().item()
        if kept < 1.0 and not torch.allclose(mixed, images * lam + images[partner] * (1 - lam)):  # cutmix
            assert kept == pytest.approx(lam)
    if mixup == 0:
        assert kept == pytest.approx(lam)  # cutmix only: exactly the pixels kept


def test_mixup_loss_is_the_mix_of_the_two_targets_losses(monkeypatch):
    seen = {}

    def recording(*args, **kw):
        seen["mixed"] = mix_batch(*args, **kw)
        return seen["mixed"]

    monkeypatch.setattr(augment_mod, "mix_batch", recording)
    losses, logits, _ = step_once(mixup=0.8)
    _, partner, lam = seen["mixed"]
    labels = torch.arange(16) % 10
    logp = logits.log_softmax(1)
    expected = -(lam * logp.gather(1, labels[:, None])[:, 0] + (1 - lam) * logp.gather(1, labels[partner, None])[:, 0])
    assert 0 < lam < 1 and torch.allclose(losses, expected, atol=1e-5)


def test_weight_average_follows_its_formula_and_is_evaluated_beside_the_model(tmp_path):
    from gmlp_vision.optim import WeightEMA
    from gmlp_vision.train import train
    from synthetic import make_dataset

    live = torch.nn.Linear(2, 1)
    ema = WeightEMA(live, 0.5)
    start = live.weight.detach().clone()
    with torch.no_grad():
        live.weight.fill_(1.0)
    ema.update(live)  # d = min(0.5, 2 / 11)
    assert torch.allclose(ema.module.weight, start * 2 / 11 + 9 / 11)
    ema.update(live)  # d = min(0.5, 3 / 12) = 0.25
    assert torch.allclose(ema.module.weight, (start * 2 / 11 + 9 / 11) * 0.25 + 0.75)
    assert not ema.module.training and not ema.module.weight.requires_grad

    cfg = from_preset("tiny", epochs=2, ema=0.99, progress=False, out=str(tmp_path / "run"), val_split=0.2)
    result = train(cfg, make_dataset())
    header = (result.run_dir / "history.csv").read_text().splitlines()[0]
    assert header.endswith("val_ema_loss,val_ema_acc,val_ema_top5")
    assert (result.run_dir / "ema.pt").is_file() and result.test_ema is not None
    assert result.test_ema != result.test  # another set of weights


def test_history_records_the_lr_each_epoch_starts_with(tmp_path):
    from gmlp_vision.train import train
    from synthetic import make_dataset

    cfg = from_preset("tiny", epochs=3, schedule="onecycle", warmup_epochs=1.0, plateau_patience=0, lr=0.01,
                      progress=False, out=str(tmp_path / "run"), val_split=0.0, batch_size=64)  # fmt: skip
    history = train(cfg, make_dataset()).history  # 320 images: 5 steps per epoch
    expected = [scheduled_lr(t, 15, lr=0.01, schedule="onecycle", warmup=5) for t in (0, 5, 10)]
    assert [row["lr"] for row in history] == pytest.approx(expected)
    assert history[0]["lr"] == pytest.approx(0.01 / 25)
