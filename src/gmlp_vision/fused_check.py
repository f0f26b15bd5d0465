"""The fused CPU kernels' reference and self-check: what `fused` runs on a library before it uses it.

`keep_mask` is the kernels' dropout mask written with torch ops (the reference the kernels and the tests are held
to), `keep_threshold` turns a dropout rate into the hash threshold and scale, and `self_check` runs every kernel of a
loaded library against PyTorch's ops (GELU with a bias, with and without dropout, one output or two halves; the
gate's product; each forward and backward, in float32 and bfloat16) on torch's thread count.
"""

from __future__ import annotations

import ctypes
import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gmlp_vision.errors import DamagedLibrary, KernelUnavailable

KERNELS = ("gelu_fwd", "gelu_bwd", "gate_fwd", "gate_bwd")  # each in float32 and, with _bf16, bfloat16
SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}  # the dtypes the kernels take, and their names' suffixes
HASH_SPAN = 1 << 32  # values of the 32-bit hash that decides keep(i)
_CHECK_SEED = 0x2545F491  # the dropout seed of the self-check (any value; fixed so that a failure repeats)


def openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return set()
    return {p for p in paths if any(name in Path(p).name for name in ("libgomp", "libiomp", "libomp"))}


def _mix32(x: Tensor) -> Tensor:
    """The murmur3 finaliser of fused.c, on int64 tensors holding uint32 values."""
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & m
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & m
    return x ^ (x >> 16)


def keep_mask(n: int, seed: int, threshold: int) -> Tensor:
    """``keep(i)`` of fused.c for ``i < n``, written with torch ops: the mask the kernels must draw for ``seed``."""
    i = torch.arange(n, dtype=torch.int64)
    key = (0x9E3779B9 * seed + (i >> 32)) & 0xFFFFFFFF
    return _mix32(_mix32((i & 0xFFFFFFFF) ^ seed) ^ key) < threshold


def self_check(lib: ctypes.CDLL) -> None:
    """Check every kernel before use: values against PyTorch's ops and gradients, dropped elements against `keep_mask`.

    GELU: both GELUs, both dtypes, one output and two halves, without dropout and at a rate that must drop, forward
    and backward, on torch's threads. The gate: both dtypes, forward and backward.

    Raises:
        DamagedLibrary: a kernel computes something else.
        KernelUnavailable: loading it added a second OpenMP runtime.
    """
    if len(openmp_runtimes()) > 1:  # ours would be a second thread pool beside torch's: cores oversubscribed
        raise KernelUnavailable(f"a second OpenMP runtime was loaded: {', '.join(sorted(openmp_runtimes()))}")
    rows, width = 31, 134  # odd halves: the vector loops' remainders run too
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.linspace(-12.0, 12.0, rows * width).view(rows, width).to(dtype)
        grad = torch.linspace(-1.0, 1.0, rows * width).view(rows, width).to(dtype)
        bias = torch.linspace(-0.5, 0.5, width)
        for (exact, approximate), rate, parts in itertools.product(((1, "none"), (0, "tanh")), (0.0, 0.5), (1, 2)):
            threshold, scale = keep_threshold(rate) if rate else (0, 1.0)
            kept = keep_mask(rows * width, _CHECK_SEED, threshold).view(rows, width) if rate else 1.0
            outs = [torch.empty(rows, width // parts, dtype=dtype) for _ in range(parts)]
            grads = [g.contiguous() for g in grad.chunk(parts, -1)]
            gh = torch.empty_like(x)
            settings = (rows, width, parts, exact, rate > 0, _CHECK_SEED, threshold, scale, torch.get_num_threads())
            call_kernel(lib, "gelu_fwd", dtype, x, bias, outs[0], outs[-1], *settings)
            call_kernel(lib, "gelu_bwd", dtype, grads[0], grads[-1], x, bias, gh, *settings)
            h = x.float() + bias
            ref = F.gelu(h, approximate=approximate) * scale * kept
            ref_grad = torch.ops.aten.gelu_backward(grad.float(), h, approximate=approximate) * scale * kept
            pairs = ((torch.cat(outs, -1), ref), (gh, ref_grad))
            if not all(torch.allclose(ours.float(), theirs, rtol=tolerance, atol=1e-5) for ours, theirs in pairs):
                dropped = f" with dropout {rate}" if rate else ""
                raise DamagedLibrary(f"the built {dtype} kernel disagrees with PyTorch's GELU{dropped}")
        _check_gate(lib, x, grad, tolerance)


def _check_gate(lib: ctypes.CDLL, u: Tensor, z: Tensor, tolerance: float) -> None:
    """`self_check`'s part for the gate's kernels, on (rows, cols) ``u`` and ``z``."""
    rows, cols = u.shape
    bias, g = torch.linspace(-0.5, 0.5, rows), z.flip(0).contiguous()
    out, gu, gz, gbias = torch.empty_like(u), torch.empty_like(u), torch.empty_like(u), torch.empty(rows)
    call_kernel(lib, "gate_fwd", u.dtype, u, z, bias, out, rows, cols, torch.get_num_threads())
    call_kernel(lib, "gate_bwd", u.dtype, g, u, z, bias, gu, gz, gbias, rows, cols, torch.get_num_threads())
    u, z, g = u.float(), z.float() + bias[:, None], g.float()
    pairs = ((out, u * z), (gu, g * z), (gz, g * u), (gbias, (g * u).sum(1)))
    if not all(torch.allclose(ours.float(), ref, rtol=tolerance, atol=1e-4) for ours, ref in pairs):
        raise DamagedLibrary(f"the built {u.dtype} gate kernel disagrees with PyTorch's product")


def call_kernel(lib: ctypes.CDLL, name: str, dtype: torch.dtype, *args: Any) -> None:
    """Kernel ``name`` of ``lib`` for ``dtype``, called with tensors passed as their data pointers."""
    getattr(lib, name + SUFFIX[dtype])(*(a.data_ptr() if isinstance(a, Tensor) else a for a in args))


def keep_threshold(rate: float) -> tuple[int, float]:
    """The hash threshold below which an element is kept, and the inverted-dropout scale ``1 / P(keep)``."""
    threshold = min(HASH_SPAN - 1, max(1, round((1.0 - rate) * HASH_SPAN)))
    return threshold, HASH_SPAN / threshold


__all__ = [
    "HASH_SPAN",
    "KERNELS",
    "SUFFIX",
    "call_kernel",
    "keep_mask",
    "keep_threshold",
    "openmp_runtimes",
    "self_check",
]
