"""The ``config.json`` of an export folder, laid out as timm's Hugging Face Hub models are, and read back.

Version 3, for models of the paper's block that timm builds (`timm_layout.timm_architecture`: gMLP-Ti, -S or -B at
any input size and channel count): ``architecture`` is that timm model (``gmlp_ti16_224``, ``gmlp_s16_224`` or
``gmlp_b16_224``), ``model_args`` what differs from it (``img_size``, ``in_chans``), the weights carry
timm's names, and ``pretrained_cfg``'s ``mean`` and ``std`` are the training set's pixel statistics on pixels scaled
to 0..1, so that ``timm.create_model(architecture, pretrained=True, num_classes=num_classes,
pretrained_cfg_overlay=dict(file=..., num_classes=num_classes), **model_args)`` fed ``(x / 255 - mean) / std``
computes our logits. Our own `ModelConfig` sits under ``gmlp_vision`` as ``model``. Every other model (the
tutorial's block, aMLP) keeps version 2, described below, and its card says timm cannot build it.

Version 2:

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
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from gmlp_vision.config.groups import ModelConfig, RunConfig
from gmlp_vision.errors import shown
from gmlp_vision.images import RESIZE_MODES
from gmlp_vision.timm_layout import timm_architecture
from gmlp_vision.version import __version__

FORMAT = "gmlp-vision-safetensors"
VERSION = 3  # 1: gmlp-vision 0.1's flat layout; 2: timm's Hub layout, our names; 3: a timm model, timm's names
OUR_VERSION = 2  # what a model timm cannot build is written as
ARCHITECTURE = "gmlp"
INPUT = "float (B, C, S, S) raw pixels 0..255; the per-channel normalisation is inside the model"
TIMM_INPUT = "timm: float (B, C, S, S) normalised as pretrained_cfg says; gmlp-vision: raw pixels 0..255"
CROP_MODES = {"crop": "center", "squash": "squash"}  # our --resize -> timm's crop_mode
_RUN_PRECISIONS = next(f.metadata["choices"] for f in dataclasses.fields(RunConfig) if f.name == "precision")
PRECISIONS: tuple[str, ...] = tuple(p for p in _RUN_PRECISIONS if p != "auto")  # auto is resolved before a run
MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


class ExportConfig(NamedTuple):
    """What an export folder's ``config.json`` says besides the weights."""

    model: ModelConfig
    classes: tuple[str, ...]
    precision: str  # the --precision it was trained and is evaluated in
    resize: str  # how images are fitted to the input (`images.resize`): crop or squash
    crop_pct: float
    timm_weights: bool = False  # the weights carry timm's names (version 3), without the pixel statistics
    pixel_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std) on 0..255, version 3


