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

int8: ``onnxruntime.quantization.quantize_dynamic`` of every MatMul/Gemm, for CPU inference: int8 weights with one
scale per tensor, using 7 bits (``reduce_range``: -64..64), and uint8 activations quantised per batch at run time.
Why 7 bits: onnxruntime multiplies uint8 activations by int8 weights with VNNI where the CPU has it (exact int32
sums), but on AVX2 CPUs and AVX-512 ones without VNNI with ``vpmaddubsw``, which adds two products in int16 and
saturates (2 x 255 x 127 > 32767). With 8-bit weights those CPUs predicted differently; 7-bit ones cannot saturate
(2 x 255 x 64 < 32768), so every x86 CPU computes the same integer sums (measured: the same logits, bit for bit, on
AVX2 and AVX-512 VNNI). Top-1 agreement with fp32 onnxruntime, VNNI / AVX2 (an AVX-512 VNNI AMD EPYC, and QEMU's
AVX2-only EPYC-Rome model run on it): the tests' small model 99 % / 85 % with 8 bits, 99 % / 99 % with 7; CIFAR-10
(the ``benchmarks/bench_export.py`` model, 5,000 test images) 96.4 % / 95.8 % with 8 bits, 96.5 % / 96.5 % with 7,
at the same speed and size. Per-channel scales alone saturated more (79 % on AVX2) and added nothing measurable to
7 bits; uint8 weights, also exact, ran ~20 % slower. ``benchmarks/bench_export.py`` measures speed and accuracy.

safetensors: ``model.safetensors`` (the state dict, normalisation buffers included) and ``config.json`` in timm's Hub
layout (`hub`: the model arguments, class names, input size, ``crop_pct`` and crop mode, precision);
`artifacts.load_safetensors` rebuilds the model from the folder alone. ``gmlp export`` also writes a ``README.md``
model card (`card`).

Writing: each file is written to a temp file of its own beside it, then renamed over it (`files.replacing`), with
the permissions ``open`` gives a new file; so concurrent exports to one place never mix. A place that cannot be
written (a file where a folder goes or the reverse, read-only, full, not allowed) raises ExportError naming it and
saying what to do, and leaves no temp file and no folder made for nothing.

``onnx``/``onnxruntime`` are optional (``pip install 'gmlp-vision[onnx]'``) and imported inside the functions.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from gmlp_vision.artifacts import ONNX_EXTRA
from gmlp_vision.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from gmlp_vision.errors import CheckpointError, ExportError, one_line, printable
from gmlp_vision.evaluate import infer
from gmlp_vision.files import made_folder, replacing, scratch_beside, why_not_written, write_text
from gmlp_vision.hub import FORMAT, ExportConfig, hub_config
from gmlp_vision.images import resize
from gmlp_vision.model import GMLP
from gmlp_vision.timm_layout import gmlp_to_timm, timm_architecture
from gmlp_vision.untrusted import JSON_LIMIT, read_json_file

ELSEWHERE = "export elsewhere with --out"  # the advice closing a write error: where `gmlp export` writes is --out


def _require(name: str) -> ModuleType:
    """Import an optional ONNX dependency, or say which extra installs it."""
    try:
        return __import__(name)
    except ImportError:
        raise ExportError(f"ONNX export needs {name}, which is not installed: {ONNX_EXTRA}") from None


def default_export_dir(checkpoint: str | Path) -> Path:
    """Where a checkpoint's export goes by default: ``export/`` beside the checkpoint its run ships, ``export-NAME/``.

    A run directory, or the file its ``results.json`` names (`checkpoint.resolve_checkpoint`), exports to
    ``RUN_DIR/export``; another checkpoint of a run to ``RUN_DIR/export-last``, ``export-best`` or ``export-ema``, so
    that the exports of one run's checkpoints never share a folder. A checkpoint alone in its folder: ``export/``.
    """
    path = resolve_checkpoint(checkpoint)
    run_files = any((path.parent / name).exists() for name in ("results.json", "best.pt", "last.pt"))
    try:
        shipped = resolve_checkpoint(path.parent) if run_files else path
    except CheckpointError:  # a damaged results.json names nothing: this file is not known to be the shipped one
        shipped = None
    named = shipped is not None and path.name == shipped.name
    return path.parent / ("export" if named else f"export-{path.stem}")


def checkpoint_source(path: Path) -> dict[str, str]:
    """What an export records of its checkpoint: the file's name (``best.pt``, ``last.pt``, ``ema.pt``, ...)."""
    return {"checkpoint": path.name}


def refuse_another_checkpoint(folder: Path, source: dict[str, str]) -> None:
    """Refuse to write into ``folder`` when an export there records another checkpoint than ``source``.

    What is read: ``config.json`` (a safetensors export) and the ``.onnx`` files' metadata (with onnx installed).
    Exports written before 0.3 record no checkpoint, and are written over as before.

    Raises:
        ExportError: naming the folder and the other checkpoint; nothing was written.
    """
    for name in _recorded_checkpoints(folder):
        if name != source["checkpoint"]:
            raise ExportError(
                f"{folder} holds the export of another checkpoint ({printable(name)}); "
                "pass --out with a new path, or remove it first"
            )


