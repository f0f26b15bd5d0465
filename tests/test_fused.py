"""The fused CPU kernels (gmlp_vision.fused) against the PyTorch path they replace: bias + GELU, dropout
masks, the gate's product, gradients."""

import copy
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from gmlp_vision import fused, fused_check
from gmlp_vision.config import from_preset
from gmlp_vision.errors import KernelUnavailable
from gmlp_vision.model import GMLP, GMLPBlock
from synthetic import perturbed_seed_block

pytestmark = pytest.mark.usefixtures("one_thread")

HAVE_COMPILER = shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.fixture(autouse=True)
def kernels():
    """Where a C compiler exists, the kernels must build (a test skipped everywhere could not fail)."""
    if not HAVE_COMPILER:
        pytest.skip("no C compiler here: the model uses the PyTorch path")
    assert fused.library() is not None, "the fused kernels did not build although a C compiler exists"


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_matches_pytorch_forward_and_backward(approximate):
    h = (torch.randn(64, 8, 96, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    grad = torch.randn(64, 8, 96, generator=torch.Generator().manual_seed(1))
    ours = fused.gelu_dropout(h, approximate, 0.0)
    (g_ours,) = torch.autograd.grad(ours, h, grad)
    exact = F.gelu(h.double(), approximate=approximate)  # the truth; PyTorch's float32 erf GELU errs in the tails
    (g_exact,) = torch.autograd.grad(exact, h, grad.double())
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours.double(), g_exact.double(), rtol=1e-5, atol=1e-5)
    pytorch = F.gelu(h.detach(), approximate=approximate).double()
    assert (ours.double() - exact).abs().max() <= 1.5 * (pytorch - exact).abs().max()  # no worse than PyTorch


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_dropout_keeps_the_hashed_elements_scaled(approximate):
    h = torch.randn(32, 16, 128, generator=torch.Generator().manual_seed(0)).requires_grad_()
    grad = torch.randn(32, 16, 128, generator=torch.Generator().manual_seed(1))
    rate = 0.2
    threshold, scale = fused_check.keep_threshold(rate)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 1 << 32, (), dtype=torch.int64))
    torch.manual_seed(7)  # gelu_dropout draws its seed from the default generator the same way
    ours = fused.gelu_dropout(h, approximate, rate)
    mask = fused_check.keep_mask(h.numel(), seed, threshold).view_as(h)
    assert torch.equal(ours != 0, mask & (F.gelu(h.double(), approximate=approximate) != 0))
    assert abs(mask.float().mean().item() - (1 - rate)) < 0.005 and scale == pytest.approx(1 / (1 - rate), rel=1e-6)
    ref = F.gelu(h.double(), approximate=approximate) * mask * scale
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, h, grad)
    (g_ref,) = torch.autograd.grad(ref, h, grad.double())
    torch.testing.assert_close(g_ours.double(), g_ref.double(), rtol=1e-5, atol=1e-5)


def test_masks_differ_per_call_and_follow_the_generator():
    h = torch.ones(4096)
    torch.manual_seed(0)
    a, b = fused.gelu_dropout(h, "tanh", 0.5), fused.gelu_dropout(h, "tanh", 0.5)
    torch.manual_seed(0)
    assert not torch.equal(a != 0, b != 0) and torch.equal(fused.gelu_dropout(h, "tanh", 0.5), a)


def test_the_result_does_not_depend_on_the_thread_count():
    h = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    one = fused.gelu_dropout(h, "tanh", 0.1)
    torch.set_num_threads(2)
    torch.manual_seed(3)
    assert torch.equal(fused.gelu_dropout(h, "tanh", 0.1), one)


def test_the_model_takes_the_fused_path_and_agrees_with_the_pytorch_one(monkeypatch):
    cfg = from_preset("seed", num_classes=10).model
    torch.manual_seed(0)
    model = GMLP(cfg)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    calls = []
    real = fused.gelu_halves  # what the model calls once it has checked `applies`
    monkeypatch.setattr(fused, "gelu_halves", lambda *a: calls.append(a[2:]) or real(*a))
    model.eval()
    with torch.no_grad():
        eval_fused = model(x)
    assert calls == [("tanh", 0.0)] * cfg.depth
    model.train()
    model(x).sum().backward()
    assert calls[-1] == ("tanh", cfg.dropout)
    monkeypatch.setattr(fused, "applies", lambda t: False)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), eval_fused, rtol=1e-5, atol=1e-5)


