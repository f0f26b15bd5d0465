"""The `seed` preset against fixtures made by running the tutorial's real code (TF 2.15 + TF-Addons 0.23).

The fixtures and the script that makes them live in tools/keras_reference/ (see its README for the command).
Tolerance: max abs difference <= 1e-5 x the largest magnitude of the reference.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gmlp_vision.augment import zoom
from gmlp_vision.config import from_preset
from gmlp_vision.model import GMLP, count_parameters
from gmlp_vision.optim import EarlyStopping, KerasAdamW, Plateau

FIXTURES = Path(__file__).parent / "fixtures" / "keras"


def close(ours, ref, rel=1e-5):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x {scale:.3g}"


def keras_model(ref) -> GMLP:
    """Our `seed` model holding the Keras model's weights (Dense kernels are (in, out): transpose)."""
    model = GMLP(from_preset("seed", num_classes=100).model).eval()
    t = lambda k: torch.from_numpy(np.ascontiguousarray(ref[k]))  # noqa: E731
    state = {"pixel_mean": t("norm.mean"), "pixel_std": t("norm.variance").sqrt().clamp_min(1e-7)}
    state["patch_embed.proj.weight"], state["patch_embed.proj.bias"] = t("embed.kernel").T, t("embed.bias")
    for i in range(4):
        k, b = f"blocks.{i}.", f"blocks.{i}."
        state[b + "norm.weight"], state[b + "norm.bias"] = t(k + "norm1.gamma"), t(k + "norm1.beta")
        state[b + "fc1.weight"], state[b + "fc1.bias"] = t(k + "proj_in.kernel").T, t(k + "proj_in.bias")
        state[b + "sgu.norm.weight"], state[b + "sgu.norm.bias"] = t(k + "sgu_norm.gamma"), t(k + "sgu_norm.beta")
        state[b + "sgu.proj.weight"], state[b + "sgu.proj.bias"] = t(k + "spatial.kernel").T, t(k + "spatial.bias")
        state[b + "fc2.weight"], state[b + "fc2.bias"] = t(k + "proj_out.kernel").T, t(k + "proj_out.bias")
    state["head.weight"], state["head.bias"] = t("head.kernel").T, t("head.bias")
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def forward_ref():
    return np.load(FIXTURES / "forward.npz")


def test_parameter_count_matches_keras(forward_ref):
    assert int(forward_ref["trainable_count"]) == 236_004
    assert count_parameters(GMLP(from_preset("seed", num_classes=100).model)) == 236_004


def test_forward_matches_keras_layer_by_layer(forward_ref):
    model = keras_model(forward_ref)
    images = torch.from_numpy(forward_ref["images"]).permute(0, 3, 1, 2)  # NHWC -> NCHW, uint8
    with torch.no_grad():
        normalized = model.normalize(images)
        close(normalized.permute(0, 2, 3, 1), forward_ref["normalized"])
        tokens = model.patch_embed(normalized)  # token-major (N, B, D)
        close(tokens.transpose(0, 1), forward_ref["embedded"])
        block0 = model.blocks[0](tokens)
        close(block0.transpose(0, 1), forward_ref["block0"])
        features = model.forward_features(images)
        close(features, forward_ref["features"])
        close(model(images), forward_ref["logits"])


def test_normalization_statistics_match_keras_adapt(forward_ref):
    from gmlp_vision.data.base import channel_stats

    mean, var = channel_stats(torch.from_numpy(forward_ref["adapt_images"]).permute(0, 3, 1, 2))
    close(mean, forward_ref["norm.mean"])
    close(var, forward_ref["norm.variance"])


@pytest.mark.parametrize("case", ["", "_rect"])
def test_zoom_matches_keras_random_zoom(case):
    ref = np.load(FIXTURES / "zoom.npz")
    images = torch.from_numpy(ref["images" + case]).permute(0, 3, 1, 2)
    out = zoom(images, torch.from_numpy(ref["zooms" + case]))
    close(out.permute(0, 2, 3, 1), ref["zoomed" + case])


def test_adamw_step_matches_tfa():
    ref = np.load(FIXTURES / "adamw.npz")
    w = torch.nn.Parameter(torch.from_numpy(ref["w0"].copy()))
    b = torch.nn.Parameter(torch.from_numpy(ref["b0"].copy()))
    opt = KerasAdamW([w, b], lr=3e-3, weight_decay=1e-4)
    for step in range(len(ref["lr_per_step"])):
        opt.param_groups[0]["lr"] = float(ref["lr_per_step"][step])
        w.grad = torch.from_numpy(ref["grads_w0"][step].copy())
        b.grad = torch.from_numpy(ref["grads_b0"][step].copy())
        opt.step()
        close(w.detach(), ref["after_w0"][step])
        close(b.detach(), ref["after_b0"][step])


def test_plateau_and_early_stopping_decisions_match_keras():
    cases = json.loads((FIXTURES / "callbacks.json").read_text())["sequences"]
    for name, case in cases.items():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = KerasAdamW([p], lr=3e-3)
        plateau, stopper = Plateau(opt, factor=0.5, patience=5, threshold=1e-4), EarlyStopping(patience=10)
        lrs, stopped_epoch = [], None
        for epoch, loss in enumerate(case["val_loss"]):
            stop = stopper.step(loss, epoch)
            plateau.step(loss)
            lrs.append(opt.param_groups[0]["lr"])
            if stop:
                stopped_epoch = epoch
                break
        weights_epoch = stopper.best_epoch if stopped_epoch is not None else len(lrs) - 1
        assert stopped_epoch == case["stopped_epoch"], name
        assert weights_epoch == case["weights_epoch"], name
        np.testing.assert_allclose(lrs, case["lr_after_epoch"], rtol=1e-6, err_msg=name)  # Keras holds lr in float32
    assert len(cases) >= 10
