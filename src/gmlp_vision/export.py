"""Ship a trained checkpoint: ONNX (checked against PyTorch with onnxruntime, optionally int8) and safetensors.

The ONNX graph, exported in eval mode with the TorchScript-based exporter (``dynamo=False``: it needs only ``onnx``):

- input ``pixels``: float32 (B, C, S, S) raw pixels in 0..255 at the model's image size S. Resizing is NOT in the
  graph: fit images first (`gmlp_vision.images.resize` with the stored ``resize`` and ``crop_pct``, what training
  used). The batch axis is dynamic by default.
- the per-channel normalisation is inside the graph (the model's buffers), exactly as in PyTorch.
- output ``logits``: float32 (B, num_classes); softmax them for probabilities.
- the graph computes in fp32 whatever ``--precision`` trained the model: bf16 and fp16 runs keep fp32 master weights,
  so their fp32 graph is exact, runs on every onnxruntime provider, and ``--check`` compares it with fp32 PyTorch.
- metadata properties: ``classes`` (JSON list), ``image_size``, ``in_chans``, ``resize`` (crop or squash),
  ``crop_pct``, ``producer`` (gmlp-vision version).

int8: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations quantised per batch at run time) of
every MatMul/Gemm; for CPU inference. ``benchmarks/bench_export.py`` measures its speed and accuracy.

safetensors: ``model.safetensors`` (the state dict, normalisation buffers included) and ``config.json`` in timm's Hub
layout (`hub`: the model arguments, class names, input size, ``crop_pct`` and crop mode, precision); `load_safetensors`
rebuilds the model from the folder alone. ``gmlp export`` also writes a ``README.md`` model card (`card`).

``onnx``/``onnxruntime`` are optional (``pip install 'gmlp-vision[onnx]'``) and imported inside the functions.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from gmlp_vision.artifacts import (  # reading exports lives there; re-exported for `gmlp_vision.export` callers
    ONNX_EXTRA,
    SAFETENSORS_FORMAT,
    SAFETENSORS_VERSION,
    load_safetensors,
    read_safetensors_config,
)
from gmlp_vision.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint, usual_file_mode
from gmlp_vision.errors import ExportError
from gmlp_vision.evaluate import infer
from gmlp_vision.files import write_text
from gmlp_vision.hub import ExportConfig, hub_config
from gmlp_vision.images import resize
from gmlp_vision.model import GMLP


def _require(name: str) -> ModuleType:
    """Import an optional ONNX dependency, or say which extra installs it."""
    try:
        return __import__(name)
    except ImportError:
        raise ExportError(f"ONNX export needs {name}, which is not installed: {ONNX_EXTRA}") from None


def default_export_dir(checkpoint: str | Path) -> Path:
    """``export/`` next to the checkpoint (inside the run directory for ``best.pt``/``last.pt`` or a run directory)."""
    return resolve_checkpoint(checkpoint).parent / "export"


def _legacy_exporter() -> dict[str, Any]:
    """``dynamo=False`` where torch has the switch (2.5+, where the dynamo exporter needing onnxscript is default)."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def _set_metadata(proto: Any, model: GMLP, ckpt: Checkpoint) -> None:
    from gmlp_vision.version import __version__

    values = {
        "classes": json.dumps(list(ckpt.classes)),
        "image_size": str(model.cfg.image_size),
        "in_chans": str(model.cfg.in_chans),
        "resize": ckpt.config.data.resize,
        "crop_pct": repr(ckpt.config.data.crop_pct),
        "producer": f"gmlp-vision {__version__}",
    }
    del proto.metadata_props[:]
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=value)


def _save_checked(proto: Any, out_path: Path) -> None:
    """Run ``onnx.checker`` on ``proto`` and write it atomically to ``out_path``."""
    onnx = _require("onnx")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # onnx raises ValidationError and friends
        raise ExportError(f"the exported graph fails onnx.checker: {e}") from None
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    onnx.save(proto, tmp)
    os.replace(tmp, out_path)


def export_onnx(checkpoint: str | Path, out_path: str | Path, *, opset: int = 17, dynamic_batch: bool = True) -> Path:
    """Export a checkpoint (file or run directory) to ONNX; see the module docstring for the graph's contract.

    Args:
        checkpoint: a checkpoint file, or a run directory (its final checkpoint per results.json).
        out_path: the ``.onnx`` file to write (its folder is created).
        opset: ONNX opset version (17 has LayerNormalization).
        dynamic_batch: a dynamic batch axis; else the graph takes exactly one image.

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
        ExportError: onnx is missing, or the graph fails ``onnx.checker``.
    """
    onnx = _require("onnx")
    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
    model = ckpt.build_model("cpu")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    size, chans = model.cfg.image_size, model.cfg.in_chans
    example = torch.full((1, chans, size, size), 128.0)
    axes = {"pixels": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    tmp = out_path.with_name(f".{out_path.name}.export.tmp")
    try:
        with warnings.catch_warnings():
            # The legacy exporter's deprecation notice; and the trace turns the model's input-size check into a
            # constant, which is right for a graph whose input size is fixed.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                opset_version=opset,
                input_names=["pixels"],
                output_names=["logits"],
                dynamic_axes=axes,
                do_constant_folding=True,
                **_legacy_exporter(),
            )
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    _set_metadata(proto, model, ckpt)
    _save_checked(proto, out_path)
    return out_path


