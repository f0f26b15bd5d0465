"""Reading what ``gmlp export`` writes: the safetensors folder (weights + ``config.json``) and ONNX graphs.

`predict` loads these as it loads checkpoints, so a deployed file classifies images exactly as `gmlp predict` on
the run does: a safetensors folder (``config.json`` in this version's layout or 0.1's, `hub`) rebuilds the PyTorch
model; an ``.onnx`` file (fp32 or int8) runs in onnxruntime on the CPU, with the class names, image size and channels
the export stored in its metadata. Both also store how images are fitted to the input (``resize``, ``crop_pct``:
`images.resize`); exports written before those were stored get the defaults, crop and 1.0. ``onnxruntime`` is
optional (``pip install 'gmlp-vision[onnx]'``) and imported only when an ONNX file is loaded.

An export may come from anywhere, so nothing in it is trusted: each file must be a regular file under a size cap
(`untrusted.read_regular_file`); every value of ``config.json`` is checked (`hub.parse_export_config`); the weights
must be float32 tensors of exactly the shapes the config describes, checked before the model is built; and an ONNX
graph's input and output must match its metadata before it first runs (`OnnxModel`). Each failure is a one-line
`CheckpointError` whose names are terminal-safe (`errors.printable`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from gmlp_vision.config.checks import MAX_IMAGE_SIZE
from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.errors import CheckpointError, ConfigError, ExportError, first_line, one_line, printable, shown
from gmlp_vision.hub import ExportConfig, parse_classes, parse_export_config, parse_fit
from gmlp_vision.model import check_weights_fit
from gmlp_vision.timm_layout import timm_to_gmlp
from gmlp_vision.untrusted import JSON_LIMIT, read_json_file, read_regular_file

ONNX_EXTRA = "pip install 'gmlp-vision[onnx]'"
WEIGHTS_LIMIT = 8 << 30  # model.safetensors: gMLP-B is 0.3 GB
ONNX_LIMIT = 2 << 30  # an ONNX file: protobuf's own limit (larger graphs keep their weights in external files)
MAX_CHANNELS = 64  # image channels an ONNX graph's metadata may claim (gmlp-vision reads 1 or 3)
WEIGHT_DTYPE = torch.float32  # every tensor export writes: the state dict, its normalisation buffers included
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_.]{1,200}")  # state-dict keys: blocks.0.sgu.proj.weight
_NOT_EXPORTED = ": pass a folder written by `gmlp export --format safetensors`"


def read_safetensors_config(folder: str | Path) -> tuple[ModelConfig, tuple[str, ...]]:
    """The model config and class names of an `export.export_safetensors` folder.

    Raises:
        CheckpointError: ``config.json`` is missing, of another format, or invalid.
    """
    config = read_export_config(folder)
    return config.model, config.classes


def read_export_config(folder: str | Path) -> ExportConfig:
    """What ``config.json`` of an export folder says (`hub`: this version's layout or 0.1's), every value checked.

    Raises:
        CheckpointError: ``config.json`` is missing, not a regular file, over `JSON_LIMIT`, of another format, or
            invalid.
    """
    path = Path(folder) / "config.json"
    raw = read_json_file(path, JSON_LIMIT, _NOT_EXPORTED)
    try:
        return parse_export_config(raw)
    except (ValueError, TypeError, ConfigError) as e:
        raise CheckpointError(
            f"{printable(path)} is not a valid gmlp-vision export config: {printable(first_line(e))}"
        ) from None


def load_export(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Any, ExportConfig]:
    """The model (a `model.GMLP`, in eval mode on ``device``) and the config of an export folder, each read once.

    Raises:
        CheckpointError: the folder's files are missing, not regular files, damaged, or do not fit together.
    """
    from gmlp_vision.model import GMLP

    config = read_export_config(folder)
    weights = Path(folder) / "model.safetensors"
    state = _float_weights(read_regular_file(weights, WEIGHTS_LIMIT, _NOT_EXPORTED), printable(weights))
    if config.timm_weights:  # timm's names, and the pixel statistics in config.json (`hub`, version 3)
        state = _from_timm(state, config, printable(weights))
    check_weights_fit(config.model, state, printable(weights))  # before building: the config could ask for any size
    model = GMLP(config.model)
    model.load_state_dict(state)
    return model.to(device).eval(), config


def _from_timm(state: dict[str, Tensor], config: ExportConfig, where: str) -> dict[str, Tensor]:
    """An export's timm-named weights under our names, with the pixel statistics its config.json holds.

    Raises:
        CheckpointError: a stem kernel that is no Conv2d kernel.
    """
    if config.pixel_stats is None:
        raise CheckpointError(f"{where}: its config.json holds no pixel statistics")
    try:
        state = timm_to_gmlp(state)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    mean, std = config.pixel_stats
    return {
        **state,
        "pixel_mean": torch.tensor(mean, dtype=WEIGHT_DTYPE),
        "pixel_std": torch.tensor(std, dtype=WEIGHT_DTYPE),
    }


def load_safetensors(folder: str | Path, device: str | torch.device = "cpu") -> Any:
    """Rebuild the model (a `model.GMLP`) of an `export.export_safetensors` folder, in eval mode on ``device``.

    Raises:
        CheckpointError: the folder's files are missing, not regular files, damaged, or do not fit together.
    """
    return load_export(folder, device)[0]


def _float_weights(data: bytes, where: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file's bytes, refused unless each is float32 under a state-dict name."""
    try:
        state = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read {where}: {_reason(e)}") from None
    for key, value in state.items():
        if not _TENSOR_NAME.fullmatch(key):
            raise CheckpointError(f"{where} holds a tensor named {shown(key)}, which no gmlp-vision model has")
        if value.dtype != WEIGHT_DTYPE:  # load_state_dict would cast it silently: int64 weights, bool buffers
            raise CheckpointError(
                f"{where} holds {key} as {str(value.dtype).removeprefix('torch.')}; gmlp-vision weights are all "
                "float32 (as `gmlp export` writes them)"
            )
    return state


