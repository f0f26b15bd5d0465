"""--patch-init whiten: a patch embedding set from the PCA whitening of the training patches, frozen."""

import logging

import pytest
import torch

from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.config import from_preset
from gmlp_vision.data.base import channel_stats
from gmlp_vision.initial import WHITEN_EPS, patch_covariance, whiten_patch_embedding, whitening
from gmlp_vision.model import GMLP
from gmlp_vision.train import train
from synthetic import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def normalised_model(images, **kw):
    cfg = from_preset("tiny", num_classes=4, patch_init="whiten", **kw)
    model = GMLP(cfg.model)
    model.set_normalization(*channel_stats(images))
    return model


def test_whitening_makes_the_covariance_the_identity_where_variance_is_well_above_eps():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0]
    spread = torch.logspace(-1, 2, 12, dtype=torch.float64)  # variances 0.1 .. 100, all >> eps
    cov = basis @ torch.diag(spread) @ basis.T
    white = whitening(cov)
    expected = torch.diag(spread / (spread + WHITEN_EPS))
    assert torch.allclose(white @ cov @ white.T, expected, atol=1e-9)
    # a direction with no variance is damped by eps, never divided by zero
    flat = whitening(torch.zeros(3, 3, dtype=torch.float64))
    assert torch.isfinite(flat).all() and torch.allclose(flat.abs().max(), torch.tensor(WHITEN_EPS**-0.5).double())


@pytest.mark.parametrize(("patch_size", "embed_dim"), [(4, 64), (8, 32)])  # D >= P (48) and D < P (192)
def test_the_embedding_whitens_the_training_patches_at_the_glorot_scale(patch_size, embed_dim):
    images = make_dataset(n_train=200).train.images
    model = normalised_model(images, patch_size=patch_size, embed_dim=embed_dim)
    line = whiten_patch_embedding(model, images, seed=3)
    assert line.startswith("patch embedding: the PCA whitening of 200 training images' patches, frozen")
    weight, bias = model.patch_embed.proj.weight.double(), model.patch_embed.proj.bias
    p, d = model.cfg.patch_dim, embed_dim
    # the tokens as the forward pass makes them, from the raw pixels: their covariance over the training images
    with torch.no_grad():
        tokens = (model.patch_embed(model.normalize(images.float())) - bias).reshape(-1, d).double()
    tokens_cov = tokens.T @ tokens / len(tokens) - torch.outer(tokens.mean(0), tokens.mean(0))
    eig = torch.linalg.eigvalsh(tokens_cov)
    scale2 = 2 * p / (p + d) * d / min(p, d)
    strong = eig > 0.1 * scale2
    # min(P, D) directions at the chosen scale (less the few with variance near eps), the rest exactly zero
    assert min(p, d) - 8 <= int(strong.sum()) <= min(p, d)
    assert torch.allclose(eig[strong], torch.full_like(eig[strong], scale2), rtol=0.05)
    assert (eig[: max(d - p, 0)].abs() < 1e-5).all()  # rank min(P, D): a float32 weight's zeros
    # the tokens vary as much as under the Glorot init: mean variance per coordinate 2P / (P + D), here a bit under
    assert 0.8 * 2 * p / (p + d) < tokens_cov.diagonal().mean() <= 2 * p / (p + d) * 1.0001
    assert torch.equal(bias, torch.zeros_like(bias)) and not weight.requires_grad
    if d < p:  # narrower tokens keep the D strongest directions: the weakest ones are not mixed in at all
        directions = torch.linalg.eigh(patch_covariance(model, images))[1]  # columns, weakest first
        assert (weight @ directions[:, : p - d]).abs().max() < 1e-4 * weight.abs().max()
        assert (weight @ directions[:, p - d :]).abs().max() > 0.1 * weight.abs().max()


