import math

import numpy as np
import pytest
import torch

from gmlp_vision.cli import main
from gmlp_vision.optim import EarlyStopping, KerasAdamW, LrSchedule, Plateau


def naive_keras_adamw(w, grads, lrs, wd=1e-4, b1=0.9, b2=0.999, eps=1e-7):
    """TF-Addons AdamW in float64 numpy: decay (lr-independent), then Keras Adam."""
    w = w.astype(np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        w *= 1 - wd
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w -= lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
        out.append(w.copy())
    return out


def test_keras_adamw_matches_formula_and_decay_ignores_lr():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = (rng.normal(size=(4, 5, 3)) * np.array([1, 1e-3, 10, 1])[:, None, None]).astype(np.float32)
    lrs = [3e-3, 3e-3, 1.5e-3, 1.5e-3]
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = KerasAdamW([p], lr=3e-3, weight_decay=1e-4)
    expected = naive_keras_adamw(w0, grads.astype(np.float64), lrs)
    for g, lr, exp in zip(grads, lrs, expected, strict=True):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), exp, rtol=0, atol=1e-6)


def test_weight_decay_alone_is_multiplicative_and_lr_free():
    p = torch.nn.Parameter(torch.full((3,), 2.0))
    opt = KerasAdamW([p], lr=1e-9, weight_decay=0.1)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1.8))


def test_plateau_halves_on_fifth_non_improving_epoch():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = KerasAdamW([p], lr=0.4)
    plateau = Plateau(opt, factor=0.5, patience=5, threshold=1e-4)
    losses = [1.0] + [1.0 - 1e-5 * i for i in range(1, 6)]  # improvements below the threshold do not count
    reduced = [plateau.step(x) for x in losses]
    assert reduced == [False, False, False, False, False, True]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    assert plateau.best == 1.0 and plateau.wait == 0


def test_early_stopping_counts_strict_improvements():
    stopper = EarlyStopping(patience=3)
    # Tiny improvements count for early stopping (min_delta 0), ties do not.
    decisions = [stopper.step(x, e) for e, x in enumerate([1.0, 0.99999, 0.99999, 0.99999, 0.99999])]
    assert decisions == [False, False, False, False, True]
    assert stopper.best_epoch == 1


def test_state_dicts_round_trip():
    p = torch.nn.Parameter(torch.zeros(1))
    plateau, stopper = Plateau(KerasAdamW([p])), EarlyStopping(4)
    for e, x in enumerate([3.0, 2.0, 2.5]):
        plateau.step(x)
        stopper.step(x, e)
    p2, s2 = Plateau(KerasAdamW([p])), EarlyStopping(4)
    p2.load_state_dict(plateau.state_dict())
    s2.load_state_dict(stopper.state_dict())
    assert (p2.best, p2.wait, s2.best, s2.best_epoch, s2.wait) == (2.0, 1, 2.0, 1, 1)


def test_a_warm_up_that_covers_the_whole_run_is_said(tmp_path, capsys):
    said = LrSchedule(0.002, "onecycle", total=10, warmup=10).warning()
    assert "covers the whole run (10 steps): the lr only rises, to 0.00195 at most of --lr 0.002" in said
    assert LrSchedule(0.002, "onecycle", total=20, warmup=10).warning() is None
    assert LrSchedule(0.002, "constant", total=20, warmup=0).warning() is None
    argv = ["train", "--dataset", "digits", "--epochs", "2", "--warmup-epochs", "2", "--schedule", "cosine",
            "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: the lr warm-up (42 steps) covers the whole run (42 steps): the lr only rises" in err
