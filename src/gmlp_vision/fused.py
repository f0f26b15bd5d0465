"""Fused CPU kernels for the gMLP block (bias, GELU and dropout; the gate's product and bias), and their build.

On the CPU PyTorch runs a block's bias additions (broadcast copies before each matrix product), its GELU, the dropout
mask (drawn by its single-threaded Mersenne Twister), the mask comparison and the multiplications as separate passes
over the hidden activations, and the backward as more. Here one C loop (`fused.c`: vectorised by the compiler, split
over torch's threads with OpenMP) computes ``keep(i) ? GELU(h + bias) / P(keep) : 0`` from a product made without
its bias, writing the two halves ``u`` and ``v`` apart, and one computes its gradient into one buffer (so the input
gradient is one matrix product). ``keep(i)`` comes from a counter-based hash of (seed, i), with the seed drawn from
torch's default generator, so no mask is stored: the backward recomputes it, and a run resumes exactly as before (the
generator's state is in ``last.pt``). The gate's loop computes ``u * (z + bias)`` from the token mixing made without
its bias, and its backward both gradients and the bias's row sums in one pass. Below, they are PyTorch operators
with gradients (``gmlp_vision::gelu_dropout``, ``gmlp_vision::gate`` and their backwards): `gelu_halves` and `gate`
for callers that have checked `applies` (the model's block), `gelu_dropout` for any tensor.
`benchmarks/bench_fused.py` times them against the ops they replace.

The C file is compiled on first use with the system compiler (``$CC``, split like a shell command, else ``cc``;
``-O3 -march=native -fopenmp``) into ``$XDG_CACHE_HOME/gmlp-vision/kernels`` (default ``~/.cache/...``), named by a
digest of the source, the compiler's version and the CPU's feature flags, and loaded with ctypes. Loading runs a
library's code, so `kernel_cache` loads only from a directory no one else can write (else it builds in a private
one, with a warning) and only bytes that match the SHA-256 recorded at build time. Before first use every kernel is
checked against PyTorch's GELU, product and their gradients, without dropout and at a rate whose dropped elements
must be those of `fused_check.keep_mask`, on torch's thread count; a build that fails its digest, its load or its
check is built again once. Where there is no compiler, the build or the check fails (a warning on stderr says
why), or ``GMLP_FUSED=0`` is set, the model uses the PyTorch path (`model.keep_masks`), which is also the reference
the tests hold the kernels to; that path draws different masks, so a run is reproducible on one machine either way,
not across the two paths.

Used for float32 and bfloat16 CPU tensors (bfloat16 is computed in float32 and rounded once, as PyTorch does), in
eager mode and under ``torch.compile`` (as custom ops, opaque to Inductor); not on GPUs, in fp16, or
while tracing (ONNX export), where the PyTorch path runs. Gradients of gradients (``create_graph=True`` twice) are
not supported on the fused path; ``GMLP_FUSED=0`` gives the PyTorch path. The OpenMP loops use the runtime torch
loaded (libgomp.so.1 in torch's CPU wheels); where loading the kernels would add a second one, they are not used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gmlp_vision.cpu import cpu_flags_line
from gmlp_vision.errors import DamagedLibrary, KernelUnavailable
from gmlp_vision.fused_check import HASH_SPAN, KERNELS, SUFFIX, call_kernel, keep_threshold, self_check
from gmlp_vision.kernel_cache import (
    compile_library,
    compiler_command,
    compiler_version,
    load_verified,
    trusted_dir,
)

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("fused.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
DISABLE_ENV = "GMLP_FUSED"  # "0": always the PyTorch path
_LOADED: dict[str, ctypes.CDLL | None] = {"lib": None}  # what `library` loaded: read while compiling
_WARNED: set[Path] = set()  # private build directories already announced


def cache_dir() -> Path:
    """Where built kernels are kept (when `kernel_cache.untrusted` finds nothing wrong with it)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gmlp-vision" / "kernels"


