"""Classify image files, PIL images, numpy arrays and tensors with a trained checkpoint.

Every input becomes (C, H, W) uint8-valued pixels with the model's channels, is resized with `augment.resize` (the one
resize training and evaluation use), batched, and run through the model in eval mode; the model normalises with the
statistics stored in it, so prediction sees exactly what `evaluate` sees.

Channels: image files and numpy arrays go through Pillow's ``convert``: to ``RGB`` for 3-channel models and ``L`` for
1-channel models (ITU-R 601-2 luma). An alpha channel is simply dropped, not composited (the colour values stored under
transparent pixels are kept), as ``PIL.Image.convert`` and torchvision do; palette images with transparency go
through ``RGBA`` first. Animated GIF/WebP: the first frame. Tensors get the same rules: alpha dropped, gray repeated
to RGB, RGB to luma with Pillow's weights.

Image files are opened defensively: at most `MAX_IMAGE_PIXELS` pixels (checked from the header, before decoding),
Pillow's ``DecompressionBombWarning`` turned into an error, truncated files refused; every failure is an `ImageError`
naming the file.
"""

from __future__ import annotations

import glob
import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from gmlp_vision.augment import resize
from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.errors import CheckpointError, ConfigError, ImageError
from gmlp_vision.model import GMLP
from gmlp_vision.train import infer

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 Mpx (8192 x 8192): far above any photo we classify at 32 px, far below a bomb
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of Pillow's "L" conversion
ImageInput = str | Path | Image.Image | np.ndarray | Tensor


@dataclass(frozen=True)
class ClassScore:
    """One class and its softmax probability."""

    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first; ``index``/``name``/``probability`` are the top-1's."""

    source: str  # the file path, or "<input N>" for in-memory images
    top_k: tuple[ClassScore, ...]

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
        """A JSON-ready dict: source, top-1 index/name/probability, and the top-k list."""
        top = [{"index": s.index, "name": s.name, "probability": s.probability} for s in self.top_k]
        return {"image": self.source, **top[0], "top_k": top}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or for a run directory the checkpoint its results.json names (else best.pt).

    Raises:
        CheckpointError: the run directory's results.json cannot be read.
    """
    p = Path(path)
    if not p.is_dir():
        return p
    results = p / "results.json"
    if not results.is_file():
        return p / "best.pt"
    try:
        name = json.loads(results.read_text()).get("final_checkpoint", "best.pt")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot read {results}: {e}") from None
    return p / str(name)


def expand_inputs(args: Iterable[str | Path]) -> list[Path]:
    """Image files named by ``args``: files as given, folders searched recursively, glob patterns expanded.

    Folders and patterns yield only files with an image extension (`IMAGE_EXTENSIONS`), sorted; a file named
    explicitly is kept whatever its extension (its content decides). Duplicates are dropped, order kept.

    Raises:
        ImageError: an argument that is missing or matches no image file.
    """
    out: dict[Path, None] = {}
    for arg in args:
        text = str(arg)
        path = Path(text)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ImageError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {path}")
        elif path.exists():
            found = [path]
        elif any(c in text for c in "*?["):
            matches = (Path(m) for m in sorted(glob.glob(text, recursive=True)))
            found = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                raise ImageError(f"no image files match {text}")
        else:
            raise ImageError(f"image not found: {text}")
        out.update(dict.fromkeys(found))
    return list(out)


def _target_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise ImageError(f"a model with {channels} input channels cannot read images (1: grayscale, 3: RGB)")
    return "L" if channels == 1 else "RGB"


def pil_to_tensor(image: Image.Image, channels: int) -> Tensor:
    """A Pillow image (current frame) as (C, H, W) uint8 with ``channels`` channels (alpha dropped, see module doc)."""
    mode = _target_mode(channels)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow wants transparent palettes expanded before dropping alpha
    if image.mode != mode:
        image = image.convert(mode)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).reshape(image.height, image.width, channels).permute(2, 0, 1)


def load_image(path: str | Path, channels: int = 3, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """Read an image file (first frame) as (C, H, W) uint8 with ``channels`` channels.

    Args:
        path: any format Pillow reads (PNG, JPEG, WebP, BMP, GIF, TIFF, ...), recognised by content.
        channels: 3 for RGB, 1 for grayscale.
        max_pixels: refuse images whose header declares more pixels than this, before decoding them.

    Raises:
        ImageError: missing, not an image, truncated or corrupt, or too large; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > max_pixels:
                    raise ImageError(
                        f"{path}: {image.width}x{image.height} is more than {max_pixels:,d} pixels "
                        "(refused as a possible decompression bomb)"
                    )
                image.seek(0)
                return pil_to_tensor(image, channels)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file Pillow can read") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error...: all "corrupt"
        raise ImageError(f"cannot read image {path}: {e or type(e).__name__}") from None


