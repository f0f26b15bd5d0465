"""Fit trained weights to a model: timm's gMLP weights (``gmlp_s16_224``, the only public gMLP weights) or our own.

Tensors and state dicts only; reading the files is `pretrained`'s. `fit_pretrained` adapts a state dict to an
architecture and `apply_pretrained` copies it into a fresh `GMLP`:

- timm names map one to one onto ours (`timm_to_gmlp`); timm's patch stem is a Conv2d whose (D, C, p, p) kernel
  becomes our Linear over patches flattened as (row, column, channel). timm models expect pixels scaled to
  ``(x / 255 - 0.5) / 0.5``, so the model's normalisation becomes mean 127.5, std 127.5.
- At another resolution the token grid changes (224 px / patch 16 = 14 x 14 tokens; 64 px / patch 16 = 4 x 4; the
  patch size itself must stay that of the weights), and
  with it every spatial projection, an (N, N) matrix over token positions. `resample_spatial` treats it as a function
  of (output position, input position) on the image plane and resamples both grids (bilinear, antialiased when
  shrinking), scaling by the ratio of token counts so that each output still sums the same total input: a projection
  that averages all tokens still averages them all. The same grid gives back the very same weights.
- Input channels, as timm's ``adapt_input_conv``: for 1 channel the patch kernel is summed over the weights'
  channels; for another count the channels are repeated, cut to the count and scaled by (weights' channels / count).
  The pixel statistics follow (averaged or repeated). For 1 channel the weights' per-channel normalisation is folded
  into the kernel and its bias, so that a gray image embeds exactly as the same gray in every channel did; timm's
  weights, normalised alike on every channel, give timm's summed kernel.
- Patch size, as FlexiViT's PI-resize: the kernel of another patch size p' is the least-squares ``w'`` with
  ``<resize(x), w'> = <x, w>`` for every patch ``x`` of size p (exact when p' >= p), per output unit and channel.
- The classifier is kept only when the class count and, where both sides know them, the class names match (or never,
  with ``--reset-head``); otherwise the fresh model's head stays (to be trained). Each adaptation is said in the log.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.errors import CheckpointError
from gmlp_vision.model import GMLP

log = logging.getLogger("gmlp_vision")

MAX_RESIZED_PATCH = 64  # PI-resize solves a (p*p, p'*p') system: 4096 x 4096 at most
TIMM_PIXEL_MEAN = TIMM_PIXEL_STD = 127.5  # timm's gMLP configs: mean = std = 0.5 on pixels scaled to 0..1
TIMM_FIT = ("crop", 0.875)  # timm's gmlp_s16_224: shorter side to 224 / 0.875, centre crop


def resample_spatial(weight: Tensor, bias: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """A spatial projection (N, N) and its bias (N,) over a g x g token grid, resampled to ``grid`` x ``grid``."""
    if weight.ndim != 2 or bias.ndim != 1 or not weight.is_floating_point():
        raise CheckpointError(f"a spatial projection must be a float (N, N) matrix, got {tuple(weight.shape)}")
    old = round(weight.shape[0] ** 0.5)
    if old * old != weight.shape[0] or weight.shape[0] != weight.shape[1] or bias.shape != weight.shape[:1]:
        raise CheckpointError(f"a spatial projection must be (N, N) with N a square, got {tuple(weight.shape)}")
    if old == grid:
        return weight, bias
    w = _plane(weight, old, grid) * (old * old) / (grid * grid)  # input positions: keep each output's total input
    w = _plane(w.t().contiguous(), old, grid).t().contiguous()  # output positions
    b = _plane(bias[None], old, grid)[0]
    return w.to(weight.dtype), b.to(bias.dtype)


def _plane(x: Tensor, old: int, grid: int) -> Tensor:
    """(rows, old*old) -> (rows, grid*grid): the last axis resampled as an old x old image."""
    rows = x.shape[0]
    x = F.interpolate(
        x.float().reshape(rows, 1, old, old),
        size=(grid, grid),
        mode="bilinear",
        align_corners=False,
        antialias=grid < old,
    )
    return x.reshape(rows, grid * grid)


def adapt_channels(kernel: Tensor, old: int, new: int) -> Tensor:
    """A patch kernel (D, p*p*old), flattened (row, column, channel), for ``new`` input channels (timm's rule)."""
    d, width = kernel.shape
    w = kernel.reshape(d, width // old, old)
    if new == 1:
        w = w.sum(dim=2, keepdim=True)
    else:
        w = w.repeat(1, 1, math.ceil(new / old))[:, :, :new] * (old / new)
    return w.reshape(d, -1).to(kernel.dtype)


def adapt_statistics(values: Tensor, new: int) -> Tensor:
    """Per-channel pixel statistics for ``new`` channels: averaged into one, or repeated and cut."""
    if new == 1:
        return values.mean(dim=0, keepdim=True)
    return values.repeat(math.ceil(new / len(values)))[:new]


def resize_patch_kernel(kernel: Tensor, old: int, new: int, chans: int) -> Tensor:
    """A patch kernel (D, old*old*chans) as FlexiViT's PI-resize makes it for patches of ``new`` x ``new`` pixels."""
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resized = F.interpolate(basis, size=(new, new), mode="bilinear", align_corners=False, antialias=new < old)
    a = resized.reshape(old * old, new * new)  # row j: patch basis image j, resized: x_new = a.T @ x_old
    d = kernel.shape[0]
    w = kernel.double().reshape(d, old, old, chans).permute(0, 3, 1, 2).reshape(d * chans, old * old)
    w = w @ torch.linalg.pinv(a).T  # each row: the least-squares w' with a @ w' = w
    return w.reshape(d, chans, new, new).permute(0, 2, 3, 1).reshape(d, -1).to(kernel.dtype)


@dataclass
class Pretrained:
    """Weights read and fitted to one architecture, ready for `apply_pretrained`."""

    path: Path
    state: dict[str, Tensor]  # every parameter but those in ``fresh``, at the target's shapes
    mean: Tensor | None  # pixel normalisation (None: timm's)
    std: Tensor | None
    fresh: list[str]  # parameters left as initialised (the head, for another class count)
    adapted: list[str] = field(default_factory=list)  # what was changed to fit, one phrase each, for the log


@dataclass
class Weights:
    """A state dict as read (`pretrained.read_weights`), under our names, and what came with it."""

    state: dict[str, Tensor]
    mean: Tensor | None = None  # pixel normalisation (None: timm's)
    std: Tensor | None = None
    classes: tuple[str, ...] | None = None  # the class names they were trained on, where the file says
    fetched: Path | None = None  # the file in huggingface_hub's cache, for weights named by a Hub id
    channels: int | None = None  # input channels, where known apart from ``mean`` (timm's Conv2d kernel says)
    fit: tuple[str, float] | None = None  # how the images they learnt from were fitted: (--resize, --crop-pct)


def fit_pretrained(
    weights: Weights,
    cfg: ModelConfig,
    path: str | Path,
    *,
    classes: tuple[str, ...] | None = None,
    reset_head: bool = False,
) -> Pretrained:
    """Fit ``weights`` read from ``path`` to a model of architecture ``cfg`` (see the module docstring).

    Args:
        weights: the state dict (our names: `timm_to_gmlp` for timm's) and what came with it.
        cfg: the architecture to fit.
        path: where the weights were read from, for `Pretrained.path` and the messages.
        classes: the class names the model will learn; a head trained on other names is not kept.
        reset_head: never keep the head.

    Raises:
        CheckpointError: weights of another architecture (width, depth, a patch kernel that fits no patch size).
    """
    state = {k: v for k, v in weights.state.items() if k not in ("pixel_mean", "pixel_std")}
    with torch.device("meta"):  # the target's names and shapes, without allocating it
        own = {k: v.shape for k, v in GMLP(cfg).state_dict().items()}
    fitted = Pretrained(Path(path), state, weights.mean, weights.std, [])
    _fit_patch_kernel(fitted, cfg, weights.channels)
    for name in [k for k in state if k.endswith("sgu.proj.weight")]:
        bias = name[: -len("weight")] + "bias"
        if bias not in state:
            raise CheckpointError(f"--init {path}: {name} has no {bias}")
        state[name], state[bias] = resample_spatial(state[name], state[bias], cfg.grid_size)
    head = state.get("head.weight")
    if head is not None and head.ndim != 2:
        raise CheckpointError(f"--init {path}: its head.weight is no matrix (shape {tuple(head.shape)})")
    why = None
    if head is not None and head.shape != own["head.weight"]:
        why = f"{cfg.num_classes} classes, the weights' {head.shape[0]}"
    elif head is not None and classes is not None and weights.classes is not None and classes != weights.classes:
        why = "the class names differ from the weights'"
    elif head is not None and reset_head:
        why = "--reset-head"
    if why is not None:
        fitted.fresh = ["head.weight", "head.bias"]
        fitted.adapted.append(f"new classifier head ({why})")
        fitted.state = state = {k: v for k, v in state.items() if k not in fitted.fresh}
    missing = sorted(set(own) - set(state) - {"pixel_mean", "pixel_std"} - set(fitted.fresh))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
            if names
        )
        raise CheckpointError(f"--init {path}: the weights do not fit this architecture ({detail})")
    return fitted


def _fit_patch_kernel(fitted: Pretrained, cfg: ModelConfig, channels: int | None) -> None:
    """Adapt the patch kernel (and the pixel statistics) to ``cfg``'s input channels and patch size, in place.

    Raises:
        CheckpointError: a kernel that is no float matrix, or whose width fits no square patch of the weights'
            channels; pixel statistics that are not finite positive values, one per channel.
    """
    kernel, bias = fitted.state.get("patch_embed.proj.weight"), fitted.state.get("patch_embed.proj.bias")
    if kernel is None or bias is None:
        return  # the architecture check names what is missing
    if kernel.ndim != 2 or not kernel.is_floating_point() or not min(kernel.shape) or bias.shape != kernel.shape[:1]:
        raise CheckpointError(f"--init {fitted.path}: its patch kernel is no float matrix with a bias per row")
    chans = _channels(fitted, cfg, channels, kernel.shape[1])
    patch = math.isqrt(kernel.shape[1] // chans)
    if patch * patch * chans != kernel.shape[1] or not patch:
        raise CheckpointError(
            f"--init {fitted.path}: its patch kernel ({kernel.shape[1]} inputs) fits no square patch "
            f"of {chans} channels"
        )
    if chans != cfg.in_chans:
        kernel, bias = _adapt_channels(fitted, kernel, bias, chans, cfg.in_chans)
    if patch != cfg.patch_size:
        if max(patch, cfg.patch_size) > MAX_RESIZED_PATCH:
            raise CheckpointError(
                f"--init {fitted.path}: its patch size is {patch}, this model's {cfg.patch_size}; patches over "
                f"{MAX_RESIZED_PATCH} pixels are not resampled: train with --patch-size {patch}"
            )
        kernel = resize_patch_kernel(kernel, patch, cfg.patch_size, cfg.in_chans)
        exact = "exact" if cfg.patch_size >= patch else "least squares"
        fitted.adapted.append(f"patch {patch} -> {cfg.patch_size} (PI-resize, {exact})")
    fitted.state["patch_embed.proj.weight"], fitted.state["patch_embed.proj.bias"] = kernel, bias


def _channels(fitted: Pretrained, cfg: ModelConfig, known: int | None, width: int) -> int:
    """The weights' input channels: timm's kernel says, ours carry one statistic per channel; else as the model's."""
    mean, std = fitted.mean, fitted.std
    if mean is None and std is None:
        if known is not None:
            return known
        return cfg.in_chans if width == cfg.patch_size**2 * cfg.in_chans else 3  # a plain state dict
    ok = mean is not None and std is not None and mean.ndim == 1 and mean.shape == std.shape
    ok = ok and 1 <= len(mean) <= 64 and mean.is_floating_point() and std.is_floating_point()
    if not (ok and torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise CheckpointError(
            f"--init {fitted.path}: its pixel_mean and pixel_std are not finite values, one per channel (std > 0)"
        )
    return len(mean)


def _adapt_channels(fitted: Pretrained, kernel: Tensor, bias: Tensor, old: int, new: int) -> tuple[Tensor, Tensor]:
    """The kernel and bias for ``new`` input channels, and the statistics with them (see the module docstring)."""
    mean, std = fitted.mean, fitted.std
    if new == 1 and mean is not None and std is not None:  # fold the per-channel normalisation in: exact for gray
        m1, s1 = mean.double().mean(), std.double().mean()
        w = kernel.double().reshape(kernel.shape[0], -1, old) / std.double()  # (D, p*p, C): w_c / s_c
        bias = (bias.double() + (w * (m1 - mean.double())).sum(dim=(1, 2))).to(bias.dtype)
        kernel = (w.sum(dim=2) * s1).to(kernel.dtype)
        fitted.mean, fitted.std = m1.reshape(1).to(mean.dtype), s1.reshape(1).to(std.dtype)
    else:
        kernel = adapt_channels(kernel, old, new)
        if mean is not None and std is not None:
            fitted.mean, fitted.std = adapt_statistics(mean, new), adapt_statistics(std, new)
    rule = "summed over the weights' channels" if new == 1 else "repeated and rescaled"
    fitted.adapted.append(f"{old} input channels -> {new} ({rule})")
    return kernel, bias


def apply_pretrained(model: GMLP, pretrained: Pretrained) -> list[str]:
    """Copy the weights into ``model`` (built with the config they were read for); returns the fresh names."""
    own = model.state_dict()
    with torch.no_grad():
        for name, value in pretrained.state.items():
            own[name].copy_(value)
        if pretrained.mean is None:
            model.pixel_mean.fill_(TIMM_PIXEL_MEAN)
            model.pixel_std.fill_(TIMM_PIXEL_STD)
        else:
            model.pixel_mean.copy_(pretrained.mean)
            model.pixel_std.copy_(pretrained.std)
    log.info("initialised from %s%s", pretrained.path, "".join(f"; {what}" for what in pretrained.adapted))
    return pretrained.fresh