def safetensors_precision(folder: str | Path) -> str:
    """The ``--precision`` the exported model was trained (and is evaluated) in."""
    return read_export_config(folder).precision


def _reason(error: BaseException, limit: int = 300) -> str:
    """A library's error message on one terminal-safe line; a long one keeps its start and its end."""
    text = printable(one_line(error)) or type(error).__name__
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2 :]}"


class OnnxModel:
    """An exported ONNX graph (``gmlp export``, fp32 or int8) run by onnxruntime on the CPU.

    Called like the PyTorch model: float (B, C, S, S) raw pixels in 0..255 at ``image_size`` -> float32 logits. The
    class names, image size and channels come from the metadata the export wrote, and ``resize`` and ``crop_pct``
    (how images are fitted to the input) too when it wrote them (older exports: crop, 1.0).

    Nothing in the file is trusted: it is read as a regular file of at most `ONNX_LIMIT` bytes, with no weights in
    external files; the metadata must hold a list of class names and sane sizes; and the graph's one input
    ``pixels`` and its output ``logits`` must have the shapes the metadata implies, all before the graph first runs.
    A run that fails (a graph that allocates too much, or cannot take the input) or gives logits of another shape,
    NaN or infinity, is a `CheckpointError`. A graph with a fixed batch size runs the images in batches of that size.

    Raises:
        ExportError: onnxruntime is not installed.
        CheckpointError: the file is not an ONNX graph written by ``gmlp export``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        where = printable(self.path)
        data = read_regular_file(self.path, ONNX_LIMIT, ": pass a checkpoint, a run directory, or an export")
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError(f"running an ONNX file needs onnxruntime, which is not installed: {ONNX_EXTRA}") from None
        _refuse_external_data(data, where)
        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: our one-line errors say what failed, not onnxruntime's log
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            meta = dict(self.session.get_modelmeta().custom_metadata_map)
        except Exception as e:  # onnxruntime raises its own error types for files that are not ONNX graphs
            raise CheckpointError(f"cannot load {where} as an ONNX graph: {_reason(e)}") from None
        self.classes, self.image_size, self.in_chans, self.resize, self.crop_pct = _onnx_metadata(meta, where)
        self.batch = _check_signature(self.session, self.classes, (self.in_chans, self.image_size), where)

    def __call__(self, pixels: Tensor) -> Tensor:
        """Float32 logits of a (B, C, S, S) batch, on the CPU."""
        x = pixels.detach().to("cpu", torch.float32).numpy()
        step = self.batch or max(len(x), 1)
        parts = [self._run(x[start : start + step]) for start in range(0, len(x), step)]
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, len(self.classes))

    def _run(self, x: np.ndarray) -> np.ndarray:
        where, n = printable(self.path), len(x)
        if self.batch is not None and n < self.batch:  # a fixed-batch graph: the last batch padded with zeros
            x = np.concatenate([x, np.zeros((self.batch - n, *x.shape[1:]), np.float32)])
        try:
            out = self.session.run(["logits"], {"pixels": x})[0]
        except Exception as e:  # onnxruntime's error types: a graph that cannot run on this input, or out of memory
            raise CheckpointError(f"{where} failed in onnxruntime: {_reason(e)}") from None
        want = (len(x), len(self.classes))
        if not isinstance(out, np.ndarray) or out.shape != want:
            got = tuple(out.shape) if isinstance(out, np.ndarray) else type(out).__name__
            raise CheckpointError(f"{where} gave logits of shape {got} for {want[0]} images of {want[1]} classes")
        out = out[:n].astype(np.float32)
        if not np.isfinite(out).all():
            raise CheckpointError(f"{where} gave NaN or infinite logits; the graph is broken")
        return out


def _onnx_metadata(meta: Mapping[str, str], where: str) -> tuple[tuple[str, ...], int, int, str, float]:
    """Class names, image size, channels, resize and crop_pct from an ONNX graph's metadata, each checked."""
    for key in ("classes", "image_size", "in_chans"):
        if key not in meta:
            raise CheckpointError(f"{where} has no gmlp export metadata (no {key!r}); export it with `gmlp export`")
    try:
        try:
            classes = parse_classes(json.loads(meta["classes"]))
        except RecursionError:
            raise ValueError("the class names are nested too deeply") from None
        except json.JSONDecodeError:
            raise ValueError(f"the class names are not JSON: {shown(meta['classes'])}") from None
        image_size = _metadata_int(meta, "image_size", MAX_IMAGE_SIZE)
        in_chans = _metadata_int(meta, "in_chans", MAX_CHANNELS)
        crop_pct = meta.get("crop_pct", "1.0")
        try:
            crop_pct = float(crop_pct)
        except ValueError:
            pass  # parse_fit refuses the string, shortened
        resize, crop_pct = parse_fit(meta.get("resize", "crop"), crop_pct)
    except ValueError as e:
        raise CheckpointError(
            f"{where} has invalid gmlp export metadata: {printable(e)}; export it again with `gmlp export`"
        ) from None
    return classes, image_size, in_chans, resize, crop_pct


