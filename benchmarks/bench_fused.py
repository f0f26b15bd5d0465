"""The fused CPU kernels (gmlp_vision.fused) against the PyTorch path they replace, in a block and alone.

Times, in float32 and bfloat16 on `seed`-sized tokens (64 tokens x batch 128 x width 128, hidden 256), one gMLP
block forward (eval) and forward + backward (training, with and without dropout), on the fused path and on the
PyTorch path of `model.GMLPBlock`; then the kernels alone: bias + GELU + dropout writing the two halves, against
PyTorch's ops for the same, and the gate ``u * (z + bias)`` against PyTorch's two ops. Prints milliseconds per call
(the median over a second of calls).

    .venv/bin/python benchmarks/bench_fused.py                # 2 threads
    .venv/bin/python benchmarks/bench_fused.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_timing import cpu_model, median_latency_ms

from gmlp_vision import fused
from gmlp_vision.config import from_preset
from gmlp_vision.model import GMLPBlock, keep_masks

N, B, D = 64, 128, 128  # tokens, batch, width: a `seed` block's activations


def block_rows(dtype: torch.dtype, rate: float) -> list[tuple[str, Callable[[], object]]]:
    """(name, call) of a block's forward and training step, for one dtype."""
    cfg = from_preset("seed", num_classes=10, dropout=rate).model
    block = GMLPBlock(cfg)
    x = torch.randn(N, B, D).to(dtype).requires_grad_()

    def forward() -> None:
        block.eval()
        with torch.no_grad():
            block(x)

    def train(with_dropout: bool) -> Callable[[], None]:
        def step() -> None:
            block.train()
            block.dropout = rate if with_dropout else 0.0
            block(x).sum().backward()

        return step

    return [("block forward (eval)", forward), (f"block forward + backward, dropout {rate}", train(True)),
            ("block forward + backward, no dropout", train(False))]  # fmt: skip


def kernel_rows(dtype: torch.dtype, rate: float) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, PyTorch's ops, the fused kernel) for the kernels alone, for one dtype."""
    h = torch.randn(N, B, 2 * D).to(dtype)
    bias = torch.randn(2 * D)
    u, z, row_bias = torch.randn(N, B, D).to(dtype), torch.randn(N, B, D).to(dtype), torch.randn(N)

    def gelu_pytorch() -> object:
        halves = F.gelu(h + bias.to(dtype), approximate="tanh").chunk(2, dim=-1)
        masks, scale = keep_masks(halves[0], rate, 2)
        return [half * mask * scale for half, mask in zip(halves, masks, strict=True)]

    return [
        (f"bias + GELU + dropout {rate}, halves", gelu_pytorch, lambda: fused.gelu_halves(h, bias, "tanh", rate)),
        ("gate u * (z + bias)", lambda: u * (z + row_bias.to(dtype)[:, None, None]),
         lambda: fused.gate(u, z, row_bias)),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.2, help="dropout rate (the seed preset's: 0.2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if fused.library() is None:
        print("the fused kernels are unavailable here (no C compiler?); nothing to compare")
        return 1
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}; tokens ({N}, {B}, {D}), hidden {2 * D}")
    applies = fused.applies
    for dtype in (torch.float32, torch.bfloat16):
        for name, call in block_rows(dtype, args.rate):
            b = median_latency_ms(call, 1.0)
            fused.applies = lambda t: False  # the PyTorch path of the same block
            try:
                a = median_latency_ms(call, 1.0)
            finally:
                fused.applies = applies
            print(f"{str(dtype)[6:]:9s} {name:44s} PyTorch {a:6.2f} ms   fused {b:6.2f} ms   {a / b:5.2f}x")
        with torch.no_grad():
            for name, slow, fast in kernel_rows(dtype, args.rate):
                a, b = median_latency_ms(slow, 1.0), median_latency_ms(fast, 1.0)
                print(f"{str(dtype)[6:]:9s} {name:44s} PyTorch {a:6.2f} ms   fused {b:6.2f} ms   {a / b:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
