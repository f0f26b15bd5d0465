"""Fused CPU kernels for the gMLP block: GELU and dropout in one pass forward and one pass backward.

On the CPU PyTorch runs a block's GELU, the dropout mask (drawn by its single-threaded Mersenne Twister), the mask
comparison and the multiplications as separate passes over the hidden activations, and the backward as two more. Here
one C loop (`fused.c`: vectorised by the compiler, split over torch's threads with OpenMP) computes
``keep(i) ? GELU(h) / P(keep) : 0`` and one computes its gradient. ``keep(i)`` comes from a counter-based hash of
(seed, i), with the seed drawn from torch's default generator, so no mask is stored: the backward recomputes it, and
a run resumes exactly as before (the generator's state is in ``last.pt``). On 2 cores of an Intel Xeon the forward
of a block's GELU + dropout took 8.9x less time and the backward 2.5x less (`benchmarks/bench_fused.py`).

The C file is compiled on first use with the system compiler (``$CC``, split like a shell command, else ``cc``;
``-O3 -march=native -fopenmp``) into ``$XDG_CACHE_HOME/gmlp-vision/kernels`` (default ``~/.cache/...``), named by a
digest of the source, the compiler's version and the CPU's feature flags, and loaded with ctypes. Loading runs a
library's code, so `kernel_cache` loads only from a directory no one else can write (else it builds in a private
one, with a warning) and only bytes that match the SHA-256 recorded at build time. Before first use every kernel is
checked against PyTorch's GELU and its gradient, without dropout and at a rate whose dropped elements must be those
of `keep_mask`, on torch's thread count; a build that fails its digest, its load or its check is built again once.
Where there is no compiler, the build or the check fails (a warning on stderr says why), or ``GMLP_FUSED=0`` is set,
the model uses the PyTorch path (`model.keep_masks`), which is also the reference the tests hold the kernels to;
that path draws different masks, so a run is reproducible on one machine either way, not across the two paths.

Used for float32 and bfloat16 CPU tensors (bfloat16 is computed in float32 and rounded once, as PyTorch does), in
eager mode and under ``torch.compile`` (as the custom ops ``gmlp_vision::gelu_dropout`` and its backward, opaque to
Inductor); not on GPUs, in fp16, or while tracing (ONNX export), where the PyTorch path runs. Gradients of
gradients (``create_graph=True`` twice) are not supported on the fused path; ``GMLP_FUSED=0`` gives the PyTorch path.
The OpenMP loops use the runtime torch loaded (libgomp.so.1 in torch's CPU wheels); where loading the kernels would
add a second one, they are not used.
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
from gmlp_vision.kernel_cache import (
    DamagedLibrary,
    KernelUnavailable,
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
_SPAN = 1 << 32  # values of the 32-bit hash that decides keep(i)
_KERNELS = {torch.float32: ("gelu_fwd", "gelu_bwd"), torch.bfloat16: ("gelu_fwd_bf16", "gelu_bwd_bf16")}
_LOADED: dict[str, ctypes.CDLL | None] = {"lib": None}  # what `library` loaded: read while compiling
_WARNED: set[Path] = set()  # private build directories already announced
_CHECK_SEED = 0x2545F491  # the dropout seed of the self-check (any value; fixed so that a failure repeats)


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
    try:
        for forward, backward in _KERNELS.values():
            getattr(lib, forward).argtypes = [p, p, i64, i32, i32, u32, u32, f32, i32]
            getattr(lib, backward).argtypes = [p, p, p, i64, i32, i32, u32, u32, f32, i32]
            getattr(lib, forward).restype = getattr(lib, backward).restype = None
    except AttributeError as e:
        raise DamagedLibrary(f"{path.name} lacks a kernel: {e}") from None
    return lib


def _openmp_runtimes() -> set[str]:
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


def _self_check(lib: ctypes.CDLL) -> None:
    """Check every kernel before use: values against PyTorch's GELU and gradient, dropped elements against `keep_mask`.

    Both GELUs, both dtypes, without dropout and at a rate that must drop, forward and backward, on torch's threads.

    Raises:
        DamagedLibrary: a kernel computes something else.
        KernelUnavailable: loading it added a second OpenMP runtime.
    """
    if len(_openmp_runtimes()) > 1:  # ours would be a second thread pool beside torch's: cores oversubscribed
        raise KernelUnavailable(f"a second OpenMP runtime was loaded: {', '.join(sorted(_openmp_runtimes()))}")
    threads = torch.get_num_threads()
    n = 4099  # odd: the vector loops' remainder runs too
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.linspace(-12.0, 12.0, n, dtype=dtype)
        grad = torch.linspace(-1.0, 1.0, n, dtype=dtype)
        forward, backward = (getattr(lib, name) for name in _KERNELS[dtype])
        for (exact, approximate), rate in itertools.product(((1, "none"), (0, "tanh")), (0.0, 0.5)):
            threshold, scale = keep_threshold(rate) if rate else (0, 1.0)
            kept = keep_mask(n, _CHECK_SEED, threshold) if rate else torch.ones(n, dtype=torch.bool)
            out, gh = torch.empty_like(x), torch.empty_like(x)
            forward(x.data_ptr(), out.data_ptr(), n, exact, rate > 0, _CHECK_SEED, threshold, scale, threads)
            pointers = (grad.data_ptr(), x.data_ptr(), gh.data_ptr())
            backward(*pointers, n, exact, rate > 0, _CHECK_SEED, threshold, scale, threads)
            ref = F.gelu(x.float(), approximate=approximate) * scale * kept
            ref_grad = torch.ops.aten.gelu_backward(grad.float(), x.float(), approximate=approximate) * scale * kept
            for ours, theirs in ((out, ref), (gh, ref_grad)):
                if not torch.allclose(ours.float(), theirs, rtol=tolerance, atol=1e-5):
                    raise DamagedLibrary(
                        f"the built {dtype} kernel disagrees with PyTorch's GELU"
                        + (f" with dropout {rate}" if rate else "")
                    )


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
                _self_check(lib)
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
    if x.device.type != "cpu" or x.dtype not in _KERNELS or not x.is_contiguous():
        return False
    if torch.compiler.is_compiling():
        return _LOADED["lib"] is not None
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return library() is not None


def keep_threshold(rate: float) -> tuple[int, float]:
    """The hash threshold below which an element is kept, and the inverted-dropout scale ``1 / P(keep)``."""
    threshold = min(_SPAN - 1, max(1, round((1.0 - rate) * _SPAN)))
    return threshold, _SPAN / threshold


def _threads() -> int:
    return torch.get_num_threads()


def _run(which: int, tensors: list[Tensor], out: Tensor, seed: Tensor, exact: bool, dropout: bool, threshold: int,
         scale: float) -> Tensor:  # fmt: skip
    """Call kernel ``which`` (0 forward, 1 backward) of ``out``'s dtype on contiguous ``tensors``, writing ``out``."""
    lib = _LOADED["lib"] or library()
    assert lib is not None  # `applies` was checked
    kernel = getattr(lib, _KERNELS[out.dtype][which])
    pointers = [t.data_ptr() for t in (*tensors, out)]
    kernel(*pointers, out.numel(), exact, dropout, int(seed), threshold, scale, _threads())
    return out