def quantize_onnx(onnx_path: str | Path, out_path: str | Path) -> Path:
    """Dynamic int8 quantisation (weights int8, activations per batch) of an exported model, for CPU inference.

    Raises:
        ExportError: onnxruntime is missing or cannot quantise the graph.
    """
    _require("onnxruntime")
    onnx = _require("onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    source = onnx.load(str(onnx_path))
    tmp = out_path.with_name(f".{out_path.name}.quant.tmp")
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the quantiser logs a line per tensor through the root logger
    try:
        # No `quant_pre_process`: it turns the token-mixing Gemm into a MatMul the quantiser then skips, which made
        # the int8 model ~20 % slower with the same accuracy (benchmarks/bench_export.py, CIFAR-10).
        quantize_dynamic(str(onnx_path), str(tmp), weight_type=QuantType.QInt8)
        proto = onnx.load(str(tmp))
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"cannot quantise {onnx_path}: {e}") from None
    finally:
        logging.disable(previous)
        tmp.unlink(missing_ok=True)
    del proto.metadata_props[:]
    proto.metadata_props.extend(source.metadata_props)
    _save_checked(proto, out_path)
    return out_path


def onnx_session(onnx_path: str | Path, threads: int = 0) -> Any:
    """An onnxruntime CPU ``InferenceSession`` (``threads`` 0: onnxruntime's default)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: no notices on stderr
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {onnx_path}: {str(e).strip()[:300]}") from None


def onnx_logits(session: Any, images: Tensor, batch_size: int = 256) -> Tensor:
    """Float32 logits from an ONNX session for raw pixels (B, C, S, S) already at the model's size."""
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: x.float().contiguous().numpy()})[0] for x in images.split(batch_size)]
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0)


def check_onnx(onnx_path: str | Path, model: GMLP, images: Tensor, *, atol: float | None = 1e-4) -> float:
    """Largest absolute logit difference between onnxruntime and the PyTorch ``model`` on ``images``.

    Args:
        onnx_path: the exported graph.
        model: the PyTorch model it came from (any mode: it is run in eval mode, fp32, on its device).
        images: raw pixels (B, C, H, W), uint8 or float 0..255, any size (resized with `images.resize` first).
        atol: fail above this difference (1e-4 for an fp32 export); None only measures (int8).

    Raises:
        ExportError: onnxruntime is missing, or the difference exceeds ``atol``.
    """
    session = onnx_session(onnx_path)
    x = resize(images.float().cpu(), model.cfg.image_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        expected = torch.cat([infer(model, part.to(device)).cpu() for part in x.split(256)])
    model.train(was_training)
    diff = (onnx_logits(session, x) - expected).abs().max().item()
    if atol is not None and not diff <= atol:
        raise ExportError(f"{onnx_path}: onnxruntime logits differ from PyTorch by {diff:.3g} (> {atol:g})")
    return diff


def export_safetensors(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` (weights and normalisation buffers) and ``config.json`` (`hub`) into ``out_dir``.

    `card.write_model_card` adds the ``README.md`` model card, as ``gmlp export`` does.

    Returns:
        The path of ``model.safetensors``.

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
    """
    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
    model = ckpt.build_model("cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_name(f".{weights.name}.tmp")
    try:
        save_file(state, str(tmp), metadata={"format": SAFETENSORS_FORMAT})
        os.chmod(tmp, usual_file_mode())  # safetensors writes 0600; an export is meant to be shared
        os.replace(tmp, weights)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    data = ckpt.config.data
    export = ExportConfig(model.cfg, tuple(ckpt.classes), ckpt.config.run.precision, data.resize, data.crop_pct)
    config = hub_config(export, model.pixel_mean.tolist(), model.pixel_std.tolist())
    write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return weights


__all__ = [
    "ONNX_EXTRA",
    "SAFETENSORS_FORMAT",
    "SAFETENSORS_VERSION",
    "check_onnx",
    "default_export_dir",
    "export_onnx",
    "export_safetensors",
    "load_safetensors",
    "onnx_logits",
    "onnx_session",
    "quantize_onnx",
    "read_safetensors_config",
]
