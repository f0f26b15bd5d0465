"""timm's gMLP (``gmlp_ti16_224``, ``gmlp_s16_224``, ``gmlp_b16_224``): its weight names, and the models it builds.

timm's ``MlpMixer`` with ``SpatialGatingBlock`` is the paper's block: a patch stem (a Conv2d), then per block a
LayerNorm, ``fc1``, exact GELU, the spatial gating unit (LayerNorm on the gate half, a projection over tokens) and
``fc2`` added to the block input, then a LayerNorm (eps 1e-6 throughout), average pooling and the head. Our model is
that block when its config says so (`timm_architecture`), and then its weights map one to one onto timm's names
(`timm_to_gmlp`, `gmlp_to_timm`). timm's models take pixels normalised outside (``pretrained_cfg``'s mean and std on
pixels scaled to 0..1); ours normalise raw 0..255 pixels themselves with the buffers ``pixel_mean`` and
``pixel_std``, which timm's weights do not hold.
"""

from __future__ import annotations

import re
from typing import Protocol

from torch import Tensor

from gmlp_vision.errors import CheckpointError


class ModelShape(Protocol):
    """What is read of a `config.groups.ModelConfig` here (a protocol: this module sits below the config)."""

    image_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    ffn_dim: int
    depth: int
    norm_eps: float
    gelu: str
    shortcut: str
    final_norm: bool
    attn_dim: int


# timm's name (regex) -> ours; blocks keep their index.
_TIMM_NAMES = (
    (r"stem\.proj\.", "patch_embed.proj."),
    (r"blocks\.(\d+)\.mlp_channels\.gate\.", r"blocks.\1.sgu."),
    (r"blocks\.(\d+)\.mlp_channels\.", r"blocks.\1."),
)
# Ours -> timm's, in the order that keeps the gate's names apart from the rest of the block.
_OUR_NAMES = (
    (r"patch_embed\.proj\.", "stem.proj."),
    (r"blocks\.(\d+)\.sgu\.", r"blocks.\1.mlp_channels.gate."),
    (r"blocks\.(\d+)\.(fc1|fc2)\.", r"blocks.\1.mlp_channels.\2."),
)
STATISTICS = ("pixel_mean", "pixel_std")  # our buffers, which timm's weights do not hold
# timm's registered gMLPs: name -> width; every one has patch 16, 30 blocks, mlp_ratio 6, 224 px and 3 channels.
TIMM_MODELS = {"gmlp_ti16_224": 128, "gmlp_s16_224": 256, "gmlp_b16_224": 512}
_TIMM_DEFAULTS = {"img_size": 224, "in_chans": 3}  # what timm's gMLP functions let a caller change


def is_timm_state(state: dict[str, Tensor]) -> bool:
    """Whether a state dict uses timm's gMLP names."""
    return "stem.proj.weight" in state


def timm_to_gmlp(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Timm gMLP weights under our names and layouts (grid and classes unchanged; no pixel statistics).

    Raises:
        CheckpointError: a stem kernel that is no Conv2d kernel.
    """
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


def gmlp_to_timm(state: dict[str, Tensor], cfg: ModelShape) -> dict[str, Tensor]:
    """Our weights under timm's names and layouts, without the pixel statistics (`timm_to_gmlp` undone)."""
    out = {}
    for name, value in state.items():
        if name in STATISTICS:
            continue
        for pattern, replacement in _OUR_NAMES:
            name = re.sub(f"^{pattern}", replacement, name)
        if name == "stem.proj.weight":  # (D, p*p*C), row-major -> (D, C, p, p)
            p, c = cfg.patch_size, cfg.in_chans
            value = value.reshape(value.shape[0], p, p, c).permute(0, 3, 1, 2)
        out[name] = value.contiguous()
    return out


def timm_architecture(cfg: ModelShape) -> tuple[str, dict[str, int]] | str:
    """The timm model that builds ``cfg``'s network and the ``model_args`` it needs; else why there is none.

    timm's registered gMLPs fix their patch size (16), depth (30), width (128, 256 or 512) and hidden width (6 x);
    only the input size and channels can be passed to them.
    """
    names = {width: name for name, width in TIMM_MODELS.items()}
    reasons = (
        (cfg.attn_dim != 0, f"its blocks add a tiny attention (--attn-dim {cfg.attn_dim}, aMLP)"),
        (cfg.gelu != "exact", f"its GELU is the {cfg.gelu} form"),
        (cfg.shortcut != "input", f"its residuals start from the {cfg.shortcut} input"),
        (not cfg.final_norm, "it has no final LayerNorm"),
        (cfg.norm_eps != 1e-6, f"its LayerNorm epsilon is {cfg.norm_eps:g}, timm's 1e-6"),
        (
            cfg.embed_dim not in names or (cfg.patch_size, cfg.depth, cfg.ffn_dim) != (16, 30, 6 * cfg.embed_dim),
            f"timm's gMLPs have patch 16, 30 blocks, width 128, 256 or 512 and a hidden width of 6 x; this one has "
            f"patch {cfg.patch_size}, {cfg.depth} blocks, width {cfg.embed_dim} and hidden {cfg.ffn_dim}",
        ),
    )
    why = next((why for bad, why in reasons if bad), None)
    if why is not None:
        return why
    wanted = {"img_size": cfg.image_size, "in_chans": cfg.in_chans}
    return names[cfg.embed_dim], {k: v for k, v in wanted.items() if v != _TIMM_DEFAULTS[k]}


__all__ = [
    "STATISTICS",
    "ModelShape",
    "TIMM_MODELS",
    "gmlp_to_timm",
    "is_timm_state",
    "timm_architecture",
    "timm_to_gmlp",
]