def test_the_draw_is_seeded_and_a_sample_is_used_for_large_sets(monkeypatch):
    import gmlp_vision.initial as initial

    images = make_dataset(n_train=120).train.images
    a, b, c = (normalised_model(images) for _ in range(3))
    whiten_patch_embedding(a, images, seed=1)
    whiten_patch_embedding(b, images, seed=1)
    monkeypatch.setattr(initial, "WHITEN_PATCHES", 50 * a.cfg.num_patches)  # 50 images' patches
    assert "of 50 training images" in whiten_patch_embedding(c, images, seed=2)
    wa, wb, wc = (m.patch_embed.proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.allclose(wa, wc)
    with pytest.raises(ValueError, match="needs training images"):
        whiten_patch_embedding(a, images[:0], seed=1)


def test_a_run_from_scratch_whitens_then_trains_everything_but_the_embedding(tmp_path, caplog):
    ds = make_dataset()
    cfg = from_preset(
        "tiny", epochs=2, progress=False, out=str(tmp_path / "run"), val_split=0.2, threads=1, patch_init="whiten"
    )
    torch.manual_seed(cfg.run.seed)
    plain = GMLP(cfg.model)  # the Glorot init of the same seed
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        result = train(cfg, ds)
    assert "patch embedding: the PCA whitening of 256 training images' patches" in caplog.text  # not the val tail
    first = load_checkpoint(result.run_dir / "last.pt").model_state
    model = GMLP(cfg.model)
    model.set_normalization(*channel_stats(ds.train.images))
    whiten_patch_embedding(model, ds.train.images[:256], cfg.run.seed)
    assert torch.equal(first["patch_embed.proj.weight"], model.patch_embed.proj.weight)  # whitened, never trained
    assert not torch.allclose(first["patch_embed.proj.weight"], plain.patch_embed.proj.weight)
    assert first["patch_embed.proj.bias"].abs().max() > 0  # the bias trains
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_glorot_leaves_the_embedding_trainable_and_the_line_unsaid(tmp_path, caplog):
    cfg = from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run"), val_split=0.2, threads=1)
    assert cfg.model.patch_init == "glorot" and GMLP(cfg.model).patch_embed.proj.weight.requires_grad
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        train(cfg, make_dataset())
    assert "PCA whitening" not in caplog.text


def test_fine_tuning_keeps_the_given_embedding_frozen(tmp_path, caplog):
    ds = make_dataset()
    common = dict(progress=False, val_split=0.2, threads=1, patch_init="whiten")
    first = train(from_preset("tiny", epochs=1, out=str(tmp_path / "a"), **common), ds)
    given = load_checkpoint(first.run_dir / "last.pt").model_state["patch_embed.proj.weight"]
    cfg = from_preset("tiny", epochs=1, out=str(tmp_path / "b"), init=str(first.run_dir / "last.pt"), **common)
    caplog.clear()  # the first run's lines
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        tuned = train(cfg, ds)
    assert "PCA whitening" not in caplog.text
    assert "patch embedding: --init's, frozen (--patch-init whiten)" in caplog.text
    assert torch.equal(load_checkpoint(tuned.run_dir / "last.pt").model_state["patch_embed.proj.weight"], given)


def test_exports_name_the_patch_init_only_when_it_is_whiten():
    from gmlp_vision.hub import _model_args

    plain = from_preset("tiny", num_classes=4).model
    assert "patch_init" not in _model_args(plain)  # as 0.2 wrote it: its strict reader still reads the export
    assert _model_args(from_preset("tiny", num_classes=4, patch_init="whiten").model)["patch_init"] == "whiten"


def test_a_whitened_model_exports_and_predicts_as_its_checkpoint(tmp_path):
    from gmlp_vision.cli import main
    from gmlp_vision.predict import Classifier

    ds = make_dataset()
    cfg = from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run"), val_split=0.2, threads=1)
    run = train(cfg.replace(patch_init="whiten"), ds).run_dir
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    config = (tmp_path / "st" / "config.json").read_text()
    assert '"patch_init": "whiten"' in config
    images = ds.test.images[:8]
    expected = Classifier.load(run / "last.pt").logits(images)
    assert torch.allclose(Classifier.load(tmp_path / "st").logits(images), expected, atol=1e-5)
