"""``--init``: read pretrained weights from a file, timm's gMLP weights (``gmlp_s16_224``) or our own, for `transfer`.

Sits above `checkpoint` and `transfer`: it opens the file (.safetensors, .pth, .bin, or a gmlp checkpoint, validated
as `checkpoint.load_checkpoint` does), puts timm's names into ours (`transfer.timm_to_gmlp`) and hands the state dict
to `transfer.fit_pretrained`, which adapts it to the architecture (see `transfer`'s module docstring).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gmlp_vision.checkpoint import FORMAT, checkpoint_from_payload
from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.errors import CheckpointError, first_line
from gmlp_vision.model import GMLP
from gmlp_vision.transfer import Pretrained, apply_pretrained, fit_pretrained, is_timm_state, timm_to_gmlp


def read_state(path: str | Path) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
    """Weights from a timm file (.safetensors, .pth, .bin) or a gmlp checkpoint (.pt) or export (.safetensors).

    Returns the state dict (our names) and, for gmlp files, the normalisation buffers (None for timm). gmlp training
    checkpoints are validated as `load_checkpoint` does (format, version, digest), from the one read.
    """
    path = Path(path)
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
    if isinstance(state, dict) and state.get("format") == FORMAT:
        state = checkpoint_from_payload(state, path).model_state
    for key in ("state_dict", "model"):  # common wrappers of plain PyTorch checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"--init {path}: holds no state dict of tensors")
    if is_timm_state(state):
        return timm_to_gmlp(state), None, None
    return state, state.get("pixel_mean"), state.get("pixel_std")


def read_pretrained(path: str | Path, cfg: ModelConfig) -> Pretrained:
    """Read ``path`` and fit it to a model of architecture ``cfg`` (`transfer.fit_pretrained`), touching no model.

    Raises:
        CheckpointError: unreadable file, or weights of another architecture (width, depth, patch size).
    """
    state, mean, std = read_state(path)
    return fit_pretrained(state, mean, std, cfg, path)


def load_pretrained(model: GMLP, path: str | Path) -> list[str]:
    """Fill ``model`` from ``path``; returns the names left as initialised (the head, for another class count).

    Raises:
        CheckpointError: unreadable file, or weights of another architecture (width, depth, patch size).
    """
    return apply_pretrained(model, read_pretrained(path, model.cfg))