def block_and_gradients(block: GMLPBlock, x: torch.Tensor) -> list[torch.Tensor]:
    """A block's output and the gradients of its input and parameters (of the mean square of the output)."""
    x = x.clone().requires_grad_()
    out = block(x)
    return [out, *torch.autograd.grad(out.double().square().mean(), [x, *block.parameters()])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", [{"shortcut": "input"}, {"shortcut": "normed"}, {"attn_dim": 16}])
def test_without_dropout_the_fused_block_is_as_exact_as_the_pytorch_block(monkeypatch, dtype, variant):
    """Forward and every gradient (input, weights, biases) of a block, each path against float64."""
    cfg = from_preset("seed", num_classes=10, spatial_init="glorot", dropout=0.0, **variant).model
    torch.manual_seed(0)
    block = GMLPBlock(cfg).train()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(cfg.num_patches, 5, cfg.embed_dim, generator=torch.Generator().manual_seed(1))
    exact = block_and_gradients(copy.deepcopy(block).double(), x.double())  # float64: the PyTorch path
    ours = block_and_gradients(block, x.to(dtype))
    monkeypatch.setattr(fused, "applies", lambda t: False)
    theirs = block_and_gradients(block, x.to(dtype))
    for a, b, truth in zip(ours, theirs, exact, strict=True):
        assert a.dtype == b.dtype
        error, pytorch_error = ((t.double() - truth).norm() / truth.norm() for t in (a, b))
        assert error <= (3e-6 if dtype == torch.float32 else 1.5 * pytorch_error + 1e-3)


def test_the_gate_and_its_gradients_match_pytorch():
    gen = torch.Generator().manual_seed(0)
    u, z = (torch.randn(16, 3, 40, generator=gen).requires_grad_() for _ in range(2))
    bias = torch.randn(16, generator=gen).requires_grad_()
    grad = torch.randn(16, 3, 40, generator=gen)
    ours = fused.gate(u, z, bias)
    ref = u * (z + bias[:, None, None])
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad(ours, [u, z, bias], grad), torch.autograd.grad(ref, [u, z, bias], grad)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_shapes_the_kernels_would_read_past_are_refused():
    u = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="the gate of u"):
        fused.gate(u, torch.randn(4, 3, 9), torch.randn(4))
    with pytest.raises(ValueError, match="the gate of u"):
        fused.gate(u, torch.randn(4, 3, 8), torch.randn(3))
    with pytest.raises(ValueError, match="a bias of shape"):
        fused.gelu_halves(u, torch.randn(7), "tanh", 0.0)
    with pytest.raises(ValueError, match="in 2 parts"):
        fused.gelu_halves(torch.randn(4, 3, 7), torch.randn(7), "tanh", 0.0)
    torch.testing.assert_close(fused.gate(u, u.mT.contiguous().mT, torch.ones(4)), u * (u + 1))  # any layout of z


