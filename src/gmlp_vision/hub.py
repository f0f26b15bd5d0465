"""The ``config.json`` of an export folder, laid out as timm's Hugging Face Hub models are, and read back.

A folder with ``config.json``, ``model.safetensors`` and the ``README.md`` model card (`card`) can be uploaded to a
model hub as it is. The layout follows timm's ``save_config_for_hf``: ``architecture``, ``num_classes``,
``num_features``, ``global_pool``, ``label_names``, ``model_args`` (here every `ModelConfig` field) and
``pretrained_cfg`` with ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean`` and ``std``.

The model takes raw pixels (float, 0..255) and normalises them itself with the training set's statistics (stored in
its weights, ``pixel_mean`` / ``pixel_std``, and repeated under ``gmlp_vision``). So the ``mean`` and ``std`` of
``pretrained_cfg`` are those of the input the model expects after a timm-style pipeline, which scales pixels to
0..1: mean 0 and std 1/255, which turn 0..1 back into 0..255. A pipeline built from ``pretrained_cfg`` therefore
feeds the model correctly; dividing by the data's own statistics as well would normalise twice.

What only gmlp-vision reads sits under ``gmlp_vision``: the format and its version, the producer, the training
precision and the pixel statistics. Version 1 (gmlp-vision 0.1 and early 0.2) wrote ``format``, ``version``, ``model``,
``classes``, ``precision`` and optionally ``resize`` / ``crop_pct`` at the top level; `parse_export_config` reads both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.images import check_resize
from gmlp_vision.version import __version__

FORMAT = "gmlp-vision-safetensors"
VERSION = 2  # 1: gmlp-vision 0.1's flat layout; 2: timm's Hub layout
ARCHITECTURE = "gmlp"
INPUT = "float (B, C, S, S) raw pixels 0..255; the per-channel normalisation is inside the model"
CROP_MODES = {"crop": "center", "squash": "squash"}  # our --resize -> timm's crop_mode


class ExportConfig(NamedTuple):
    """What an export folder's ``config.json`` says besides the weights."""

    model: ModelConfig
    classes: tuple[str, ...]
    precision: str  # the --precision it was trained and is evaluated in
    resize: str  # how images are fitted to the input (`images.resize`): crop or squash
    crop_pct: float


def hub_config(export: ExportConfig, pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> dict[str, Any]:
    """The ``config.json`` dict of an export: timm's Hub keys, then the ``gmlp_vision`` block."""
    mc = export.model
    pretrained_cfg = {
        "input_size": [mc.in_chans, mc.image_size, mc.image_size],
        "fixed_input_size": True,
        "interpolation": "bilinear",  # antialiased when shrinking (`images.resize`)
        "crop_pct": export.crop_pct,
        "crop_mode": CROP_MODES[export.resize],
        "mean": [0.0] * mc.in_chans,
        "std": [1 / 255] * mc.in_chans,
        "num_classes": mc.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    return {
        "architecture": ARCHITECTURE,
        "num_classes": mc.num_classes,
        "num_features": mc.embed_dim,
        "global_pool": "avg",
        "label_names": list(export.classes),
        "model_args": dataclasses.asdict(mc),
        "pretrained_cfg": pretrained_cfg,
        "gmlp_vision": {
            "format": FORMAT,
            "version": VERSION,
            "producer": f"gmlp-vision {__version__}",
            "precision": export.precision,
            "input": INPUT,
            "pixel_mean": [float(v) for v in pixel_mean],
            "pixel_std": [float(v) for v in pixel_std],
        },
    }


def parse_export_config(raw: Any) -> ExportConfig:
    """An export's ``config.json`` (version 2, or 0.1's version 1) as an `ExportConfig`.

    Raises:
        ValueError, TypeError, KeyError, ConfigError: not a gmlp-vision export config, or an invalid one.
    """
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    ours = raw.get("gmlp_vision")
    if isinstance(ours, dict) and ours.get("format") == FORMAT and ours.get("version") == VERSION:
        pretrained = raw["pretrained_cfg"]
        modes = {mode: name for name, mode in CROP_MODES.items()}
        if pretrained.get("crop_mode") not in modes:
            raise ValueError(f"crop_mode must be one of {', '.join(modes)}, got {pretrained.get('crop_mode')!r}")
        fields = (raw["model_args"], raw["label_names"], ours.get("precision", "fp32"))
        resize, crop_pct = modes[pretrained["crop_mode"]], pretrained.get("crop_pct", 1.0)
    elif raw.get("format") == FORMAT and raw.get("version") == 1:
        fields = (raw["model"], raw["classes"], raw.get("precision", "fp32"))
        resize, crop_pct = raw.get("resize", "crop"), raw.get("crop_pct", 1.0)
    else:
        raise ValueError(f"not a {FORMAT} config (version {VERSION} or 1)")
    model_args, classes, precision = fields
    if type(crop_pct) not in (int, float):
        raise ValueError(f"crop_pct must be a number, got {crop_pct!r}")
    check_resize(resize, crop_pct)
    if not isinstance(model_args, dict) or not isinstance(classes, list):
        raise ValueError("the model arguments must be an object and the class names a list")
    model = ModelConfig(**model_args)
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    return ExportConfig(model, tuple(str(c) for c in classes), str(precision), resize, float(crop_pct))


__all__ = ["ARCHITECTURE", "FORMAT", "VERSION", "ExportConfig", "hub_config", "parse_export_config"]