def hub_config(
    export: ExportConfig,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    source: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` dict of an export: timm's Hub keys, then the ``gmlp_vision`` block (see the module doc).

    ``source``: what the export records of the checkpoint it came from (`export.checkpoint_source`).
    """
    mc = export.model
    timm = timm_architecture(mc)
    mean, std = [float(v) for v in pixel_mean], [float(v) for v in pixel_std]
    pretrained_cfg = {
        "input_size": [mc.in_chans, mc.image_size, mc.image_size],
        "fixed_input_size": True,
        "interpolation": "bilinear",  # antialiased when shrinking (`images.resize`)
        "crop_pct": export.crop_pct,
        "crop_mode": CROP_MODES[export.resize],
        "mean": [v / 255 for v in mean] if isinstance(timm, tuple) else [0.0] * mc.in_chans,
        "std": [v / 255 for v in std] if isinstance(timm, tuple) else [1 / 255] * mc.in_chans,
        "num_classes": mc.num_classes,
        "first_conv": "stem.proj" if isinstance(timm, tuple) else "patch_embed.proj",
        "classifier": "head",
    }
    ours: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION if isinstance(timm, tuple) else OUR_VERSION,
        "producer": f"gmlp-vision {__version__}",
        "precision": export.precision,
        "input": INPUT if not isinstance(timm, tuple) else TIMM_INPUT,
        "pixel_mean": mean,
        "pixel_std": std,
        **(source or {}),
    }
    if isinstance(timm, tuple):
        ours.update(model=_model_args(mc), weights="timm")
    return {
        "architecture": timm[0] if isinstance(timm, tuple) else ARCHITECTURE,
        "num_classes": mc.num_classes,
        "num_features": mc.embed_dim,
        "global_pool": "avg",
        "label_names": list(export.classes),
        "model_args": timm[1] if isinstance(timm, tuple) else _model_args(mc),
        "pretrained_cfg": pretrained_cfg,
        "gmlp_vision": ours,
    }


def _model_args(mc: ModelConfig) -> dict[str, Any]:
    """``mc`` as an export writes it: every field, less ``patch_init`` at its default.

    ``patch_init`` is a training choice the forward pass never reads; left out, exports of the models that do not
    use it stay readable by 0.2, whose reader refuses unknown fields.
    """
    args = dataclasses.asdict(mc)
    if args["patch_init"] == "glorot":
        del args["patch_init"]
    return args


def parse_classes(value: Any, num_classes: int | None = None) -> tuple[str, ...]:
    """Class names as an export stores them: a non-empty list of strings (``num_classes`` of them, if given).

    Raises:
        ValueError: anything else (a dict, one string, numbers, another count).
    """
    if not isinstance(value, list) or not value:
        raise ValueError(f"the class names must be a non-empty list of strings, got {_kind(value)}")
    for name in value:
        if not isinstance(name, str):
            raise ValueError(f"the class names must be strings, got {_kind(name)}")
    if num_classes is not None and len(value) != num_classes:
        raise ValueError(f"{len(value)} class names for a model with {num_classes} outputs")
    return tuple(value)


def parse_fit(resize: Any, crop_pct: Any) -> tuple[str, float]:
    """How images are fitted to the input (`images.resize`): ``resize`` crop or squash, ``crop_pct`` in (0, 1].

    Raises:
        ValueError: another mode, or a crop_pct that is no number in (0, 1].
    """
    if not isinstance(resize, str) or resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {_kind(resize)}")
    if type(crop_pct) not in (int, float) or not 0.0 < crop_pct <= 1.0:  # NaN fails the comparison
        raise ValueError(f"crop_pct must be a number in (0, 1], got {_kind(crop_pct)}")
    return resize, float(crop_pct)


def _kind(value: Any) -> str:
    """A JSON value for a message: a short scalar as it is (`errors.shown`), a container by its kind alone."""
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return f"a list of {len(value)} items" if value else "an empty list"
    return shown(value)


def _object(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object, got {'nothing' if key not in parent else _kind(value)}")
    return value


def _model_config(args: dict[str, Any]) -> ModelConfig:
    unknown = sorted(args.keys() - MODEL_FIELDS)
    if unknown:
        raise ValueError(f"unknown model argument {shown(unknown[0])}")
    return ModelConfig(**args)  # each field's type and range checked (ConfigError, with the value shortened)


def parse_export_config(raw: Any) -> ExportConfig:
    """An export's ``config.json`` (version 3 or 2, or 0.1's version 1) as an `ExportConfig`; every value is checked.

    Raises:
        ValueError, ConfigError: not a gmlp-vision export config, or an invalid one (the message says which value).
    """
    if not isinstance(raw, dict):
        raise ValueError(f"not a JSON object but {_kind(raw)}")
    ours = raw.get("gmlp_vision")
    timm_weights, stats = False, None
    if isinstance(ours, dict) and ours.get("format") == FORMAT and _is_int(ours.get("version"), VERSION):
        model, timm_weights = _object(ours, "model"), True
        stats = (_statistics(ours, "pixel_mean"), _statistics(ours, "pixel_std"))
        classes, precision = raw.get("label_names"), ours.get("precision", "fp32")
        resize, crop_pct = _fit(_object(raw, "pretrained_cfg"))
    elif isinstance(ours, dict) and ours.get("format") == FORMAT and _is_int(ours.get("version"), OUR_VERSION):
        model, classes, precision = _object(raw, "model_args"), raw.get("label_names"), ours.get("precision", "fp32")
        resize, crop_pct = _fit(_object(raw, "pretrained_cfg"))
    elif raw.get("format") == FORMAT and _is_int(raw.get("version"), 1):
        model, classes, precision = _object(raw, "model"), raw.get("classes"), raw.get("precision", "fp32")
        resize, crop_pct = raw.get("resize", "crop"), raw.get("crop_pct", 1.0)
    else:
        raise ValueError(f"not a {FORMAT} config (version {VERSION}, {OUR_VERSION} or 1)")
    resize, crop_pct = parse_fit(resize, crop_pct)
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {_kind(precision)}")
    config = _model_config(model)
    if stats is not None and not all(len(values) == config.in_chans for values in stats):
        raise ValueError(f"pixel_mean and pixel_std must hold {config.in_chans} values each")
    if timm_weights:
        _same_for_timm(raw, ours, config, stats)
    classes = parse_classes(classes, config.num_classes)
    return ExportConfig(config, classes, precision, resize, crop_pct, timm_weights, stats)


def _same_for_timm(raw: dict[str, Any], ours: dict[str, Any], config: ModelConfig, stats: Any) -> None:
    """A version 3 config's timm side must say what its gmlp_vision side says: the same network, the same input.

    Raises:
        ValueError: naming the first value that disagrees.
    """
    timm = timm_architecture(config)
    if ours.get("weights") != "timm":
        raise ValueError(f"gmlp_vision.weights must be 'timm' in version {VERSION}, got {_kind(ours.get('weights'))}")
    if not isinstance(timm, tuple) or (raw.get("architecture"), raw.get("model_args")) != timm:
        raise ValueError("architecture and model_args do not describe the model under gmlp_vision.model")
    pretrained = raw.get("pretrained_cfg", {})
    for key, values in zip(("mean", "std"), stats, strict=True):
        given = pretrained.get(key)
        ok = isinstance(given, list) and len(given) == len(values) and all(map(_plain_number, given))
        if not (ok and all(abs(g * 255 - v) <= 1e-6 * max(1.0, abs(v)) for g, v in zip(given, values, strict=True))):
            raise ValueError(f"pretrained_cfg.{key} must be gmlp_vision.pixel_{key}/255")


def _plain_number(value: Any) -> bool:
    """A JSON number that is a finite float (or an int a float holds exactly)."""
    return (type(value) is float and math.isfinite(value)) or (type(value) is int and abs(value) < 2**53)


def _fit(pretrained: dict[str, Any]) -> tuple[Any, Any]:
    """``--resize`` and ``crop_pct`` from a ``pretrained_cfg`` (checked by `parse_fit` after)."""
    modes = {mode: name for name, mode in CROP_MODES.items()}
    crop_mode = pretrained.get("crop_mode")
    if not isinstance(crop_mode, str) or crop_mode not in modes:
        raise ValueError(f"crop_mode must be one of {', '.join(modes)}, got {_kind(crop_mode)}")
    return modes[crop_mode], pretrained.get("crop_pct", 1.0)


def timm_fit(pretrained: Any) -> tuple[str, float]:
    """``--resize`` and ``crop_pct`` from the ``pretrained_cfg`` of timm's own config.json (no ``crop_mode``: centre).

    Raises:
        ValueError: no object, or a mode or crop_pct we do not have.
    """
    if not isinstance(pretrained, dict):
        raise ValueError(f"pretrained_cfg must be an object, got {_kind(pretrained)}")
    return parse_fit(*_fit({"crop_mode": "center", **pretrained}))


def _statistics(ours: dict[str, Any], key: str) -> tuple[float, ...]:
    """Per-channel pixel statistics: a list of finite numbers (positive for ``pixel_std``), at most 64."""
    value = ours.get(key)
    ok = isinstance(value, list) and 1 <= len(value) <= 64
    ok = ok and all(_plain_number(v) and (key == "pixel_mean" or v > 0) for v in value)
    if not ok:
        raise ValueError(
            f"{key} must be a list of finite numbers, one per channel{'' if key == 'pixel_mean' else ' > 0'}"
        )
    return tuple(float(v) for v in value)


def _is_int(value: Any, expected: int) -> bool:
    return type(value) is int and value == expected  # not True for 1, nor 2.0 for 2


__all__ = [
    "ARCHITECTURE",
    "FORMAT",
    "PRECISIONS",
    "VERSION",
    "ExportConfig",
    "hub_config",
    "parse_classes",
    "parse_export_config",
    "parse_fit",
    "timm_fit",
]
