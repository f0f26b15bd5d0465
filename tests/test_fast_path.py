"""The fast path (token-major layout, split fc1, cheap dropout masks, bf16 without autocast) against plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from gmlp_vision.config import from_preset
from gmlp_vision.model import GMLP, dropout
from synthetic import perturbed_seed_block


def plain_forward(model: GMLP, x: torch.Tensor) -> torch.Tensor:
    """The textbook batch-major gMLP with nn.Module calls (no custom layout or kernels), same parameters."""
    cfg = model.cfg
    x = (x.float() - model.pixel_mean[:, None, None]) / model.pixel_std[:, None, None]
    B, C, H, W = x.shape
    p = cfg.patch_size
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
    x = model.patch_embed.proj(x)  # (B, N, D)
    for blk in model.blocks:
        y = blk.norm(x)
        h = F.gelu(blk.fc1(y), approximate=blk.approximate)
        u, v = h.chunk(2, dim=-1)
        v = blk.sgu.norm(v)
        v = blk.sgu.proj(v.transpose(1, 2)).transpose(1, 2)
        x = (y if blk.normed_shortcut else x) + blk.fc2(u * v)
    x = model.norm(x)
    return model.head(x.mean(dim=1))


@pytest.mark.parametrize("preset", ["seed", "tiny"])
def test_fast_path_matches_plain_pytorch(preset):
    torch.manual_seed(0)
    model = GMLP(from_preset(preset, num_classes=10, final_norm=preset == "tiny").model).eval()
    model.set_normalization(torch.tensor([125.0, 120.0, 110.0]), torch.tensor([3600.0, 3500.0, 4000.0]))
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ref = plain_forward(model, x)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        bf16 = model(x.to(torch.bfloat16)).float()
    # bf16 activations: agreement to bf16 precision, and the same ranking of classes almost everywhere.
    assert (bf16 - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (bf16.argmax(1) == ref.argmax(1)).float().mean() >= 5 / 6


def test_bf16_gradients_flow_to_fp32_master_weights():
    model = GMLP(from_preset("tiny", num_classes=10).model).train()
    model(torch.rand(4, 3, 32, 32).mul(255).to(torch.bfloat16)).float().logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
def test_cheap_dropout_rate_scale_and_seed(rate):
    x = torch.ones(400_000)
    torch.manual_seed(0)
    y = dropout(x, rate, training=True)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - rate)) < 0.005
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - rate)), rtol=1e-4)
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation
    torch.manual_seed(0)
    assert torch.equal(dropout(x, rate, training=True), y)
    assert dropout(x, rate, training=False) is x
    # Masks differ across positions of one call (no lane pattern): neighbours are independent.
    m = (y != 0).float()
    corr = ((m[1:] - m.mean()) * (m[:-1] - m.mean())).mean() / m.var()
    assert abs(corr.item()) < 0.01


def test_cheap_dropout_gradient_uses_the_same_mask():
    x = torch.randn(1000, requires_grad=True)
    y = dropout(x, 0.2, training=True)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y.detach() != 0).float() / 0.8)


def test_folded_dropout_equals_explicit_inverted_dropout(monkeypatch):
    """In training, the block masks u and v and folds 1/keep into the norm's eps and the product's alpha/beta."""
    from gmlp_vision import fused
    from gmlp_vision.model import keep_masks

    monkeypatch.setattr(fused, "applies", lambda t: False)  # the PyTorch path (tests/test_fused.py: the fused one)
    cfg, block, x = perturbed_seed_block()
    torch.manual_seed(3)
    ours = block(x)
    # The same computation written plainly, with the same random masks.
    y = block.norm(x)
    h = F.gelu(block.fc1(y), approximate=block.approximate)
    u, v = h.chunk(2, dim=-1)
    torch.manual_seed(3)
    (mask_u, mask_v), scale = keep_masks(u, cfg.dropout, 2)
    assert abs(scale - 1 / (1 - cfg.dropout)) < 1e-4
    u, v = u * mask_u * scale, v * mask_v * scale
    v = block.sgu.norm(v)
    v = block.sgu.proj(v.permute(1, 2, 0)).permute(2, 0, 1)
    ref = y + block.fc2(u * v)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)