def array_to_tensor(array: np.ndarray, channels: int) -> Tensor:
    """A uint8 numpy image, (H, W) grayscale or (H, W, C) with C in 1, 3, 4, as (C, H, W) uint8 via Pillow."""
    ok_shape = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if array.dtype != np.uint8 or not ok_shape:
        raise ImageError(
            f"numpy images must be uint8 (H, W) or (H, W, C) with C in 1, 3, 4; got {array.dtype} {array.shape}"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return pil_to_tensor(Image.fromarray(np.ascontiguousarray(array)), channels)


def tensor_images(images: Tensor, channels: int) -> list[Tensor]:
    """A (C, H, W) or (B, C, H, W) tensor of 0..255 pixels (C in 1, 3, 4) as a list of (channels, H, W) tensors.

    Raises:
        ImageError: another shape or dtype, or float pixels that look scaled to 0..1.
    """
    x = images[None] if images.ndim == 3 else images
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4) or not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise ImageError(
            f"tensor images must be (C, H, W) or (B, C, H, W), C in 1, 3, 4, uint8 or float 0..255; "
            f"got {x.dtype} {tuple(images.shape)} (numpy arrays are (H, W, C))"
        )
    if x.is_floating_point() and x.numel() and x.max() <= 1.0 and bool((x != x.round()).any()):
        raise ImageError("float tensor images must hold raw 0..255 pixels; these look scaled to 0..1 (multiply by 255)")
    _target_mode(channels)
    x = x[:, :3]  # alpha dropped, as for files
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        weights = torch.tensor(LUMA, device=x.device)[:, None, None]
        x = (x.float() * weights).sum(dim=1, keepdim=True)
    return list(x)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Classifier:
    """A trained gMLP ready to classify images; see the module docstring for what inputs become.

    Args:
        model: the model (put in eval mode; its device is used).
        classes: class names, one per output.
        precision: ``fp32`` or ``bf16``, as `evaluate` takes it.
        batch_size: images decoded and run per forward pass.
        max_pixels: the largest image file accepted, in pixels.
    """

    def __init__(
        self,
        model: GMLP,
        classes: Sequence[str],
        *,
        precision: str = "fp32",
        batch_size: int = 64,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        if len(classes) != model.cfg.num_classes:
            raise CheckpointError(f"{len(classes)} class names for a model with {model.cfg.num_classes} outputs")
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be a positive integer, got {batch_size}")
        self.model = model.eval()
        self.classes = tuple(classes)
        self.precision = precision
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", *, precision: str | None = None, batch_size: int = 64
    ) -> Classifier:
        """Load a checkpoint file, or a run directory's final checkpoint (results.json), onto ``device``.

        Raises:
            CheckpointError: the checkpoint is missing, damaged or not a gmlp-vision checkpoint.
        """
        ckpt = load_checkpoint(resolve_checkpoint(path))
        model = ckpt.build_model(device)
        return cls(model, ckpt.classes, precision=precision or ckpt.config.precision, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        channels = self.model.cfg.in_chans
        if isinstance(item, (str, Path)):
            return load_image(item, channels, max_pixels=self.max_pixels)
        if isinstance(item, Image.Image):
            return pil_to_tensor(item, channels)
        if isinstance(item, np.ndarray):
            return array_to_tensor(item, channels)
        if isinstance(item, Tensor):
            return tensor_images(item, channels)[0]
        raise ImageError(f"cannot classify a {type(item).__name__}: pass a path, PIL image, numpy array or tensor")

    def preprocess(self, images: Sequence[ImageInput]) -> Tensor:
        """Load and resize a list of single images to one (B, C, S, S) float batch on the model's device."""
        size = self.model.cfg.image_size
        return torch.cat([resize(self._load(x).to(self.device)[None].float(), size) for x in images])

    def logits(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """Float32 logits (B, num_classes) on the CPU, one row per image, computed ``batch_size`` images at a time."""
        return self._logits([x for _, x in self._flatten(images)])

    @torch.no_grad()
    def _logits(self, items: list[ImageInput]) -> Tensor:
        parts = [infer(self.model, self.preprocess(c), self.precision).cpu() for c in _chunks(items, self.batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, len(self.classes))

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 5) -> list[Prediction]:
        """The ``top_k`` most probable classes of each image (one `Prediction` per image, in input order).

        Args:
            images: one image or a list of them: file paths, PIL images, numpy arrays (H, W[, C]) uint8, tensors
                (C, H, W) or (B, C, H, W) in 0..255; any size (each is resized to the model's input size).
            top_k: how many classes to return per image (at most the number of classes).

        Raises:
            ImageError: an input cannot be read or has an unusable shape; the message names it.
            ConfigError: ``top_k`` below 1.
        """
        if top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {top_k}")
        flat = self._flatten(images)
        probs = self._logits([x for _, x in flat]).softmax(dim=1)
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [
            Prediction(
                src, tuple(ClassScore(int(i), self.classes[int(i)], float(p)) for p, i in zip(v, ix, strict=True))
            )
            for (src, _), v, ix in zip(flat, values.tolist(), indices.tolist(), strict=True)
        ]