def build(compiler: str | None = None, *, again: bool = False) -> Path:
    """Compile `fused.c` unless a build of this source, compiler and CPU is cached (or ``again``); its path.

    The library goes to `cache_dir` where that directory is safe to load code from (`kernel_cache`), else to a
    private directory of this process's, with a warning that says why. A build records its digest, which
    `kernel_cache.load_verified` checks before loading it.

    Raises:
        KernelUnavailable: no compiler, or it failed.
    """
    command = compiler_command(compiler)
    key = "\0".join([compiler_version(command), *FLAGS, cpu_flags_line() or os.uname().machine]).encode()
    directory, reason = trusted_dir(cache_dir())
    if reason is not None and directory not in _WARNED:
        _WARNED.add(directory)
        log.warning("fused CPU kernels: not using the cache: %s; building in %s instead", reason, directory)
    out = directory / f"fused-{hashlib.sha256(SOURCE.read_bytes() + key).hexdigest()[:20]}.so"
    compile_library(command, SOURCE, FLAGS, out, again=again)
    return out


def _load(path: Path) -> ctypes.CDLL:
    """The verified library at ``path`` with the kernels' signatures declared.

    Raises:
        DamagedLibrary: it fails `kernel_cache.load_verified`, or lacks a kernel.
    """
    lib = load_verified(path)
    p, i64, i32, u32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_float
    dropout = [i32, i32, u32, u32, f32, i32]  # exact, dropout, seed, threshold, scale, threads
    signatures = {
        "gelu_fwd": [p, p, p, p, i64, i64, i32, *dropout],  # h, bias, out0, out1, rows, width, parts
        "gelu_bwd": [p, p, p, p, p, i64, i64, i32, *dropout],  # grad0, grad1, h, bias, gh, rows, width, parts
        "gate_fwd": [p, p, p, p, i64, i64, i32],  # u, z, bias, out, rows, cols, threads
        "gate_bwd": [p, p, p, p, p, p, p, i64, i64, i32],  # grad, u, z, bias, gu, gz, gbias, rows, cols, threads
    }
    try:
        for name, suffix in itertools.product(KERNELS, SUFFIX.values()):
            getattr(lib, name + suffix).argtypes = signatures[name]
            getattr(lib, name + suffix).restype = None
    except AttributeError as e:
        raise DamagedLibrary(f"{path.name} lacks a kernel: {e}") from None
    return lib


