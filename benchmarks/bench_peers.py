"""Peer implementations configured as the `seed` model, timed with a plain PyTorch loop.

- timm 1.0.x ``MlpMixer`` with ``SpatialGatingBlock`` + ``GatedMlp`` (its gMLP classes): patch 4, 32 px, width 128,
  hidden 256 (``mlp_ratio=2``), 4 blocks, dropout 0.2 where timm has it (``drop_rate``, ``proj_drop_rate``).
- lucidrains' ``g-mlp-pytorch`` ``gMLPVision`` with the same shape (``ff_mult=2``); it has no dropout.

Both have a final LayerNorm the tutorial lacks (+256 parameters). The loop is AdamW + cross-entropy on pre-normalised
float inputs with no augmentation, so the like-for-like row of ours is "no augmentation". Peers are installed by
``benchmarks/setup_peers.sh``; timm imports torchvision, so the stub in ``benchmarks/_stubs`` goes first on sys.path.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_ours import BATCH, INFER_BATCH, NUM_CLASSES, POOL_BATCHES
from bench_timing import Budget, throughput, timed
from torch import nn

STUBS = Path(__file__).resolve().parent / "_stubs"


def _use_torchvision_stub() -> None:
    if str(STUBS) not in sys.path:
        sys.path.insert(0, str(STUBS))


def build_timm() -> nn.Module:
    """timm's gMLP as the seed model."""
    _use_torchvision_stub()
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

    return MlpMixer(num_classes=NUM_CLASSES, img_size=32, patch_size=4, num_blocks=4, embed_dim=128, mlp_ratio=2,
                    block_layer=SpatialGatingBlock, mlp_layer=GatedMlp, drop_rate=0.2, proj_drop_rate=0.2)  # fmt: skip


def build_lucidrains() -> nn.Module:
    """lucidrains' gMLPVision as the seed model (no dropout in that library)."""
    from g_mlp_pytorch import gMLPVision

    return gMLPVision(image_size=32, patch_size=4, num_classes=NUM_CLASSES, dim=128, depth=4, ff_mult=2)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "?"


# name -> (builder, distribution name, description)
PEERS: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "timm": (build_timm, "timm", "timm MlpMixer+SpatialGatingBlock"),
    "lucidrains": (build_lucidrains, "g-mlp-pytorch", "lucidrains g-mlp-pytorch"),
}
PEER_MODES = ("fp32", "bf16", "fp32-compile", "bf16-compile")  # issue 15: every mode, the peers too


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    # The same context the package uses: bf16 autocast on CPU, nothing for fp32.
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def probe(name: str) -> dict[str, Any]:
    """Import and build peer ``name`` once: its version and parameter count, or why it cannot run."""
    build, dist, label = PEERS[name]
    try:
        model = build()
    except Exception as exc:
        return {"label": label, "error": f"{type(exc).__name__}: {exc}"}
    return {"label": label, "version": _version(dist), "params": sum(p.numel() for p in model.parameters())}


def bench_peer_mode(name: str, precision: str, compiled: bool, budget: Budget) -> dict[str, Any]:
    """Train and batch-512 inference img/s of peer ``name`` in one mode (``error`` holds why a mode failed)."""
    import torch._dynamo

    torch._dynamo.reset()
    out: dict[str, Any] = {"precision": precision, "compile": compiled}
    try:
        torch.manual_seed(0)
        model = PEERS[name][0]()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        if compiled:
            model = torch.compile(model)
        model.train()
        data = torch.Generator().manual_seed(1)
        pool = itertools.cycle(
            [(torch.randn(BATCH, 3, 32, 32, generator=data), torch.randint(0, NUM_CLASSES, (BATCH,), generator=data))
             for _ in range(POOL_BATCHES)]
        )  # fmt: skip

        def step() -> None:
            x, y = next(pool)
            with _autocast(precision):
                logits = model(x).float()
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        out["train_first_step_s"] = timed(step)[1]
        out["train"] = throughput(step, BATCH, budget).to_dict()

        model.eval()
        batch = torch.randn(INFER_BATCH, 3, 32, 32, generator=data)

        def predict() -> None:
            with _autocast(precision):
                model(batch).float()

        with torch.inference_mode():
            out["infer_first_call_s"] = timed(predict)[1]
            out["infer"] = throughput(predict, INFER_BATCH, budget).to_dict()
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return out
