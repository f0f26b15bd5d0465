"""Starting from timm gMLP weights: key mapping, spatial resampling, fine-tuning at another resolution, bad files."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.config import ModelConfig, from_preset
from gmlp_vision.errors import CheckpointError, ConfigError
from gmlp_vision.model import GMLP
from gmlp_vision.pretrained import load_pretrained
from gmlp_vision.train import train
from gmlp_vision.transfer import resample_spatial
from synthetic import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

# A small sibling of timm's gmlp_s16_224: the same block at 32 px, patch 8 (4 x 4 tokens), 2 blocks.
SMALL = dict(image_size=32, patch_size=8, embed_dim=16, ffn_dim=48, depth=2, num_classes=7, gelu="exact",
             shortcut="input", final_norm=True)  # fmt: skip


def timm_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under timm's gMLP names and layouts (MlpMixer + SpatialGatingBlock + GatedMlp)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    d, h, n, p = cfg.embed_dim, cfg.ffn_dim, cfg.num_patches, cfg.patch_size
    state = {"stem.proj.weight": r(d, 3, p, p), "stem.proj.bias": r(d)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        state.update({
            b + "norm.weight": 1 + r(d), b + "norm.bias": r(d),
            b + "mlp_channels.fc1.weight": r(h, d), b + "mlp_channels.fc1.bias": r(h),
            b + "mlp_channels.gate.norm.weight": 1 + r(h // 2), b + "mlp_channels.gate.norm.bias": r(h // 2),
            b + "mlp_channels.gate.proj.weight": r(n, n), b + "mlp_channels.gate.proj.bias": 1 + r(n),
            b + "mlp_channels.fc2.weight": r(d, h // 2), b + "mlp_channels.fc2.bias": r(d),
        })  # fmt: skip
    state.update({"norm.weight": 1 + r(d), "norm.bias": r(d), "head.weight": r(cfg.num_classes, d),
                  "head.bias": r(cfg.num_classes)})  # fmt: skip
    return state


def timm_forward(state: dict[str, torch.Tensor], x: torch.Tensor, depth: int, eps: float = 1e-6) -> torch.Tensor:
    """timm's gMLP forward written out from its source (batch-major tokens), on pixels in 0..1."""
    x = (x - 0.5) / 0.5
    w = state["stem.proj.weight"]
    x = F.conv2d(x, w, state["stem.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)  # (B, N, D)
    for i in range(depth):
        s = lambda name, i=i: state[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(x, x.shape[-1:], s("norm.weight"), s("norm.bias"), eps)
        y = F.gelu(F.linear(y, s("mlp_channels.fc1.weight"), s("mlp_channels.fc1.bias")))
        u, v = y.chunk(2, dim=-1)
        v = F.layer_norm(v, v.shape[-1:], s("mlp_channels.gate.norm.weight"), s("mlp_channels.gate.norm.bias"), eps)
        v = F.linear(v.transpose(-1, -2), s("mlp_channels.gate.proj.weight"), s("mlp_channels.gate.proj.bias"))
        y = u * v.transpose(-1, -2)
        x = x + F.linear(y, s("mlp_channels.fc2.weight"), s("mlp_channels.fc2.bias"))
    x = F.layer_norm(x, x.shape[-1:], state["norm.weight"], state["norm.bias"], eps).mean(1)
    return F.linear(x, state["head.weight"], state["head.bias"])


def test_timm_weights_load_exactly_and_compute_what_timm_computes(tmp_path):
    cfg = ModelConfig(**SMALL)
    state = timm_state(cfg)
    save_file(state, tmp_path / "model.safetensors")
    model = GMLP(cfg).eval()
    assert load_pretrained(model, tmp_path / "model.safetensors") == []
    ours = model.state_dict()
    assert torch.equal(ours["blocks.1.sgu.proj.weight"], state["blocks.1.mlp_channels.gate.proj.weight"])
    assert torch.equal(ours["blocks.0.fc1.weight"], state["blocks.0.mlp_channels.fc1.weight"])
    assert ours["pixel_mean"].tolist() == [127.5] * 3 and ours["pixel_std"].tolist() == [127.5] * 3
    pixels = torch.randint(0, 256, (5, 3, 32, 32)).float()
    with torch.no_grad():
        expected = timm_forward(state, pixels / 255.0, cfg.depth)
        assert torch.allclose(model(pixels), expected, atol=1e-4, rtol=1e-4)


def test_the_same_token_grid_gives_back_the_very_same_weights(tmp_path):
    cfg = ModelConfig(**SMALL)
    state = timm_state(cfg, seed=3)
    torch.save({"state_dict": state}, tmp_path / "model.pth")  # a .pth wrapper, as many checkpoints are
    model = GMLP(cfg)
    load_pretrained(model, tmp_path / "model.pth")
    w, b = state["blocks.0.mlp_channels.gate.proj.weight"], state["blocks.0.mlp_channels.gate.proj.bias"]
    assert resample_spatial(w, b, 4)[0] is w
    assert torch.equal(model.blocks[0].sgu.proj.weight, w) and torch.equal(model.blocks[0].sgu.proj.bias, b)


def positions(g: int) -> torch.Tensor:
    """Token centres on the unit square, row-major, (g*g, 2)."""
    c = (torch.arange(g) + 0.5) / g
    return torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)


def test_resampling_keeps_the_spatial_function_and_each_outputs_total_input():
    # Token mixing that averages every token stays an average over the new grid.
    w, b = resample_spatial(torch.full((196, 196), 1 / 196), torch.ones(196), 8)
    assert w.shape == (64, 64) and torch.allclose(w, torch.full((64, 64), 1 / 64)) and torch.allclose(b, torch.ones(64))

    # A smooth kernel k(out position, in position), sampled on 14 x 14 tokens, becomes the same kernel on 8 x 8,
    # scaled by 196 / 64 (each new token stands for that many old ones).
    def kernel(g: int) -> torch.Tensor:
        p = positions(g)
        return torch.exp(-((p[:, None] - p[None]) ** 2).sum(-1) / 0.5) * (1 + p[:, None, 0])

    def close(got: torch.Tensor, expected: torch.Tensor) -> bool:  # up to the border effects of the interpolation
        ratio = got.sum(1) / expected.sum(1)
        return (got - expected).norm() / expected.norm() < 0.04 and abs(ratio.mean() - 1) < 0.02

    bias14 = torch.sin(3 * positions(14)[:, 0])
    w, b = resample_spatial(kernel(14), bias14, 8)
    assert close(w, kernel(8) * 196 / 64)
    assert torch.allclose(b, torch.sin(3 * positions(8)[:, 0]), atol=0.05)
    up, _ = resample_spatial(kernel(8), torch.zeros(64), 14)  # enlarging works the same way
    assert close(up, kernel(14) * 64 / 196)
    assert not close(kernel(8).t(), kernel(8))  # the check tells a transposed (output/input swapped) kernel apart


def test_fine_tuning_at_another_resolution_keeps_the_body_and_trains_a_new_head(tmp_path):
    state = timm_state(ModelConfig(**{**SMALL, "num_classes": 1000}))  # an "ImageNet" model on a 4 x 4 grid
    save_file(state, tmp_path / "in1k.safetensors")
    cfg = from_preset("tiny", **{**SMALL, "num_classes": 3, "image_size": 16}, init=str(tmp_path / "in1k.safetensors"),
                      epochs=1, progress=False, out=str(tmp_path / "run"), flip=False, zoom=0.0, dropout=0.0,
                      head_dropout=0.0, drop_path=0.0)  # fmt: skip
    model = GMLP(cfg.model)
    assert load_pretrained(model, cfg.run.init) == ["head.weight", "head.bias"]  # 1000 classes here, 3 there
    assert model.blocks[0].sgu.proj.weight.shape == (4, 4)  # 16 px / patch 8: a 2 x 2 grid
    assert torch.equal(model.blocks[1].fc1.weight, state["blocks.1.mlp_channels.fc1.weight"])
    expected = resample_spatial(state["blocks.1.mlp_channels.gate.proj.weight"],
                                state["blocks.1.mlp_channels.gate.proj.bias"], 2)[0]  # fmt: skip
    assert torch.equal(model.blocks[1].sgu.proj.weight, expected)
    result = train(cfg, make_dataset(num_classes=3))
    assert math.isfinite(result.history[-1]["loss"])
    trained = load_checkpoint(result.run_dir / "last.pt").model_state
    assert trained["pixel_mean"].tolist() == [127.5] * 3  # the pretrained normalisation, not the data's


def test_a_bad_init_file_stops_the_run_before_it_writes_anything(tmp_path):
    cfg = from_preset("tiny", **SMALL, init=str(tmp_path / "typo.safetensors"), out=str(tmp_path / "run"),
                      progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="no such file"):
        train(cfg, make_dataset())
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="--crop-padding 32 must be smaller"):
        from_preset("tiny", crop="pad", crop_padding=32)


def test_bad_init_files_are_refused_in_one_line(tmp_path):
    model = GMLP(ModelConfig(**SMALL))
    with pytest.raises(CheckpointError, match="no such file"):
        load_pretrained(model, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        load_pretrained(model, tmp_path / "junk.pth")
    save_file(timm_state(ModelConfig(**{**SMALL, "embed_dim": 24})), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match="do not fit this architecture") as info:
        load_pretrained(model, tmp_path / "wide.safetensors")
    assert "\n" not in str(info.value)
    state = timm_state(ModelConfig(**SMALL))
    del state["blocks.0.mlp_channels.gate.proj.bias"]
    save_file(state, tmp_path / "nobias.safetensors")
    with pytest.raises(CheckpointError, match="has no blocks.0.sgu.proj.bias"):
        load_pretrained(model, tmp_path / "nobias.safetensors")


def test_a_gmlp_checkpoint_initialises_a_model_with_its_weights_and_normalisation(tmp_path):
    cfg = from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run"), num_classes=4)
    result = train(cfg, make_dataset())
    saved = load_checkpoint(result.run_dir / "last.pt").model_state
    model = GMLP(replace(cfg.model, num_classes=4))
    assert load_pretrained(model, result.run_dir / "last.pt") == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
