"""--optimizer muon: Muon on the blocks' weight matrices, AdamW on the rest, as one optimiser."""

import copy
from dataclasses import replace

import pytest
import torch

from gmlp_vision.config import from_preset
from gmlp_vision.graphs import unsupported
from gmlp_vision.model import GMLP
from gmlp_vision.optim import LrSchedule, build_optimizer
from gmlp_vision.optim_muon import MuonAdamW, hidden_matrices, orthogonalised

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_optimizer(**kw):
    cfg = from_preset(
        "tiny", num_classes=5, optimizer="muon", weight_decay=0.05, dropout=0.0, head_dropout=0.0, drop_path=0.0, **kw
    )
    torch.manual_seed(0)
    model = GMLP(cfg.model)
    return cfg, model, build_optimizer(cfg.optim, model)


def one_step(model, optimizer, seed=0):
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(seed)).float()
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), torch.arange(6) % 5).backward()
    optimizer.step()


def test_the_blocks_matrices_go_to_muon_and_the_stem_head_and_vectors_to_adamw():
    _, model, optimizer = model_and_optimizer(decay_norms_biases=False)
    names = {p: n for n, p in model.named_parameters()}
    muon = [names[p] for g in optimizer.param_groups if g["muon"] for p in g["params"]]
    adamw = {names[p]: g["weight_decay"] for g in optimizer.param_groups if not g["muon"] for p in g["params"]}
    assert muon and all(n.startswith("blocks.") and n.endswith("weight") for n in muon)
    assert {"blocks.0.fc1.weight", "blocks.0.fc2.weight", "blocks.0.sgu.proj.weight"} <= set(muon)
    assert adamw["patch_embed.proj.weight"] == adamw["head.weight"] == 0.05  # matrices outside the blocks: decayed
    assert adamw["blocks.0.norm.weight"] == adamw["head.bias"] == 0.0  # vectors: not decayed
    assert len(muon) + len(adamw) == len(list(model.parameters()))


def test_a_muon_update_is_an_orthogonalised_step_of_the_adamw_sized_rms():
    _, model, optimizer = model_and_optimizer()
    w = model.blocks[0].fc1.weight
    before = w.detach().clone()
    one_step(model, optimizer)
    lr, (rows, cols) = optimizer.param_groups[0]["lr"], w.shape
    update = (before * (1 - lr * 0.05) - w.detach()) / (lr * 0.2 * max(rows, cols) ** 0.5)  # decay, then the step
    singular = torch.linalg.svdvals(update.double())
    # Newton-Schulz's quintic brings every singular value of the momentum near 1 (0.5..1.5 by design), whatever the
    # gradient's spread; a plain gradient step would keep that spread.
    assert singular.max() < 1.6 and singular[: min(rows, cols) // 2].min() > 0.3
    assert model.head.weight.grad is not None and not torch.equal(before, w.detach())


def test_its_state_resumes_exactly_and_the_schedule_reaches_both_sides():
    cfg, model, optimizer = model_and_optimizer()
    one_step(model, optimizer, 0)
    saved_model, saved_state = (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(optimizer.state_dict()),
    )
    one_step(model, optimizer, 1)
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    _, again, fresh = model_and_optimizer()
    again.load_state_dict(saved_model)
    fresh.load_state_dict(saved_state)
    assert fresh._adamw.state is fresh.state and fresh._adamw.param_groups[0] is fresh.param_groups[-1]
    one_step(again, fresh, 1)
    assert all(torch.equal(again.state_dict()[k], straight[k]) for k in straight)
    LrSchedule.from_config(replace(cfg.optim, schedule="cosine", plateau_patience=0), 10).apply(fresh, 5)
    assert len({g["lr"] for g in fresh.param_groups}) == 1 and fresh.param_groups[0]["lr"] < cfg.optim.lr


def test_layer_decay_scales_muon_and_adamw_groups_alike():
    _, model, optimizer = model_and_optimizer(layer_decay=0.5)
    scales = {(g["muon"], g["lr_scale"]) for g in optimizer.param_groups}
    assert (True, 0.5 ** (model.cfg.depth - 0)) in scales and (False, 1.0) in scales  # block 0's matrices; the head
    assert all(abs(g["lr"] - 3e-3 * g["lr_scale"]) < 1e-12 for g in optimizer.param_groups)


def test_a_model_without_hidden_matrices_is_refused_and_cuda_graphs_fall_back():
    linear = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="no hidden weight matrix"):
        MuonAdamW([{"params": list(linear.parameters())}], lr=1e-3, weight_decay=0.0, hidden=set())
    assert hidden_matrices(GMLP(from_preset("tiny", num_classes=3).model))
    cfg = from_preset("tiny", optimizer="muon")
    assert unsupported(cfg, torch.device("cuda"), distributed=False, streamed=False) == "--optimizer muon"


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon came with torch 2.9")
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_the_update_is_pytorchs_muon_in_either_dtype(ns_dtype):
    torch.manual_seed(0)
    theirs_w, ours_w = (torch.nn.Parameter(torch.randn(48, 24)) for _ in range(2))
    ours_w.data.copy_(theirs_w.data)
    theirs = torch.optim.Muon([theirs_w], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours = MuonAdamW([{"params": [ours_w]}], lr=0.01, weight_decay=0.1, hidden={ours_w})
    ours.ns_dtype = ns_dtype  # bf16 where the CPU computes it natively (as --precision auto), else float32
    for seed in range(3):  # the momentum and its Nesterov look-ahead too
        grad = torch.randn(48, 24, generator=torch.Generator().manual_seed(seed))
        theirs_w.grad, ours_w.grad = grad.clone(), grad.clone()
        theirs.step()
        ours.step()
    atol = 1e-6 if ns_dtype == torch.bfloat16 else 5e-4  # PyTorch orthogonalises in bf16; a step moves ~2e-3
    torch.testing.assert_close(ours_w.data, theirs_w.data, rtol=0, atol=atol)
    torch.testing.assert_close(ours.state[ours_w]["momentum_buffer"], theirs.state[theirs_w]["momentum_buffer"])


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_newton_schulz_brings_every_singular_value_near_one_and_keeps_the_dtype(shape):
    m = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * torch.logspace(-1, 0, shape[1])  # spread out
    for dtype in (torch.float32, torch.bfloat16):
        out = orthogonalised(m, dtype)
        singular = torch.linalg.svdvals(out.double())
        assert out.shape == m.shape and out.dtype == torch.float32 and 0.6 < singular.min() and singular.max() < 1.3
    assert orthogonalised(m.bfloat16()).dtype == torch.bfloat16
    assert torch.count_nonzero(orthogonalised(torch.zeros(shape))) == 0  # a zero gradient stays zero
