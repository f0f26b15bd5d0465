"""``--init``: read pretrained weights from a file, timm's gMLP weights (``gmlp_s16_224``) or our own, for `transfer`.

Sits above `checkpoint` and `transfer`: it opens the file (.safetensors, .pth, .bin, or a gmlp checkpoint, validated
as `checkpoint.load_checkpoint` does), puts timm's names into ours (`transfer.timm_to_gmlp`) and hands the weights
to `transfer.fit_pretrained`, which adapts them to the architecture: input channels, patch size, resolution and the
head (see `transfer`'s module docstring).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gmlp_vision.artifacts import read_export_config
from gmlp_vision.checkpoint import FORMAT, checkpoint_from_payload
from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.errors import CheckpointError, first_line
from gmlp_vision.fetch import fetch, hub_id, weights_file
from gmlp_vision.hub import ExportConfig, timm_fit
from gmlp_vision.model import GMLP
from gmlp_vision.timm_layout import is_timm_state, timm_to_gmlp
from gmlp_vision.transfer import TIMM_FIT, Pretrained, Weights, apply_pretrained, fit_pretrained
from gmlp_vision.untrusted import JSON_LIMIT, read_json_file


def read_weights(path: str | Path) -> Weights:
    """Weights from a timm file (.safetensors, .pth, .bin) or a gmlp checkpoint (.pt) or export (.safetensors).

    ``path`` may be a Hugging Face Hub id instead (`fetch.hub_id`: ``timm/gmlp_s16_224.ra3_in1k``,
    ``hf-hub:ORG/NAME``): its weights are fetched into huggingface_hub's cache once, and read from there after.

    Our names come back (`transfer.timm_to_gmlp` for timm's); gmlp files bring their normalisation buffers and class
    names (a checkpoint's, or the ``config.json`` beside an export's weights). gmlp training checkpoints are validated
    as `load_checkpoint` does (format, version, digest), from the one read.

    Raises:
        CheckpointError: no such file, unreadable, or no state dict of tensors.
    """
    repo = hub_id(path)
    path = weights_file(fetch(repo, "--init")) if repo is not None else Path(path)
    if not path.is_file():
        raise CheckpointError(f"--init {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or hostile files raise many kinds; one clear line for all
        raise CheckpointError(f"--init {path}: not a readable weights file ({first_line(e)})") from None
    classes = fit = None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        ckpt = checkpoint_from_payload(state, path)
        state, classes, fit = ckpt.model_state, ckpt.classes, (ckpt.config.data.resize, ckpt.config.data.crop_pct)
    for key in ("state_dict", "model"):  # common wrappers of plain PyTorch checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"--init {path}: holds no state dict of tensors")
    fetched = path if repo is not None else None
    export = _export_config(path) if classes is None else None
    if export is not None:
        classes, fit = export.classes, (export.resize, export.crop_pct)
    if is_timm_state(state):  # timm's file, or an export in timm's layout (its statistics are in config.json)
        kernel = state["stem.proj.weight"]
        channels = int(kernel.shape[1]) if kernel.ndim == 4 else None
        stats = export.pixel_stats if export is not None else None
        mean, std = (torch.tensor(v) for v in stats) if stats is not None else (None, None)
        fit = fit or _timm_fit(path)
        return Weights(timm_to_gmlp(state), mean, std, classes, fetched, channels, fit)
    return Weights(state, state.get("pixel_mean"), state.get("pixel_std"), classes, fetched, fit=fit)


def weights_fit(path: str | Path) -> dict[str, object]:
    """How the images the weights at ``path`` learnt from were fitted, as config values: ``resize``, ``crop_pct``.

    For `config.resolve_config`'s finetune recipe (the pretrained model's own resize, as timm's data config takes
    it); empty where the file does not say (a plain state dict).

    Raises:
        CheckpointError: as `read_weights`.
    """
    fit = read_weights(path).fit
    return {} if fit is None else {"resize": fit[0], "crop_pct": fit[1]}


def _timm_fit(path: Path) -> tuple[str, float]:
    """The fit of timm weights: what the ``config.json`` beside them says (a Hub download has one), else timm's own."""
    try:
        raw = read_json_file(path.parent / "config.json", JSON_LIMIT)
        return timm_fit(raw.get("pretrained_cfg") if isinstance(raw, dict) else None)
    except (CheckpointError, ValueError):  # no config, or not timm's: timm's gmlp_s16_224
        return TIMM_FIT


def _export_config(path: Path) -> ExportConfig | None:
    """What the ``config.json`` beside an export's weights says (None: no export's config there)."""
    if path.suffix != ".safetensors" or not (path.parent / "config.json").is_file():
        return None
    try:
        return read_export_config(path.parent)
    except CheckpointError:
        return None


def read_pretrained(
    path: str | Path, cfg: ModelConfig, *, classes: tuple[str, ...] | None = None, reset_head: bool = False
) -> Pretrained:
    """Read ``path`` and fit it to a model of architecture ``cfg`` (`transfer.fit_pretrained`), touching no model.

    Args:
        classes: the class names the model will learn (a head trained on others is not kept).
        reset_head: never keep the head.

    Raises:
        CheckpointError: unreadable file, or weights of another architecture (width, depth).
    """
    weights = read_weights(path)
    shown = f"{path} ({weights.fetched})" if weights.fetched is not None else path
    return fit_pretrained(weights, cfg, shown, classes=classes, reset_head=reset_head)


def load_pretrained(model: GMLP, path: str | Path, *, classes: tuple[str, ...] | None = None) -> list[str]:
    """Fill ``model`` from ``path``; returns the names left as initialised (the head, for other classes).

    Raises:
        CheckpointError: unreadable file, or weights of another architecture (width, depth).
    """
    return apply_pretrained(model, read_pretrained(path, model.cfg, classes=classes))