_LOCK = threading.Lock()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None where they are unavailable (logged once, as a warning).

    A build that fails its digest, does not load or fails the self-check is built again once, then given up on;
    nothing is used before it passes the self-check.
    """
    _LOADED["lib"] = None
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    with _LOCK:
        for again in (False, True):
            try:
                lib = _load(build(again=again))
                self_check(lib)
                break
            except DamagedLibrary as e:
                if again:
                    log.warning("fused CPU kernels unavailable, using the PyTorch path: %s", e)
                    return None
            except KernelUnavailable as e:
                log.warning("fused CPU kernels unavailable, using the PyTorch path: %s", e)
                return None
    _LOADED["lib"] = lib
    return lib


def applies(x: Tensor) -> bool:
    """Whether the fused kernels take ``x``: a float32 or bfloat16 CPU tensor, the library available, not traced.

    Under ``torch.compile`` the kernels run as the opaque custom ops below when `library` was loaded before the
    compile (`distributed.maybe_compile` loads it), so Inductor compiles the rest of the block around them.
    """
    if x.device.type != "cpu" or x.dtype not in SUFFIX or not x.is_contiguous():
        return False
    if torch.compiler.is_compiling():
        return _LOADED["lib"] is not None
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return library() is not None


def call(name: str, dtype: torch.dtype, *args: Any) -> None:
    """Run kernel ``name`` (of `KERNELS`) for ``dtype`` on ``args``: tensors (passed as data pointers) and numbers.

    For tensors `applies` has taken (the operators below call it so); the signatures are `fused.c`'s.
    """
    lib = _LOADED["lib"] or library()
    assert lib is not None  # `applies` was checked
    call_kernel(lib, name, dtype, *args)


def _rows(h: Tensor) -> tuple[int, int]:
    """(rows, width) of ``h`` seen as a matrix of its last dimension."""
    width = h.shape[-1]
    return (h.numel() // width if width else 0), width


@torch.library.custom_op("gmlp_vision::gelu_dropout", mutates_args=(), device_types="cpu")
def _gelu(
    h: Tensor, bias: Tensor, seed: Tensor, parts: int, exact: bool, dropout: bool, threshold: int, scale: float
) -> list[Tensor]:
    h = h.contiguous()
    rows, width = _rows(h)
    outs = [h.new_empty(*h.shape[:-1], width // parts) for _ in range(parts)]
    if rows:
        settings = (rows, width, parts, exact, dropout, int(seed), threshold, scale, torch.get_num_threads())
        call("gelu_fwd", h.dtype, h, bias, outs[0], outs[-1], *settings)
    return outs


@torch.library.custom_op("gmlp_vision::gelu_dropout_backward", mutates_args=(), device_types="cpu")
def _gelu_backward(
    grads: list[Tensor], h: Tensor, bias: Tensor, seed: Tensor, parts: int, exact: bool, dropout: bool,
    threshold: int, scale: float,
) -> Tensor:  # fmt: skip
    h = h.contiguous()
    grads = [g.to(h.dtype).contiguous() for g in grads]
    rows, width = _rows(h)
    gh = torch.empty_like(h)
    if rows:
        settings = (rows, width, parts, exact, dropout, int(seed), threshold, scale, torch.get_num_threads())
        call("gelu_bwd", h.dtype, grads[0], grads[-1], h, bias, gh, *settings)
    return gh


@_gelu.register_fake
def _gelu_shape(h: Tensor, bias: Tensor, seed: Tensor, parts: int, *settings: Any) -> list[Tensor]:
    return [h.new_empty(*h.shape[:-1], h.shape[-1] // parts) for _ in range(parts)]


@_gelu_backward.register_fake
def _gelu_backward_shape(grads: list[Tensor], h: Tensor, *settings: Any) -> Tensor:
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _gelu_save(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    h, bias, seed, *params = inputs
    ctx.save_for_backward(h, bias, seed)
    ctx.params = params


def _gelu_gradient(ctx: Any, grads: list[Tensor]) -> tuple[Tensor | None, ...]:
    h, bias, seed = ctx.saved_tensors
    gh = _gelu_backward(grads, h, bias, seed, *ctx.params)
    # Summed in h's dtype (bfloat16 sums accumulate in float32): a float32 sum of bfloat16 would copy gh first.
    gbias = gh.reshape(-1, gh.shape[-1]).sum(0).to(bias.dtype) if ctx.needs_input_grad[1] else None
    return gh, gbias, None, None, None, None, None, None


_gelu.register_autograd(_gelu_gradient, setup_context=_gelu_save)


@torch.library.custom_op("gmlp_vision::gate", mutates_args=(), device_types="cpu")
def _gate(u: Tensor, z: Tensor, bias: Tensor) -> Tensor:
    out = torch.empty_like(u)
    if u.numel():
        call("gate_fwd", u.dtype, u, z, bias, out, u.shape[0], u.numel() // u.shape[0], torch.get_num_threads())
    return out


@torch.library.custom_op("gmlp_vision::gate_backward", mutates_args=(), device_types="cpu")
def _gate_backward(grad: Tensor, u: Tensor, z: Tensor, bias: Tensor) -> list[Tensor]:
    grad = grad.to(u.dtype).contiguous()
    gu, gz, gbias = torch.empty_like(u), torch.empty_like(u), torch.empty_like(bias)
    if u.numel():
        sizes = (u.shape[0], u.numel() // u.shape[0], torch.get_num_threads())
        call("gate_bwd", u.dtype, grad, u, z, bias, gu, gz, gbias, *sizes)
    return [gu, gz, gbias]


@_gate.register_fake
def _gate_shape(u: Tensor, z: Tensor, bias: Tensor) -> Tensor:
    return torch.empty_like(u)


@_gate_backward.register_fake
def _gate_backward_shape(grad: Tensor, u: Tensor, z: Tensor, bias: Tensor) -> list[Tensor]:
    return [torch.empty_like(u), torch.empty_like(u), torch.empty_like(bias)]


def _gate_save(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _gate_gradient(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    gu, gz, gbias = _gate_backward(grad, *ctx.saved_tensors)
    return gu, gz, gbias


_gate.register_autograd(_gate_gradient, setup_context=_gate_save)


def _dropped(h: Tensor, approximate: str, rate: float, bias: Tensor, parts: int) -> list[Tensor]:
    """``dropout(GELU(h + bias), rate)`` in ``parts`` pieces along the last dimension, by the fused kernel.

    The seed of the dropout hash is drawn from torch's default generator, as PyTorch's own dropout draws from it.
    A rate of 1 drops everything, as ``nn.Dropout(1.0)``.

    Raises:
        ValueError: ``bias`` is not one value per column of ``h``, or the columns do not split into ``parts``.
    """
    width = h.shape[-1]
    if bias.shape != (width,) or width % parts:
        raise ValueError(f"a bias of shape {tuple(bias.shape)} for {width} columns in {parts} parts")
    if rate >= 1.0:
        return [piece * 0.0 for piece in (h + bias.to(h.dtype)).chunk(parts, dim=-1)]
    exact, dropout = approximate != "tanh", rate > 0.0
    threshold, scale = keep_threshold(rate) if dropout else (0, 1.0)
    seed = torch.randint(0, HASH_SPAN, (), dtype=torch.int64) if dropout else torch.zeros((), dtype=torch.int64)
    return _gelu(h, bias.float().contiguous(), seed, parts, exact, dropout, threshold, scale)


def gelu_halves(h: Tensor, bias: Tensor, approximate: str, rate: float) -> tuple[Tensor, Tensor]:
    """The halves ``u, v`` (each contiguous) of ``dropout(GELU(h + bias), rate)``, for (..., 2C) ``h``, (2C,) ``bias``.

    For an ``h`` that `applies` takes. The dropout mask is `fused_check.keep_mask` over ``h``'s elements.
    """
    u, v = _dropped(h, approximate, rate, bias, 2)
    return u, v


def gate(u: Tensor, z: Tensor, bias: Tensor) -> Tensor:
    """``u * (z + bias)``, one bias value per row of ``u`` (its first dimension), for ``u`` and ``z`` of one shape.

    For a ``u`` that `applies` takes.

    Raises:
        ValueError: ``z`` is not shaped like ``u``, or ``bias`` is not one value per row.
    """
    if z.shape != u.shape or bias.shape != u.shape[:1]:
        raise ValueError(f"the gate of u {tuple(u.shape)}, z {tuple(z.shape)} and a bias of {tuple(bias.shape)}")
    return _gate(u, z.to(u.dtype).contiguous(), bias.float().contiguous())


def gelu_dropout(h: Tensor, approximate: str, rate: float, bias: Tensor | None = None) -> Tensor:
    """``dropout(GELU(h + bias), rate)`` (no bias: zero; ``rate`` 0: GELU alone), for any tensor.

    A tensor `applies` refuses, and every tensor where the kernels are unavailable, takes the PyTorch path
    (with PyTorch's own masks).
    """
    width = h.shape[-1] if h.dim() else 1
    bias = torch.zeros(width) if bias is None else bias
    if rate < 1.0 and not applies(h):
        return F.dropout(F.gelu(h + bias.to(h.dtype), approximate=approximate), rate, training=rate > 0)
    (out,) = _dropped(h.reshape(h.shape or (1,)), approximate, rate, bias, 1)
    return out.view(h.shape)


__all__ = [
    "DISABLE_ENV",
    "SOURCE",
    "applies",
    "build",
    "cache_dir",
    "call",
    "gate",
    "gelu_dropout",
    "gelu_halves",
    "library",
]
