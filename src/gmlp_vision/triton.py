"""A Triton Inference Server model repository: ``gmlp export --format triton --out REPO [--name NAME]``.

``gmlp export`` writes ``REPO/NAME/1/model.onnx`` (`export.export_onnx`: the graph with a dynamic batch axis) and,
from here, ``REPO/NAME/config.pbtxt``, ``REPO/NAME/labels.txt`` (the class names, one per line, Triton's
classification labels) and ``REPO/NAME/README.md`` (the preprocessing). The config serves the graph with the
``onnxruntime`` backend:

- input ``pixels``: ``TYPE_FP32``, dims ``[C, S, S]`` (the batch axis is Triton's, up to ``max_batch_size``): raw
  pixels 0..255, fitted to S x S as training did (the README says how); the normalisation is inside the graph;
- output ``logits``: ``TYPE_FP32``, dims ``[num_classes]``, with ``labels.txt``; softmax them for probabilities;
- ``dynamic_batching``: requests gathered up to ``max_batch_size``, queued at most ``max_queue_delay_microseconds``.

``tritonclient[grpc]`` (the ``triton`` extra) holds Triton's ``ModelConfig`` message; the tests parse the file as
one. Writing the repository needs only the ``onnx`` extra.
"""

from __future__ import annotations

import re
from pathlib import Path

from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.errors import ConfigError, printable

DELAY_US = 5000  # dynamic batching: how long Triton holds a request for others
NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # what Triton and a file system both take as a model's folder name


def model_name(checkpoint: Path, name: str | None = None) -> str:
    """``name``, checked, or the default: the checkpoint's run directory's name, with ``_`` for other characters.

    A Triton model name here is 1 to 128 of ``[A-Za-z0-9_.-]``.

    Raises:
        ConfigError: a ``name`` Triton would not take.
    """
    if name is None:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", checkpoint.parent.resolve().name)[:128].strip(".") or "gmlp"
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"--name {printable(name)}: a Triton model name is 1 to 128 of A-Z a-z 0-9 _ . -")
    return name


def config_pbtxt(name: str, chans: int, size: int, classes: int, max_batch: int, delay_us: int) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``)."""
    return f"""name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch}
input [
  {{
    name: "pixels"
    data_type: TYPE_FP32
    dims: [ {chans}, {size}, {size} ]
  }}
]
output [
  {{
    name: "logits"
    data_type: TYPE_FP32
    dims: [ {classes} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {delay_us}
}}
"""


def repository_files(
    name: str, mc: ModelConfig, classes: tuple[str, ...], resize: str, crop_pct: float, max_batch: int = 64
) -> dict[str, str]:
    """The text files of the model's folder beside ``1/model.onnx``: ``config.pbtxt``, ``labels.txt``, ``README.md``.

    Raises:
        ConfigError: ``max_batch`` out of 1..65536.
    """
    if not 1 <= max_batch <= 65536:
        raise ConfigError(f"max_batch must be in 1..65536, got {max_batch}")
    chans, size = mc.in_chans, mc.image_size
    return {
        "config.pbtxt": config_pbtxt(name, chans, size, len(classes), max_batch, DELAY_US),
        "labels.txt": "".join(printable(c) + "\n" for c in classes),
        "README.md": _readme(name, resize, crop_pct, size, chans, len(classes)),
    }


def _readme(name: str, resize: str, crop_pct: float, size: int, chans: int, classes: int) -> str:
    side = int(size / crop_pct)
    fit = (
        f"resize the shorter side to {side} px and cut out the centre {size} x {size}"
        if resize == "crop"
        else f"squash the whole image to {side} x {side} and cut out the centre {size} x {size}"
    )
    mode = "RGB" if chans == 3 else "grayscale (Pillow's L)"
    return f"""# {name}: a gMLP image classifier for Triton

`config.pbtxt` serves `1/model.onnx` with the `onnxruntime` backend and dynamic batching.

Preprocessing, on the client: read the image as {mode}; {fit} (antialiased; what `gmlp predict` and training do,
`gmlp_vision.images.resize` with `resize={resize}`, `crop_pct={crop_pct:g}`); send the pixels as float32 in 0..255,
shape `[{chans}, {size}, {size}]` per image, as the input `pixels`. The graph normalises them itself.

Output `logits`: float32 `[{classes}]` per image, in the order of `labels.txt`; softmax gives the probabilities, and
Triton's classification extension (`class_count`) returns the top classes by name.

Written by gmlp-vision's `gmlp export --format triton`.
"""


__all__ = ["DELAY_US", "config_pbtxt", "model_name", "repository_files"]