@torch.library.custom_op("gmlp_vision::gelu_dropout", mutates_args=(), device_types="cpu")
def _forward(h: Tensor, seed: Tensor, exact: bool, dropout: bool, threshold: int, scale: float) -> Tensor:
    h = h.contiguous()
    return _run(0, [h], torch.empty_like(h), seed, exact, dropout, threshold, scale)


@torch.library.custom_op("gmlp_vision::gelu_dropout_backward", mutates_args=(), device_types="cpu")
def _backward(
    grad: Tensor, h: Tensor, seed: Tensor, exact: bool, dropout: bool, threshold: int, scale: float
) -> Tensor:
    h = h.contiguous()
    grad = grad.to(h.dtype).contiguous()
    return _run(1, [grad, h], torch.empty_like(h), seed, exact, dropout, threshold, scale)


@_forward.register_fake
def _forward_shape(h: Tensor, seed: Tensor, exact: bool, dropout: bool, threshold: int, scale: float) -> Tensor:
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@_backward.register_fake
def _backward_shape(
    grad: Tensor, h: Tensor, seed: Tensor, exact: bool, dropout: bool, threshold: int, scale: float
) -> Tensor:
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _save(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    h, seed, *params = inputs
    ctx.save_for_backward(h, seed)
    ctx.params = params


def _gradient(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    h, seed = ctx.saved_tensors
    return _backward(grad, h, seed, *ctx.params), None, None, None, None, None


_forward.register_autograd(_gradient, setup_context=_save)


def gelu_dropout(h: Tensor, approximate: str, rate: float) -> Tensor:
    """``dropout(GELU(h), rate)`` in one fused pass (``rate`` 0: GELU alone), for any tensor.

    A tensor `applies` refuses, and every tensor where the kernels are unavailable, takes the PyTorch path (with
    PyTorch's own masks).
    """
    if rate < 1.0 and not applies(h):
        return F.dropout(F.gelu(h, approximate=approximate), rate, training=rate > 0)
    return fused_gelu_dropout(h, approximate, rate)


def fused_gelu_dropout(h: Tensor, approximate: str, rate: float) -> Tensor:
    """`gelu_dropout` for a tensor the caller has already checked with `applies` (the model's block, once per step).

    The seed of the dropout hash is drawn from torch's default generator, as PyTorch's own dropout draws from it.
    """
    if rate >= 1.0:
        return h * 0.0  # everything dropped, as nn.Dropout(1.0)
    exact, dropout = approximate != "tanh", rate > 0.0
    threshold, scale = keep_threshold(rate) if dropout else (0, 1.0)
    seed = torch.randint(0, _SPAN, (), dtype=torch.int64) if dropout else torch.zeros((), dtype=torch.int64)
    return _forward(h, seed, exact, dropout, threshold, scale)


__all__ = [
    "DISABLE_ENV",
    "SOURCE",
    "applies",
    "build",
    "cache_dir",
    "fused_gelu_dropout",
    "gelu_dropout",
    "keep_mask",
    "keep_threshold",
    "library",
]
