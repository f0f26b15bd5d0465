import pytest
import torch
from torch import nn

from gmlp_vision.config import PRESETS, ModelConfig, from_preset
from gmlp_vision.model import GMLP, GMLPBlock, SpatialGatingUnit, count_parameters, drop_path, flops_per_image

SHAPES = {"seed": (100, 3), "digits": (10, 1), "tiny": (10, 3), "gmlp-ti": (1000, 3), "gmlp-s": (1000, 3),
          "gmlp-b": (1000, 3), "cifar10-fast": (10, 3), "cifar100-strong": (100, 3), "general": (10, 3)}  # fmt: skip


def model_cfg(preset: str, **kw) -> ModelConfig:
    classes, chans = SHAPES[preset]
    return from_preset(preset, num_classes=classes, in_chans=chans, **kw).model


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"gmlp-b"}))  # gmlp-b: gmlp-s's code, 7 s on 2 cores
def test_every_preset_forward_backward(preset):
    torch.manual_seed(0)
    cfg = model_cfg(preset)
    model = GMLP(cfg).train()
    x = torch.randint(0, 256, (2, cfg.in_chans, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    logits = model(x)
    assert logits.shape == (2, cfg.num_classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == (["patch_embed.proj.weight"] if cfg.patch_init == "whiten" else [])
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_cifar_presets_stay_within_the_stretch_budget_of_5m_parameters():
    assert count_parameters(GMLP(model_cfg("cifar100-strong"))) == 4_094_884
    fast = GMLP(model_cfg("cifar10-fast"))
    assert sum(p.numel() for p in fast.parameters()) == 333_066
    assert count_parameters(fast) == 333_066 - 48 * 128  # trainable: all but the whitened patch embedding's weight


def test_seed_parameter_count_matches_tutorial():
    cfg = model_cfg("seed")
    assert count_parameters(GMLP(cfg)) == 236_004
    assert flops_per_image(cfg) == pytest.approx(30.17e6, rel=1e-3)


@pytest.mark.parametrize(("preset", "millions", "depth_rate"), [("gmlp-ti", 6, 0.0), ("gmlp-s", 20, 0.05),
                                                               ("gmlp-b", 73, 0.2)])  # fmt: skip
def test_paper_models_match_the_papers_sizes(preset, millions, depth_rate):
    cfg = model_cfg(preset)
    assert (cfg.image_size, cfg.patch_size, cfg.depth, cfg.num_patches) == (224, 16, 30, 196)
    with torch.device("meta"):
        model = GMLP(cfg)
    assert count_parameters(model) == pytest.approx(millions * 1e6, rel=0.03)
    rates = [block.drop_path for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(depth_rate)  # 1 - the paper's survival probability


def test_tiny_attention_is_single_head_softmax_attention_added_to_the_gate():
    torch.manual_seed(0)
    cfg = model_cfg("tiny", attn_dim=8)
    block = GMLPBlock(cfg).eval()
    x = torch.randn(cfg.num_patches, 3, cfg.embed_dim)  # token-major
    y = nn.functional.layer_norm(x, (cfg.embed_dim,), block.norm.weight, block.norm.bias, cfg.norm_eps)
    q, k, v = (y @ block.attn.qkv.weight.T + block.attn.qkv.bias).transpose(0, 1).chunk(3, dim=-1)  # (B, N, 8)
    weights = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1)
    expected_attn = (weights @ v) @ block.attn.proj.weight.T + block.attn.proj.bias  # (B, N, ffn / 2)
    without = GMLPBlock(cfg).eval()
    without.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("attn.")}, strict=False)
    without.attn = None
    # The attention output is added to the spatial projection, before the gate multiplies.
    half = cfg.ffn_dim // 2
    u = nn.functional.gelu(y @ block.fc1.weight[:half].T + block.fc1.bias[:half]).transpose(0, 1)
    gap = (block(x) - without(x)).transpose(0, 1)
    assert torch.allclose(gap, (u * expected_attn) @ block.fc2.weight.T, atol=1e-5)


def test_paper_defaults():
    cfg = ModelConfig()
    assert (cfg.shortcut, cfg.spatial_init, cfg.gelu, cfg.final_norm) == ("input", "near-zero", "exact", True)
    tutorial = model_cfg("seed")
    assert (tutorial.shortcut, tutorial.spatial_init, tutorial.gelu, tutorial.final_norm) == (
        "normed",
        "glorot",
        "tanh",
        False,
    )


def test_sgu_at_init_passes_u_through():
    cfg = ModelConfig(image_size=32, patch_size=4, embed_dim=32, ffn_dim=64, depth=1)
    sgu = SpatialGatingUnit(cfg)
    sgu.reset_parameters()
    u, v = torch.randn(2, cfg.num_patches, 3, cfg.ffn_dim // 2)  # token-major halves
    torch.testing.assert_close(sgu(u, v), u, atol=1e-4, rtol=0)
    assert torch.all(sgu.proj.bias == 1)


def naive_block(block: GMLPBlock, x: torch.Tensor, normed_shortcut: bool) -> torch.Tensor:
    """The block written out with einsum, independent of the module's forward."""
    y = torch.nn.functional.layer_norm(x, x.shape[-1:], block.norm.weight, block.norm.bias, block.norm.eps)
    h = torch.einsum("bnd,fd->bnf", y, block.fc1.weight) + block.fc1.bias
    h = torch.nn.functional.gelu(h, approximate=block.approximate)
    half = h.shape[-1] // 2
    u, v = h[..., :half], h[..., half:]
    sgu = block.sgu
    v = torch.nn.functional.layer_norm(v, v.shape[-1:], sgu.norm.weight, sgu.norm.bias, sgu.norm.eps)
    v = torch.einsum("mn,bnc->bmc", sgu.proj.weight, v) + sgu.proj.bias[None, :, None]
    out = torch.einsum("bnc,dc->bnd", u * v, block.fc2.weight) + block.fc2.bias
    return (y if normed_shortcut else x) + out


@pytest.mark.parametrize("shortcut", ["input", "normed"])
def test_block_matches_einsum_reference(shortcut):
    torch.manual_seed(1)
    cfg = ModelConfig(
        image_size=16, patch_size=4, embed_dim=24, ffn_dim=40, depth=1, shortcut=shortcut, spatial_init="glorot"
    )
    block = GMLPBlock(cfg).eval()
    for p in block.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, cfg.num_patches, cfg.embed_dim)
    ours = block(x.transpose(0, 1).contiguous()).transpose(0, 1)  # blocks work token-major
    torch.testing.assert_close(ours, naive_block(block, x, shortcut == "normed"), atol=1e-5, rtol=1e-5)


def test_patch_layout_is_row_col_channel():
    cfg = ModelConfig(image_size=8, patch_size=4, in_chans=3, embed_dim=8, ffn_dim=8, depth=1)
    model = GMLP(cfg)
    x = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(1, 3, 8, 8)
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.patch_embed.proj.weight[0, 0] = 1  # picks the first value of each flattened patch
        model.patch_embed.proj.weight[1, 1] = 1  # second value: same pixel, next channel
        model.patch_embed.proj.weight[2, 3] = 1  # fourth value: next column, channel 0
    tokens = model.patch_embed(x)[:, 0]  # token-major
    # Patch 1 is the top-right one (row-major), its first pixel (row 0, col 4).
    assert tokens[1, 0] == x[0, 0, 0, 4]
    assert tokens[1, 1] == x[0, 1, 0, 4]
    assert tokens[1, 2] == x[0, 0, 0, 5]
    assert tokens[2, 0] == x[0, 0, 4, 0]


def test_drop_path_is_per_sample():
    torch.manual_seed(0)
    x = torch.ones(3, 2000, 4)  # token-major: samples on dim 1
    y = drop_path(x, 0.25, training=True)
    per_sample = y.transpose(0, 1).flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == per_sample[:, :1]).all(1))
    dropped = (per_sample == 0).all(1).float().mean().item()
    assert 0.2 < dropped < 0.3
    torch.testing.assert_close(y.mean(), torch.tensor(1.0), atol=0.05, rtol=0)
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_drop_path_rates_rise_linearly():
    model = GMLP(ModelConfig(image_size=16, patch_size=4, embed_dim=8, ffn_dim=8, depth=5, drop_path=0.2))
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_normalization_buffers_and_features_head_split():
    cfg = model_cfg("tiny")
    model = GMLP(cfg).eval()
    model.set_normalization(torch.tensor([120.0, 110.0, 100.0]), torch.tensor([4.0, 9.0, 0.0]))
    assert torch.allclose(model.pixel_std, torch.tensor([2.0, 3.0, 1e-7]))
    x = torch.randint(0, 256, (3, 3, 32, 32)).float()
    feats = model.forward_features(x)
    assert feats.shape == (3, cfg.num_patches, cfg.embed_dim)
    assert model.forward_head(feats, pre_logits=True).shape == (3, cfg.embed_dim)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert "pixel_mean" in model.state_dict()


def test_reset_classifier():
    model = GMLP(model_cfg("tiny"))
    model.reset_classifier(7)
    assert model.cfg.num_classes == 7
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_wrong_image_size_is_refused():
    model = GMLP(model_cfg("tiny"))
    with pytest.raises(ValueError, match="expected 32x32"):
        model(torch.zeros(1, 3, 24, 24))
