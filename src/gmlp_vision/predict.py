"""Classify image files, PIL images, numpy arrays and tensors with a trained model: a checkpoint, or an export.

`Classifier.load` takes what training and ``gmlp export`` write: a checkpoint (``best.pt``), a run directory, an
export folder (``model.safetensors`` + ``config.json``, or ``model.onnx``), or an ``.onnx`` file (run by onnxruntime,
`artifacts.OnnxModel`).

Every input becomes (C, H, W) pixels with the model's channels (`gmlp_vision.images`: Pillow conversion, alpha
dropped, decompression-bomb and truncation checks). An image at the model's input size is used as it is; any other
is fitted by `images.resize_uint8` with the run's ``--resize`` and ``--crop-pct`` (by default the shorter side is
resized and the centre cropped, keeping the aspect ratio), exactly as image folders are stored for training and
evaluation. The batch runs through the model in eval mode; the model normalises with the statistics stored in it, so
prediction sees exactly what `evaluate` sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gmlp_vision.artifacts import OnnxModel, load_export
from gmlp_vision.checkpoint import load_checkpoint, resolve_checkpoint
from gmlp_vision.errors import CheckpointError, ConfigError, ImageError
from gmlp_vision.evaluate import check_tta, infer, tta_views
from gmlp_vision.fetch import fetch, hub_id
from gmlp_vision.images import (
    MAX_IMAGE_PIXELS,
    ImageInput,
    array_to_tensor,
    check_resize,
    load_image,
    pil_to_tensor,
    resize_uint8,
    tensor_images,
)
from gmlp_vision.metrics import top_classes
from gmlp_vision.model import GMLP
from gmlp_vision.precision import precision_named


@dataclass(frozen=True)
class ClassScore:
    """One class and its softmax probability."""

    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first; ``index``/``name``/``probability`` are the top-1's.

    An image that could not be read (``predict(..., skip_bad=True)``) has no classes and says why in ``error``.
    """

    source: str  # the file path, or "<input N>" for in-memory images
    top_k: tuple[ClassScore, ...]
    error: str | None = None

    @property
    def index(self) -> int:
        return self.top_k[0].index

    @property
    def name(self) -> str:
        return self.top_k[0].name

    @property
    def probability(self) -> float:
        return self.top_k[0].probability

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: source, top-1 index/name/probability, and the top-k list (or source and error)."""
        if self.error is not None:
            return {"image": self.source, "error": self.error}
        top = [{"index": s.index, "name": s.name, "probability": s.probability} for s in self.top_k]
        return {"image": self.source, **top[0], "top_k": top}


def _is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("results.json", "best.pt", "last.pt"))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Classifier:
    """A trained gMLP ready to classify images; see the module docstring for what inputs become.

    Args:
        model: the model (put in eval mode; its device is used), or an exported ONNX graph (`artifacts.OnnxModel`).
        classes: class names, one per output.
        precision: ``fp32``, ``bf16`` or ``fp16``, as `evaluate` takes it.
        batch_size: images decoded and run per forward pass.
        max_pixels: the largest image file accepted, in pixels.
        resize: how images of another size are fitted to the input: ``crop`` or ``squash`` (`images.resize`).
        crop_pct: the share of the resized image the centre crop keeps (timm's ``crop_pct``).
        tta: test-time augmentation, ``none``, ``flip`` or ``flip-shift`` (`evaluate.tta_views`): each image's
            probabilities come from the mean logits of its views.
    """

    def __init__(
        self,
        model: GMLP | OnnxModel,
        classes: Sequence[str],
        *,
        precision: str = "fp32",
        batch_size: int = 64,
        max_pixels: int = MAX_IMAGE_PIXELS,
        resize: str = "crop",
        crop_pct: float = 1.0,
        tta: str = "none",
    ) -> None:
        outputs = len(model.classes) if isinstance(model, OnnxModel) else model.cfg.num_classes
        if len(classes) != outputs:
            raise CheckpointError(f"{len(classes)} class names for a model with {outputs} outputs")
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be a positive integer, got {batch_size}")
        check_resize(resize, crop_pct)
        check_tta(tta)
        try:
            precision_named(precision)
        except ValueError as e:
            raise ConfigError(f"--{e}") from None
        self.model = model if isinstance(model, OnnxModel) else model.eval()
        self.image_size = model.image_size if isinstance(model, OnnxModel) else model.cfg.image_size
        self.in_chans = model.in_chans if isinstance(model, OnnxModel) else model.cfg.in_chans
        self.classes = tuple(classes)
        self.precision = precision
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.resize, self.crop_pct, self.tta = resize, crop_pct, tta

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        *,
        precision: str | None = None,
        batch_size: int = 64,
        tta: str = "none",
    ) -> Classifier:
        """Load what training or ``gmlp export`` wrote (see the module docstring); ONNX graphs run on the CPU.

        ``path`` may also be a Hugging Face Hub id of an export (`fetch.hub_id`: ``ORG/NAME`` or ``hf-hub:ORG/NAME``),
        fetched into huggingface_hub's cache once and read from there after (offline too).

        Raises:
            CheckpointError: nothing loadable there, or a missing, damaged or foreign file; a Hub id that cannot be
                fetched (no huggingface_hub, offline without the cache, no such model).
            ExportError: an ONNX file without onnxruntime installed.
        """
        repo = hub_id(path)
        p = fetch(repo, "MODEL") if repo is not None else Path(path)
        if p.is_dir() and os.path.lexists(p / "model.safetensors"):  # a device or a FIFO there is refused, not passed
            model, config = load_export(p, device)
            return cls(
                model,
                config.classes,
                precision=precision or config.precision,
                batch_size=batch_size,
                resize=config.resize,
                crop_pct=config.crop_pct,
                tta=tta,
            )
        onnx = p / "model.onnx" if p.is_dir() and not _is_run_dir(p) else p
        options = dict(batch_size=batch_size, tta=tta)
        if onnx.suffix == ".onnx":
            graph = OnnxModel(onnx)  # a missing file: "not found"; anything but a regular file: refused
            return cls(graph, graph.classes, resize=graph.resize, crop_pct=graph.crop_pct, **options)
        if p.suffix == ".safetensors":
            return cls.load(p.parent, device, precision=precision, **options)
        return cls.from_checkpoint(p, device, precision=precision, **options)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        *,
        precision: str | None = None,
        batch_size: int = 64,
        tta: str = "none",
    ) -> Classifier:
        """Load a checkpoint file, or a run directory's final checkpoint (results.json), onto ``device``.

        Raises:
            CheckpointError: the checkpoint is missing, damaged or not a gmlp-vision checkpoint.
        """
        ckpt = load_checkpoint(resolve_checkpoint(path))
        cfg = ckpt.config  # checkpoints from before --resize load with its defaults (crop, 1.0)
        return cls(
            ckpt.build_model(device),
            ckpt.classes,
            precision=precision or cfg.run.precision,
            batch_size=batch_size,
            resize=cfg.data.resize,
            crop_pct=cfg.data.crop_pct,
            tta=tta,
        )

    @property
    def device(self) -> torch.device:
        """Where the images are prepared: the model's device (the CPU for an ONNX graph)."""
        return torch.device("cpu") if isinstance(self.model, OnnxModel) else next(self.model.parameters()).device

    def _flatten(self, images: ImageInput | Sequence[ImageInput]) -> list[tuple[str, ImageInput]]:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        out: list[tuple[str, ImageInput]] = []
        for item in items:
            if isinstance(item, Tensor) and item.ndim == 4:
                out += [(f"<input {len(out) + i}>", x) for i, x in enumerate(item)]
            else:
                out.append((str(item) if isinstance(item, (str, Path)) else f"<input {len(out)}>", item))
        return out

    def _load(self, item: ImageInput) -> Tensor:
        channels = self.in_chans
        if isinstance(item, (str, Path, bytes)):  # bytes: an image file's content (an upload)
            return load_image(item, channels, max_pixels=self.max_pixels)
        if isinstance(item, Image.Image):
            return pil_to_tensor(item, channels)
        if isinstance(item, np.ndarray):
            return array_to_tensor(item, channels)
        if isinstance(item, Tensor):
            return tensor_images(item, channels)[0]
        raise ImageError(f"cannot classify a {type(item).__name__}: pass a path, PIL image, numpy array or tensor")

    def preprocess(self, images: Sequence[ImageInput]) -> Tensor:
        """Load and fit a list of single images to one (B, C, S, S) float batch on the model's device.

        An image at the input size is used as it is; any other is fitted by `images.resize_uint8` (rounded to whole
        0..255 values, as an image folder stores it), so a file gets the logits `evaluate` computes for it.
        """
        return torch.cat([self._fit(x) for x in images])

    def _fit(self, item: ImageInput) -> Tensor:
        x = self._load(item).to(self.device)
        size = self.image_size
        if x.shape[-2:] == (size, size):
            return x[None].float()
        source = item if isinstance(item, (str, Path)) else None
        fitted = resize_uint8(x, size, mode=self.resize, crop_pct=self.crop_pct, source=source)
        return fitted[None].float()

    @torch.no_grad()
    def probabilities(self, pixels: Tensor) -> Tensor:
        """Softmax probabilities (B, num_classes), float32 on the CPU, of a batch `preprocess` made: one model run."""
        return self._run(pixels).float().softmax(dim=1).cpu()

    def logits(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """Float32 logits (B, num_classes) on the CPU, one row per image, computed ``batch_size`` images at a time."""
        return self._logits([x for _, x in self._flatten(images)])

    @torch.no_grad()
    def _logits(self, items: list[ImageInput]) -> Tensor:
        parts = [self._run(self.preprocess(c)).cpu() for c in _chunks(items, self.batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, len(self.classes))

    def _run(self, pixels: Tensor) -> Tensor:
        if isinstance(self.model, OnnxModel):
            views = tta_views(pixels.float(), self.tta)
            return torch.stack([self.model(v) for v in views]).mean(dim=0) if len(views) > 1 else self.model(pixels)
        return infer(self.model, pixels, self.precision, self.tta)

    def predict(
        self, images: ImageInput | Sequence[ImageInput], top_k: int = 5, skip_bad: bool = False
    ) -> list[Prediction]:
        """The ``top_k`` most probable classes of each image (one `Prediction` per image, in input order).

        Args:
            images: one image or a list of them: file paths, PIL images, numpy arrays (H, W[, C]) uint8, tensors
                (C, H, W) or (B, C, H, W) in 0..255; any size (each is resized to the model's input size).
            top_k: how many classes to return per image (at most the number of classes).
            skip_bad: an input that cannot be read gets a `Prediction` with its ``error`` instead of raising.

        Raises:
            ImageError: an input cannot be read or has an unusable shape (without ``skip_bad``); the message names it.
            ConfigError: ``top_k`` below 1.
        """
        if top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {top_k}")
        flat = self._flatten(images)
        return [p for chunk in _chunks(flat, self.batch_size) for p in self._predict(chunk, top_k, skip_bad)]

    @torch.no_grad()
    def _predict(self, chunk: Sequence[tuple[str, ImageInput]], top_k: int, skip_bad: bool) -> list[Prediction]:
        fitted: list[Tensor] = []
        errors: dict[int, str] = {}
        for i, (_, item) in enumerate(chunk):
            try:
                fitted.append(self._fit(item))
            except ImageError as e:
                if not skip_bad:
                    raise
                errors[i] = str(e)
        ranked = iter(top_classes(self.probabilities(torch.cat(fitted)), top_k) if fitted else [])
        out = []
        for i, (src, _) in enumerate(chunk):
            scores = () if i in errors else tuple(ClassScore(j, self.classes[j], p) for j, p in next(ranked))
            out.append(Prediction(src, scores, errors.get(i)))
        return out


__all__ = ["ClassScore", "Classifier", "Prediction"]
