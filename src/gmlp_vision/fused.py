"""Fused CPU kernels for the gMLP block: GELU and dropout in one pass forward and one pass backward (issue 15).

On the CPU PyTorch runs a block's GELU, the dropout mask (drawn by its single-threaded Mersenne Twister), the mask
comparison and the multiplications as separate passes over the hidden activations, and the backward as two more. Here
one C loop (`fused.c`: vectorised by the compiler, split over torch's threads with OpenMP) computes
``keep(i) ? GELU(h) / P(keep) : 0`` and one computes its gradient. ``keep(i)`` comes from a counter-based hash of
(seed, i), with the seed drawn from torch's default generator, so no mask is stored: the backward recomputes it, and
a run resumes exactly as before (the generator's state is in ``last.pt``). On 2 cores of an Intel Xeon the forward
of a block's GELU + dropout took 8.9x less time and the backward 2.5x less (`benchmarks/bench_fused.py`).

The C file is compiled on first use with the system compiler (``$CC``, split like a shell command, else ``cc``;
``-O3 -march=native -fopenmp``) into ``$XDG_CACHE_HOME/gmlp-vision/kernels`` (default ``~/.cache/...``), named by a
digest of the source, the compiler's version and the CPU's feature flags (a temp file per builder, synced, then
renamed), and loaded with ctypes. Before first use it is checked against PyTorch's GELU and its gradient on torch's
thread count; a cached build that fails to load or check is built again once. Where there is no compiler, the build
or the check fails (a warning says why), or ``GMLP_FUSED=0`` is set, the model uses the PyTorch path
(`model.keep_masks`), which is also the reference the tests hold the kernels to; that path draws different masks,
so a run is reproducible on one machine either way, not across the two paths.

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
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("fused.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
DISABLE_ENV = "GMLP_FUSED"  # "0": always the PyTorch path
_SPAN = 1 << 32  # values of the 32-bit hash that decides keep(i)
_KERNELS = {torch.float32: ("gelu_fwd", "gelu_bwd"), torch.bfloat16: ("gelu_fwd_bf16", "gelu_bwd_bf16")}
_LOADED: dict[str, ctypes.CDLL | None] = {"lib": None}  # what `library` loaded: read while compiling


class KernelUnavailable(RuntimeError):
    """The fused kernels cannot be built or loaded here."""


def cache_dir() -> Path:
    """Where built kernels are kept."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gmlp-vision" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return os.uname().machine


def _compiler(compiler: str | None) -> list[str]:
    """The compiler command: ``compiler``, else ``$CC`` (split like a shell: ``ccache gcc`` works), else cc or gcc."""
    command = shlex.split(compiler or os.environ.get("CC", ""))
    if not command:
        found = shutil.which("cc") or shutil.which("gcc")
        if not found:
            raise KernelUnavailable("no C compiler found (cc, gcc or $CC)")
        command = [found]
    return command


def build(compiler: str | None = None, *, again: bool = False) -> Path:
    """Compile `fused.c` into the cache unless a build of this source, compiler and CPU is there (or ``again``).

    Raises:
        KernelUnavailable: no compiler, or it failed.
    """
    command = _compiler(compiler)
    try:
        version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"cannot run the C compiler {shlex.join(command)}: {e}") from None
    key = "\0".join([version.stdout, *FLAGS, _cpu_flags()]).encode()
    out = cache_dir() / f"fused-{hashlib.sha256(SOURCE.read_bytes() + key).hexdigest()[:20]}.so"
    if out.is_file() and not again:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)  # one per builder
        os.close(fd)
    except OSError as e:
        raise KernelUnavailable(f"cannot build {out}: {e}") from None
    tmp = Path(name)
    try:
        done = subprocess.run([*command, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        if done.returncode != 0:
            first = (done.stderr or done.stdout).strip().splitlines()[:1]
            raise KernelUnavailable(f"{shlex.join(command)} failed: {first[0] if first else done.returncode}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # whole on disk before it gets the name others trust
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"cannot build {out}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64, i32, u32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_float
    for forward, backward in _KERNELS.values():
        getattr(lib, forward).argtypes = [p, p, i64, i32, i32, u32, u32, f32, i32]
        getattr(lib, backward).argtypes = [p, p, p, i64, i32, i32, u32, u32, f32, i32]
        getattr(lib, forward).restype = getattr(lib, backward).restype = None
    return lib


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return set()
    return {p for p in paths if any(name in Path(p).name for name in ("libgomp", "libiomp", "libomp"))}


def _self_check(lib: ctypes.CDLL) -> None:
    """Forward and backward of both GELUs, both dtypes, on torch's thread count, against PyTorch."""
    if len(_openmp_runtimes()) > 1:  # ours would be a second thread pool beside torch's: cores oversubscribed
        raise KernelUnavailable(f"a second OpenMP runtime was loaded: {', '.join(sorted(_openmp_runtimes()))}")
    threads = torch.get_num_threads()
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.linspace(-12.0, 12.0, 4099, dtype=dtype)
        grad = torch.linspace(-1.0, 1.0, 4099, dtype=dtype)
        forward, backward = (getattr(lib, name) for name in _KERNELS[dtype])
        for exact, approximate in ((1, "none"), (0, "tanh")):
            out, gh = torch.empty_like(x), torch.empty_like(x)
            forward(x.data_ptr(), out.data_ptr(), x.numel(), exact, 0, 0, 0, 1.0, threads)
            backward(grad.data_ptr(), x.data_ptr(), gh.data_ptr(), x.numel(), exact, 0, 0, 0, 1.0, threads)
            ref = F.gelu(x.float(), approximate=approximate)
            ref_grad = torch.ops.aten.gelu_backward(grad.float(), x.float(), approximate=approximate)
            for ours, theirs in ((out, ref), (gh, ref_grad)):
                if not torch.allclose(ours.float(), theirs, rtol=tolerance, atol=1e-5):
                    raise KernelUnavailable(f"the built {dtype} kernel disagrees with PyTorch's GELU")


_LOCK = threading.Lock()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None where they are unavailable (logged once).

    A cached build that does not load or fails the check is built again once, then given up on.
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
            except KernelUnavailable as e:
                log.warning("fused CPU kernels unavailable, using the PyTorch path: %s", e)
                return None
            except (OSError, AttributeError) as e:  # a damaged or foreign cached file
                if again:
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
    """``dropout(GELU(h), rate)`` in one fused pass (``rate`` 0: GELU alone); for tensors `applies` accepts.

    The seed of the dropout hash is drawn from torch's default generator, as PyTorch's own dropout draws from it.
    """
    if rate >= 1.0:
        return h * 0.0  # everything dropped, as nn.Dropout(1.0)
    exact, dropout = approximate != "tanh", rate > 0.0
    threshold, scale = keep_threshold(rate) if dropout else (0, 1.0)
    seed = torch.randint(0, _SPAN, (), dtype=torch.int64) if dropout else torch.zeros((), dtype=torch.int64)
    return _forward(h, seed, exact, dropout, threshold, scale)


__all__ = ["DISABLE_ENV", "KernelUnavailable", "applies", "build", "cache_dir", "gelu_dropout", "keep_threshold"]
