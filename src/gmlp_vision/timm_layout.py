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

from torch import Tensor

from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.errors import CheckpointError

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
_TIMM_DEFAULTS = {"img_size": 224, "in_chans": 3, "patch_size": 16, "num_blocks": 30, "mlp_ratio": 6}


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


def gmlp_to_timm(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
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


def timm_architecture(cfg: ModelConfig) -> tuple[str, dict[str, int | float]] | str:
    """The timm model that builds ``cfg``'s network and the ``model_args`` it needs; else why there is none."""
    reasons = (
        (cfg.attn_dim != 0, f"its blocks add a tiny attention (--attn-dim {cfg.attn_dim}, aMLP)"),
        (cfg.gelu != "exact", f"its GELU is the {cfg.gelu} form"),
        (cfg.shortcut != "input", f"its residuals start from the {cfg.shortcut} input"),
        (not cfg.final_norm, "it has no final LayerNorm"),
        (cfg.norm_eps != 1e-6, f"its LayerNorm epsilon is {cfg.norm_eps:g}, timm's 1e-6"),
        (int(cfg.embed_dim * (cfg.ffn_dim / cfg.embed_dim)) != cfg.ffn_dim, "its hidden width is no multiple"),
    )
    why = next((why for bad, why in reasons if bad), None)
    if why is not None:
        return why
    name = next((n for n, width in TIMM_MODELS.items() if width == cfg.embed_dim), "gmlp_s16_224")
    ratio = cfg.ffn_dim / cfg.embed_dim
    wanted = {
        "img_size": cfg.image_size,
        "in_chans": cfg.in_chans,
        "patch_size": cfg.patch_size,
        "num_blocks": cfg.depth,
        "mlp_ratio": int(ratio) if ratio.is_integer() else ratio,
        "embed_dim": cfg.embed_dim,
    }
    defaults = {**_TIMM_DEFAULTS, "embed_dim": TIMM_MODELS[name]}
    return name, {k: v for k, v in wanted.items() if v != defaults[k]}


__all__ = ["STATISTICS", "TIMM_MODELS", "gmlp_to_timm", "is_timm_state", "timm_architecture", "timm_to_gmlp"]
