"""Reading what ``gmlp export`` writes: the safetensors folder (weights + ``config.json``) and ONNX graphs.

`predict` loads these as it loads checkpoints, so a deployed file classifies images exactly as `gmlp predict` on
the run does: a safetensors folder (``config.json`` in this version's layout or 0.1's, `hub`) rebuilds the PyTorch
model; an ``.onnx`` file (fp32 or int8) runs in onnxruntime on the CPU, with the class names, image size and channels
the export stored in its metadata. Both also store how images are fitted to the input (``resize``, ``crop_pct``:
`images.resize`); exports written before those were stored get the defaults, crop and 1.0. ``onnxruntime`` is
optional (``pip install 'gmlp-vision[onnx]'``) and imported only when an ONNX file is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from gmlp_vision.checkpoint import check_weights_fit
from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.errors import CheckpointError, ConfigError, ExportError, first_line
from gmlp_vision.hub import FORMAT, VERSION, ExportConfig, parse_export_config
from gmlp_vision.images import check_resize

ONNX_EXTRA = "pip install 'gmlp-vision[onnx]'"
SAFETENSORS_FORMAT = FORMAT
SAFETENSORS_VERSION = VERSION


def read_safetensors_config(folder: str | Path) -> tuple[ModelConfig, tuple[str, ...]]:
    """The model config and class names of an `export.export_safetensors` folder.

    Raises:
        CheckpointError: ``config.json`` is missing, of another format, or invalid.
    """
    config = read_export_config(folder)
    return config.model, config.classes


def read_export_config(folder: str | Path) -> ExportConfig:
    """What ``config.json`` of an export folder says (`hub`: this version's layout or 0.1's).

    Raises:
        CheckpointError: ``config.json`` is missing, of another format, or invalid.
    """
    path = Path(folder) / "config.json"
    try:
        return parse_export_config(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} not found: pass a folder written by `gmlp export --format safetensors`"
        ) from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{path} is not a valid gmlp-vision export config: {e}") from None


def load_safetensors(folder: str | Path, device: str | torch.device = "cpu") -> Any:
    """Rebuild the model (a `model.GMLP`) of an `export.export_safetensors` folder, in eval mode on ``device``.

    Raises:
        CheckpointError: the folder's files are missing, damaged or do not fit together.
    """
    from gmlp_vision.model import GMLP

    cfg = read_export_config(folder).model
    weights = Path(folder) / "model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    check_weights_fit(cfg, state, str(weights))  # before building: the config alone could ask for any size
    model = GMLP(cfg)
    model.load_state_dict(state)
    return model.to(device).eval()


def safetensors_precision(folder: str | Path) -> str:
    """The ``--precision`` the exported model was trained (and is evaluated) in."""
    return read_export_config(folder).precision


class OnnxModel:
    """An exported ONNX graph (``gmlp export``, fp32 or int8) run by onnxruntime on the CPU.

    Called like the PyTorch model: float (B, C, S, S) raw pixels in 0..255 at ``image_size`` -> float32 logits. The
    class names, image size and channels come from the metadata the export wrote, and ``resize`` and ``crop_pct``
    (how images are fitted to the input) too when it wrote them (older exports: crop, 1.0).

    Raises:
        ExportError: onnxruntime is not installed.
        CheckpointError: the file is not an ONNX graph written by ``gmlp export``.
    """

    def __init__(self, path: str | Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError(f"running an ONNX file needs onnxruntime, which is not installed: {ONNX_EXTRA}") from None
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            self.classes = tuple(str(c) for c in json.loads(meta["classes"]))
            self.image_size, self.in_chans = int(meta["image_size"]), int(meta["in_chans"])
            self.resize, self.crop_pct = meta.get("resize", "crop"), float(meta.get("crop_pct", "1.0"))
            check_resize(self.resize, self.crop_pct)
        except (KeyError, ValueError, TypeError, ConfigError) as e:
            raise CheckpointError(
                f"{self.path} has no gmlp export metadata ({e}); export it with `gmlp export`"
            ) from None
        except Exception as e:  # onnxruntime raises its own error types for files that are not ONNX graphs
            raise CheckpointError(f"cannot load {self.path} as an ONNX graph: {first_line(e)}") from None

    def __call__(self, pixels: Tensor) -> Tensor:
        """Float32 logits of a (B, C, S, S) batch, on the CPU."""
        x = pixels.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(np.asarray(self.session.run(["logits"], {"pixels": x})[0], dtype=np.float32))