def _metadata_int(meta: Mapping[str, str], key: str, high: int) -> int:
    text = meta[key]
    if not re.fullmatch(r"[0-9]{1,9}", text) or not 1 <= int(text) <= high:
        raise ValueError(f"{key} must be an integer in 1..{high:,}, got {shown(text)}")
    return int(text)


def _check_signature(session: Any, classes: tuple[str, ...], chw: tuple[int, int], where: str) -> int | None:
    """Check the graph's input and output against its metadata; its fixed batch size, or None for any.

    The graph must take one float input ``pixels`` (B, C, S, S) and give a float output ``logits`` (B, the number of
    classes). A dimension the graph leaves open (a name, or unknown) is checked by `OnnxModel` when it runs.
    """
    inputs = session.get_inputs()
    if [i.name for i in inputs] != ["pixels"]:
        names = ", ".join(shown(i.name, 40) for i in inputs[:4]) or "none"
        raise CheckpointError(f"{where} must take one input, 'pixels', not {names}; export it with `gmlp export`")
    logits = next((o for o in session.get_outputs() if o.name == "logits"), None)
    if logits is None:
        raise CheckpointError(f"{where} has no output named 'logits'; export it with `gmlp export`")
    chans, size = chw
    expected = [
        ("input 'pixels'", inputs[0], (None, chans, size, size)),
        ("output 'logits'", logits, (None, len(classes))),
    ]
    for what, arg, dims in expected:
        shape = list(arg.shape or [])
        if arg.type != "tensor(float)" or not _fits(shape, dims):
            need = ", ".join("B" if d is None else str(d) for d in dims)
            raise CheckpointError(
                f"{where} does not match its metadata: its {what} is {_shape_text(arg.type, shape)}; "
                f"{len(classes)} classes of {chans} x {size} x {size} images need float32 ({need})"
            )
    batch = inputs[0].shape[0]
    return batch if isinstance(batch, int) else None


def _fits(shape: list[Any], dims: tuple[int | None, ...]) -> bool:
    """Whether an ONNX shape fits ``dims`` (None: any size): the same rank, and each fixed dimension the same."""
    return len(shape) == len(dims) and all(
        not isinstance(got, int) or (got >= 1 if want is None else got == want)
        for got, want in zip(shape, dims, strict=True)
    )


def _shape_text(kind: str, shape: list[Any]) -> str:
    dtype = "float32" if kind == "tensor(float)" else shown(kind, 30)
    return f"{dtype} ({', '.join(str(d) if isinstance(d, int) else '?' for d in shape)})"


def _refuse_external_data(data: bytes, where: str) -> None:
    """Refuse a graph that keeps tensors in other files: onnxruntime would read them from the working directory.

    ``gmlp export`` never writes such graphs. Without the ``onnx`` package the check is left to onnxruntime, which
    still refuses files outside the working directory.
    """
    try:
        import onnx
    except ImportError:
        return
    try:
        graphs = [onnx.load_model_from_string(data).graph]
    except Exception as e:  # protobuf's DecodeError and friends
        raise CheckpointError(f"cannot load {where} as an ONNX graph: {_reason(e)}") from None
    while graphs:
        graph = graphs.pop()
        tensors = [*graph.initializer, *(s.values for s in graph.sparse_initializer)]
        for attr in (a for node in graph.node for a in node.attribute):
            tensors += [attr.t, *attr.tensors]
            graphs += [attr.g, *attr.graphs] if attr.HasField("g") or attr.graphs else []
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
            raise CheckpointError(f"{where} keeps weights in external files, which gmlp-vision does not read")