def test_the_halves_are_the_whole_split_with_the_mask_over_the_whole():
    h = torch.randn(32, 4, 96, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(96, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(9)
    u, v = fused.gelu_halves(h, bias, "none", 0.3)
    torch.manual_seed(9)
    whole = fused.gelu_dropout(h, "none", 0.3, bias)
    assert u.is_contiguous() and v.is_contiguous()
    assert torch.equal(torch.cat([u, v], -1), whole)


def test_other_tensors_take_the_pytorch_path():
    assert fused.applies(torch.zeros(4))
    assert fused.applies(torch.zeros(4, dtype=torch.bfloat16)) and not fused.applies(torch.zeros(4, dtype=torch.half))
    assert not fused.applies(torch.zeros(4, 4).t())  # not contiguous


def test_without_a_compiler_the_model_still_trains(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    fused.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="gmlp_vision.fused"):
            assert fused.library() is None and not fused.applies(torch.zeros(4))
        assert "using the PyTorch path" in caplog.text
        model = GMLP(from_preset("tiny", num_classes=3).model).train()
        model(torch.zeros(2, 3, 32, 32)).sum().backward()
        assert not list(tmp_path.rglob("*.tmp"))
    finally:
        fused.library.cache_clear()


def test_a_failing_build_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    false = shutil.which("false")
    with pytest.raises(KernelUnavailable):
        fused.build(false)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_the_build_is_cached_by_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = fused.build()
    assert first.parent == fused.cache_dir() and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert fused.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt


def test_a_training_block_equals_the_plain_computation_with_the_hashed_masks():
    cfg, block, x = perturbed_seed_block()
    torch.manual_seed(3)
    ours = block(x)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 1 << 32, (), dtype=torch.int64))  # one draw: the mask spans both halves
    threshold, scale = fused_check.keep_threshold(cfg.dropout)
    y = block.norm(x)
    h = F.gelu(block.fc1(y), approximate=block.approximate)
    u, v = (h * fused_check.keep_mask(h.numel(), seed, threshold).view_as(h) * scale).chunk(2, dim=-1)
    v = block.sgu.proj(block.sgu.norm(v).permute(1, 2, 0)).permute(2, 0, 1)
    torch.testing.assert_close(ours, y + block.fc2(u * v), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_bfloat16_is_computed_in_float32_and_rounded_once(approximate):
    h32 = torch.randn(16, 8, 256, generator=torch.Generator().manual_seed(0)) * 3
    h = h32.bfloat16().requires_grad_()
    grad = torch.randn(16, 8, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    torch.manual_seed(5)
    seed = int(torch.randint(0, 1 << 32, (), dtype=torch.int64))
    torch.manual_seed(5)
    ours = fused.gelu_dropout(h, approximate, 0.1)
    assert ours.dtype == torch.bfloat16
    threshold, scale = fused_check.keep_threshold(0.1)
    mask = fused_check.keep_mask(h.numel(), seed, threshold).view_as(h)
    exact = F.gelu(h.detach().double(), approximate=approximate) * mask * scale
    torch.testing.assert_close(ours.double(), exact.bfloat16().double(), rtol=8e-3, atol=1e-6)  # one bf16 rounding
    (g_ours,) = torch.autograd.grad(ours, h, grad)
    hd = h.detach().double().requires_grad_()
    (g_exact,) = torch.autograd.grad(F.gelu(hd, approximate=approximate) * mask * scale, hd, grad.double())
    assert g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(g_ours.double(), g_exact.bfloat16().double(), rtol=8e-3, atol=1e-6)


def test_compiled_models_call_the_fused_ops(monkeypatch):
    from gmlp_vision.distributed import maybe_compile

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GMLP(from_preset("tiny", num_classes=3).model)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    calls = []
    real = fused.call
    monkeypatch.setattr(fused, "call", lambda name, *rest: calls.append(name) or real(name, *rest))
    model.train()
    eager_train = model(x)
    eager_train.sum().backward()
    depth = model.cfg.depth
    assert calls == ["gelu_fwd", "gate_fwd"] * depth + ["gate_bwd", "gelu_bwd"] * depth
    calls.clear()
    compiled = maybe_compile(model, True)
    compiled(x).sum().backward()
    assert sorted(calls) == sorted(["gelu_fwd", "gate_fwd", "gate_bwd", "gelu_bwd"] * depth)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_non_finite_and_far_negative_inputs_behave_as_pytorch():
    h = torch.tensor([float("nan"), float("-inf"), float("inf"), -1e30, -20.0, 20.0, 1e30]).requires_grad_()
    for approximate in ("tanh", "none"):
        ours = fused.gelu_dropout(h, approximate, 0.0)
        ref = F.gelu(h.detach(), approximate=approximate)
        finite = ref.isfinite()  # non-finite stays non-finite (+inf: PyTorch's tanh form gives NaN, ours inf)
        assert torch.equal(ours.isfinite(), finite) and ours[:2].isnan().all()
        torch.testing.assert_close(ours[finite].detach(), ref[finite], rtol=1e-6, atol=1e-30)
        (grad,) = torch.autograd.grad(ours.sum(), h)
        assert torch.equal(grad[3:6], torch.tensor([0.0, 0.0, 1.0]))  # -1e30 and -20: flat; 20: slope 1


def test_bfloat16_output_is_the_float32_result_rounded_to_nearest_even():
    h = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 4
    for approximate in ("tanh", "none"):
        as_bf16 = fused.gelu_dropout(h.bfloat16(), approximate, 0.0)
        rounded = fused.gelu_dropout(h.bfloat16().float(), approximate, 0.0).bfloat16()  # rounded to nearest even
        assert torch.equal(as_bf16, rounded)


def test_a_rate_of_one_drops_everything():
    h = torch.randn(64, requires_grad=True)
    out = fused.gelu_dropout(h, "tanh", 1.0)
    assert torch.equal(out, torch.zeros(64)) and out.requires_grad


def test_cc_may_carry_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", f"{shutil.which('env')} {shutil.which('cc') or shutil.which('gcc')}")  # like "ccache gcc"
    assert fused.build().is_file()


def test_a_damaged_cached_build_is_built_again(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = fused.build()
    path.write_bytes(b"not a shared library")
    fused.library.cache_clear()
    try:
        assert fused.library() is not None and path.read_bytes()[:4] == b"\x7fELF"
    finally:
        fused.library.cache_clear()