def _recorded_checkpoints(folder: Path) -> list[str]:
    """The checkpoint names the exports in ``folder`` record (none for a missing folder or files that say none)."""
    if not folder.is_dir():
        return []
    names = []
    try:
        raw = read_json_file(folder / "config.json", JSON_LIMIT)
        ours = raw.get("gmlp_vision") if isinstance(raw, dict) else None
        names.append(ours.get("checkpoint") if isinstance(ours, dict) else None)
    except (CheckpointError, OSError):  # absent or unreadable: nothing recorded to protect
        pass
    try:
        onnx = __import__("onnx")
    except ImportError:
        onnx = None
    for graph in sorted(folder.glob("*.onnx"))[:16] if onnx is not None else []:
        try:
            proto = onnx.load(str(graph), load_external_data=False)
        except Exception:  # not an ONNX file: nothing recorded
            continue
        names.append(next((p.value for p in proto.metadata_props if p.key == "checkpoint"), None))
    return [n for n in names if isinstance(n, str)]


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError met writing the export file ``path`` (or making its folder) into a one-line ExportError."""
    try:
        yield
    except OSError as e:
        raise ExportError(f"cannot write {path}: {why_not_written(path, e, ELSEWHERE)}") from None


def _file_target(path: Path) -> None:
    """Refuse an export file's path that is an existing folder, before any work."""
    if path.is_dir():
        raise ExportError(f"cannot export to {path}: it is a folder; name a file in it: --out {path / 'model.onnx'}")


def _legacy_exporter() -> dict[str, Any]:
    """``dynamo=False`` where torch has the switch (2.5+, where the dynamo exporter needing onnxscript is default)."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def _set_metadata(proto: Any, model: GMLP, ckpt: Checkpoint, source: dict[str, str]) -> None:
    from gmlp_vision.version import __version__

    values = {
        **source,
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
    """Run ``onnx.checker`` on ``proto`` and write it atomically to ``out_path``, with the usual permissions."""
    onnx = _require("onnx")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # onnx raises ValidationError and friends
        raise ExportError(f"the exported graph fails onnx.checker: {e}") from None
    with _writing(out_path), replacing(out_path) as tmp:
        onnx.save(proto, str(tmp))


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
        ExportError: onnx is missing, the graph fails ``onnx.checker``, or ``out_path`` cannot be written (a folder,
            below a file, read-only, full: the message says which, and nothing is left behind).
    """
    onnx = _require("onnx")
    out_path = Path(out_path)
    _file_target(out_path)
    path = resolve_checkpoint(checkpoint)
    source = checkpoint_source(path)
    refuse_another_checkpoint(out_path.parent, source)
    ckpt = load_checkpoint(path)
    model = ckpt.build_model("cpu")
    size, chans = model.cfg.image_size, model.cfg.in_chans
    example = torch.full((1, chans, size, size), 128.0)
    axes = {"pixels": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with _writing(out_path), made_folder(out_path.parent):
        with scratch_beside(out_path) as tmp, warnings.catch_warnings():
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
        _set_metadata(proto, model, ckpt, source)
        _save_checked(proto, out_path)
    return out_path


def quantize_onnx(onnx_path: str | Path, out_path: str | Path) -> Path:
    """Dynamic int8 quantisation (7-bit weights, activations per batch) of an exported model, for CPU inference.

    See the module docstring for why the weights use 7 of their 8 bits (``reduce_range``).

    Raises:
        ExportError: onnxruntime is missing, cannot quantise the graph, or ``out_path`` cannot be written.
    """
    _require("onnxruntime")
    onnx = _require("onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    _file_target(out_path)
    source = onnx.load(str(onnx_path))
    previous = logging.root.manager.disable
    with _writing(out_path), made_folder(out_path.parent):
        with scratch_beside(out_path) as tmp:
            logging.disable(logging.WARNING)  # the quantiser logs a line per tensor through the root logger
            try:
                # No `quant_pre_process`: it turns the token-mixing Gemm into a MatMul the quantiser then skips,
                # which made the int8 model ~20 % slower with the same accuracy (benchmarks/bench_export.py, CIFAR-10).
                quantize_dynamic(str(onnx_path), str(tmp), weight_type=QuantType.QInt8, reduce_range=True)
                proto = onnx.load(str(tmp))
            except OSError:
                raise  # writing the temp: `_writing` says why
            except Exception as e:
                raise ExportError(f"cannot quantise {onnx_path}: {e}") from None
            finally:
                logging.disable(previous)
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
        ExportError: ``out_dir`` cannot be written (a file, below a file, read-only, full: the message says which;
            no temp file is left behind).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"cannot export to {out_dir}: it is a file, and safetensors go in a folder; {ELSEWHERE}")
    path = resolve_checkpoint(checkpoint)
    source = checkpoint_source(path)
    refuse_another_checkpoint(out_dir, source)
    ckpt = load_checkpoint(path)
    model = ckpt.build_model("cpu")
    weights = out_dir / "model.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if isinstance(timm_architecture(model.cfg), tuple):  # a model timm builds: its names (`hub`, version 3)
        state = gmlp_to_timm(state, model.cfg)
    data = ckpt.config.data
    export = ExportConfig(model.cfg, tuple(ckpt.classes), ckpt.config.run.precision, data.resize, data.crop_pct)
    config = hub_config(export, model.pixel_mean.tolist(), model.pixel_std.tolist(), source)
    with _writing(weights), made_folder(out_dir):
        with replacing(weights) as tmp:  # it keeps the usual permissions: safetensors alone writes 0600
            try:
                save_file(state, str(tmp), metadata={"format": FORMAT})
            except SafetensorError as e:  # how safetensors reports a failed write: "... (os error 28)"
                code = re.search(r"os error (\d+)\)", str(e))
                if code is None:
                    raise ExportError(f"cannot write {weights}: {one_line(e)}") from None
                raise OSError(int(code[1]), os.strerror(int(code[1]))) from None  # `_writing` says why
        with _writing(out_dir / "config.json"):
            write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return weights


__all__ = [
    "check_onnx",
    "checkpoint_source",
    "default_export_dir",
    "export_onnx",
    "export_safetensors",
    "onnx_logits",
    "onnx_session",
    "quantize_onnx",
    "refuse_another_checkpoint",
]
