"""The fused CPU kernels (gmlp_vision.fused) against the PyTorch ops they replace, on one block's hidden activations.

Times, on a `seed`-sized tensor (64 tokens x batch 128 x 128 channels, float32), GELU + dropout forward and backward:
the PyTorch path of `model.GMLPBlock` (`F.gelu`, `model.keep_masks` for the two halves' masks, the multiplications,
`gelu_backward`) against `fused.gelu_dropout`, and GELU alone. Prints milliseconds per call (the median over a
second of calls).

    .venv/bin/python benchmarks/bench_fused.py                # 2 threads
    .venv/bin/python benchmarks/bench_fused.py --threads 1
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from bench_timing import cpu_model, median_latency_ms

from gmlp_vision import fused
from gmlp_vision.model import keep_masks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.2, help="dropout rate (the seed preset's: 0.2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if fused.library() is None:
        print("the fused kernels are unavailable here (no C compiler?); nothing to compare")
        return 1
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 128, 128, generator=g)
    grad = torch.randn(64, 128, 128, generator=g)
    (mask_u, mask_v), scale = keep_masks(h, args.rate, 2)

    def pytorch_forward() -> None:  # both halves, as GMLPBlock's PyTorch path
        (mu, mv), _ = keep_masks(h, args.rate, 2)
        for mask in (mu, mv):
            _ = F.gelu(h, approximate="tanh") * mask  # as the block: out of place

    def pytorch_backward() -> None:
        for mask in (mask_u, mask_v):
            torch.ops.aten.gelu_backward(grad * mask, h, approximate="tanh")

    threshold, scale = fused.keep_threshold(args.rate)
    lib = fused.library()
    out, gh = torch.empty_like(h), torch.empty_like(h)

    def fused_forward() -> None:
        for seed in (1, 2):
            lib.gelu_fwd(h.data_ptr(), out.data_ptr(), h.numel(), 0, 1, seed, threshold, scale, args.threads)

    def fused_backward() -> None:
        for seed in (1, 2):
            lib.gelu_bwd(grad.data_ptr(), h.data_ptr(), gh.data_ptr(), h.numel(), 0, 1, seed, threshold, scale,
                         args.threads)  # fmt: skip

    def gelu_pytorch() -> None:
        F.gelu(h, approximate="tanh")

    def gelu_fused() -> None:
        lib.gelu_fwd(h.data_ptr(), out.data_ptr(), h.numel(), 0, 0, 0, 0, 1.0, args.threads)

    print(
        f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}; (64, 128, 128) float32, dropout {args.rate}"
    )
    rows = [
        ("GELU + dropout, both halves, forward", pytorch_forward, fused_forward),
        ("GELU + dropout, both halves, backward", pytorch_backward, fused_backward),
        ("GELU alone, one half, forward", gelu_pytorch, gelu_fused),
    ]
    for name, slow, fast in rows:
        a, b = median_latency_ms(slow, 1.0), median_latency_ms(fast, 1.0)
        print(f"{name:40s} PyTorch {a:6.2f} ms   fused {b:6.2f} ms   {a / b:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
