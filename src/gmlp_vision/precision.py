"""What ``--precision`` means, in one place: the dtype a model computes in and what training needs with it.

`Precision` says how inputs are cast, whether training needs a gradient scaler, and whether its step can be
captured as a CUDA graph.
The model keeps fp32 master weights and casts them on use to the dtype of its input (no autocast), so the one thing
that sets a run's precision is `Precision.cast`, applied to the float pixels the model is fed. Layer norms accumulate
their statistics in fp32 and the logits come back to fp32 before the loss and the probabilities.

``--precision auto`` (`choose_precision`) is bf16 where the device computes it natively and fp32 elsewhere: CPUs with
AMX or AVX-512 bf16 instructions, CUDA devices of compute capability 8.0 or more. Elsewhere bf16 is emulated: on an
AMD EPYC with AVX2 only, `benchmarks/bench.py` measured bf16 training at 0.05x fp32. On an Intel Xeon with AMX it is
1.57x fp32. fp16 is never chosen by itself (it needs a gradient scaler, and CPUs gain nothing from it).

fp16 has more precision than bf16 but far less range (65504 at most, 6e-5 the smallest normal number): small gradients
of fp16 activations underflow to zero unless the loss is scaled up first, so fp16 trains with a gradient scaler
(`Precision.scaler`). The scaler starts at 2^16, halves on every step whose gradients overflow (that step is skipped,
see `step`) and doubles after 2000 clean steps (torch's defaults). It decides on the host whether to step, which is why
an fp16 step cannot be captured as a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gmlp_vision.cpu import cpu_features
from gmlp_vision.errors import ConfigError

BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")  # CPUs that compute bf16 products natively (oneDNN uses them)
EMULATED = "about 20x slower than fp32 (benchmarks/bench.py, an AMD EPYC with AVX2 only)"


@dataclass(frozen=True)
class Precision:
    """One ``--precision`` value: its name, the dtype the model computes in, and what training needs with it."""

    name: str
    dtype: torch.dtype

    @property
    def needs_scaler(self) -> bool:
        """Whether training scales the loss (fp16's narrow range)."""
        return self.dtype == torch.float16

    @property
    def not_capturable(self) -> str | None:
        """Why a training step in this precision cannot be captured as a CUDA graph; None when it can."""
        if self.needs_scaler:
            return f"--precision {self.name} (its loss scaler decides on the host whether to step)"
        return None

    def cast(self, images: Tensor) -> Tensor:
        """Float pixels in the dtype the model should compute in (`GMLP.normalize` takes them so)."""
        return images.to(self.dtype) if self.dtype != torch.float32 else images.float()

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """The loss scaler training in this precision needs on ``device``; None for fp32 and bf16.

        Raises:
            ConfigError: this torch has no device-generic ``torch.amp.GradScaler`` (it came with torch 2.3).
        """
        if not self.needs_scaler:
            return None
        if not hasattr(torch.amp, "GradScaler"):
            raise ConfigError(
                f"--precision {self.name} needs torch 2.3 or newer (for its gradient scaler), got {torch.__version__}"
            )
        return torch.amp.GradScaler(device.type)


PRECISIONS = {
    p.name: p
    for p in (Precision("fp32", torch.float32), Precision("bf16", torch.bfloat16), Precision("fp16", torch.float16))
}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run computes in, the log line that says it, and a warning where it will be slow."""

    name: str  # fp32, bf16 or fp16: never auto
    line: str  # e.g. "precision: fp32 (auto: this CPU has no amx_bf16 or avx512_bf16)"
    warning: str | None = None


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why, in words for the log."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = major >= 8
        return native, f"this GPU has compute capability {major}.{minor}" + ("" if native else "; bf16 needs 8.0")
    if device.type == "cpu":
        found = [name for name in BF16_CPU_FEATURES if name in cpu_features()]
        if found:
            return True, f"this CPU has {' and '.join(found)}"
        return False, f"this CPU has no {' or '.join(BF16_CPU_FEATURES)}"
    return False, f"{device.type} devices are not known to compute bf16 natively"


def choose_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """What ``--precision requested`` computes in on ``device``: ``auto`` resolved, and the warning of a slow bf16.

    Raises:
        ValueError: no such precision.
    """
    if requested == "auto":
        native, why = native_bf16(device)
        name = "bf16" if native else "fp32"
        return PrecisionChoice(name, f"precision: {name} (auto: {why})")
    name = precision_named(requested).name
    if name == "bf16":
        native, why = native_bf16(device)
        if not native:
            slow = EMULATED if device.type == "cpu" else "much slower than fp32"
            warning = f"--precision bf16: {why}, so bf16 is emulated here, {slow}; --precision auto chooses fp32"
            return PrecisionChoice(name, f"precision: {name}", warning)
    return PrecisionChoice(name, f"precision: {name}")


def precision_named(name: str | Precision) -> Precision:
    """The `Precision` of a ``--precision`` value (a `Precision` is taken as it is).

    Raises:
        ValueError: no such precision.
    """
    if isinstance(name, Precision):
        return name
    try:
        return PRECISIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}") from None
