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
- The classifier is kept when the class count matches; otherwise the fresh model's head stays (to be trained).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.errors import CheckpointError
from gmlp_vision.model import GMLP

log = logging.getLogger("gmlp_vision")

# timm's name (regex) -> ours; blocks keep their index.
_TIMM_NAMES = (
    (r"stem\.proj\.", "patch_embed.proj."),
    (r"blocks\.(\d+)\.mlp_channels\.gate\.", r"blocks.\1.sgu."),
    (r"blocks\.(\d+)\.mlp_channels\.", r"blocks.\1."),
)
TIMM_PIXEL_MEAN = TIMM_PIXEL_STD = 127.5  # timm's gMLP configs: mean = std = 0.5 on pixels scaled to 0..1


def is_timm_state(state: dict[str, Tensor]) -> bool:
    """Whether a state dict uses timm's gMLP names."""
    return "stem.proj.weight" in state


def timm_to_gmlp(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Timm gMLP weights under our names and layouts (grid and classes unchanged)."""
    out = {}
    for name, value in state.items():
        for pattern, replacement in _TIMM_NAMES:
            name = re.sub(f"^{pattern}", replacement, name)
        if name == "patch_embed.proj.weight":
            if value.ndim != 4:
                raise CheckpointError(
                    f"timm stem.proj.weight should be a Conv2d kernel, got shape {tuple(value.shape)}"
                )
            value = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)  # (D, C, p, p) -> (D, p*p*C), row-major
        out[name] = value
    return out


def resample_spatial(weight: Tensor, bias: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """A spatial projection (N, N) and its bias (N,) over a g x g token grid, resampled to ``grid`` x ``grid``."""
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


@dataclass
class Pretrained:
    """Weights read and fitted to one architecture, ready for `apply_pretrained`."""

    path: Path
    state: dict[str, Tensor]  # every parameter but those in ``fresh``, at the target's shapes
    mean: Tensor | None  # pixel normalisation (None: timm's)
    std: Tensor | None
    fresh: list[str]  # parameters left as initialised (the head, for another class count)


def fit_pretrained(
    state: dict[str, Tensor], mean: Tensor | None, std: Tensor | None, cfg: ModelConfig, path: str | Path
) -> Pretrained:
    """Fit weights read from ``path`` to a model of architecture ``cfg`` (see the module docstring), touching no model.

    Args:
        state: The state dict, under our names (`timm_to_gmlp` for timm's).
        mean: The pixel normalisation that came with it (None: timm's).
        std: Likewise.
        cfg: The architecture to fit.
        path: Where the weights were read from, for `Pretrained.path` and the messages.

    Raises:
        CheckpointError: weights of another architecture (width, depth, patch size).
    """
    state = {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}
    with torch.device("meta"):  # the target's names and shapes, without allocating it
        own = {k: v.shape for k, v in GMLP(cfg).state_dict().items()}
    for name in [k for k in state if k.endswith("sgu.proj.weight")]:
        bias = name[: -len("weight")] + "bias"
        if bias not in state:
            raise CheckpointError(f"--init {path}: {name} has no {bias}")
        state[name], state[bias] = resample_spatial(state[name], state[bias], cfg.grid_size)
    fresh = []
    if state.get("head.weight") is not None and state["head.weight"].shape != own["head.weight"]:
        fresh = ["head.weight", "head.bias"]
        state = {k: v for k, v in state.items() if k not in fresh}
    missing = sorted(set(own) - set(state) - {"pixel_mean", "pixel_std"} - set(fresh))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
            if names
        )
        raise CheckpointError(f"--init {path}: the weights do not fit this architecture ({detail})")
    return Pretrained(Path(path), state, mean, std, fresh)


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
    log.info("initialised from %s%s", pretrained.path, "; new classifier head" if pretrained.fresh else "")
    return pretrained.fresh
