"""Image inputs: files (opened defensively), PIL images, numpy arrays and tensors as (C, H, W) 0..255 pixels.

Channels: image files and numpy arrays go through Pillow's ``convert``: to ``RGB`` for 3-channel models and ``L`` for
1-channel models (ITU-R 601-2 luma). An alpha channel is simply dropped, not composited (the colour values stored under
transparent pixels are kept), as ``PIL.Image.convert`` and torchvision do; palette images with transparency go
through ``RGBA`` first. Animated GIF/WebP: the first frame. Tensors get the same rules: alpha dropped, gray repeated
to RGB, RGB to luma with Pillow's weights.

High-bit images are scaled to 8 bits, not clipped as ``convert`` would: 16-bit modes (``I;16``, ``I;16L``,
``I;16B``, ``I;16N``: 16-bit grayscale PNG and TIFF) by their range, ``round(v * 255 / 65535)``; ``I`` (32-bit
integers: 16-bit PNGs in older Pillows, signed or 32-bit TIFFs) as 16-bit values too, clamped to 0..65535, since
16-bit data is what the accepted formats decode into it; ``F`` (float TIFF) by the smallest of the ranges 0..1,
0..255 and 0..65535 that holds its largest value (a float file says nothing of its range; these are the usual ones),
negatives and NaN as 0, larger values as 255. Pillow itself reduces 16-bit RGB(A) files to 8 bits per channel.

Image files are opened defensively: only the formats in `ALLOWED_FORMATS` (PNG, JPEG, WebP, BMP, GIF, TIFF; phone
JPEGs that Pillow opens as MPO too), recognised by content whatever the file's name, so that no other Pillow plugin
(EPS, which runs Ghostscript, among them) ever sees a file; at most `MAX_IMAGE_PIXELS` pixels (checked from the
header, before decoding), Pillow's ``DecompressionBombWarning`` turned into an error, truncated files refused; every
failure is an `ImageError` naming the file. Folders and glob patterns expand to image files with `expand_inputs`.
"""

from __future__ import annotations

import glob
import io
import math
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from gmlp_vision.errors import ConfigError, ImageError

# Pillow's opener IDs, the only plugins a file is offered to. No "MPO": it has no opener of its own (naming it makes
# Pillow raise KeyError); the JPEG opener returns the MPO files (format "MPO") that many phones write.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 Mpx (8192 x 8192): far above any photo we classify at 32 px, far below a bomb
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of Pillow's "L" conversion
RESIZE_MODES = ("crop", "squash")  # how a non-square image becomes square (`resize`; the --resize choices)
ImageInput = str | Path | bytes | Image.Image | np.ndarray | Tensor


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


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A high-bit single-channel image (``I;16*``, ``I``, ``F``) as ``L``, scaled by its range (see the module doc)."""
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        peak = values.max(initial=0.0)
        top = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
        values = np.clip(np.rint(values * np.float32(255.0 / top)), 0, 255)
    else:  # round(v * 255 / 65535) == (v + 128) // 257 for integers, exactly, without floats
        values = (np.clip(np.asarray(image), 0, 65535).astype(np.int32, copy=False) + 128) // 257
    return Image.fromarray(values.astype(np.uint8))


def convert(image: Image.Image, channels: int) -> Image.Image:
    """A Pillow image in the mode for ``channels`` (``RGB`` or ``L``; alpha dropped, high-bit scaled: module doc)."""
    mode = _target_mode(channels)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8_bits(image)  # Pillow's convert would clip these to 0..255
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow wants transparent palettes expanded before dropping alpha
    return image if image.mode == mode else image.convert(mode)


def pil_to_tensor(image: Image.Image, channels: int) -> Tensor:
    """A Pillow image (current frame) as (C, H, W) uint8 with ``channels`` channels (alpha dropped, see module doc)."""
    image = convert(image, channels)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).reshape(image.height, image.width, channels).permute(2, 0, 1)


@contextmanager
def open_image(
    source: str | Path | bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None
) -> Iterator[Image.Image]:
    """An image file, or an image's bytes (an upload), opened defensively (first frame), for reading inside the block.

    Only `ALLOWED_FORMATS` are recognised (by content), the header is checked before anything is decoded, and
    every failure inside the block (decoding happens there) becomes an `ImageError` naming the file (or ``name``,
    for bytes: ``"the uploaded image"`` by default).

    Raises:
        ImageError: missing, not an image of an allowed format, truncated or corrupt, or more than ``max_pixels``
            pixels.
    """
    if isinstance(source, bytes):
        shown, opened = name or "the uploaded image", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image not found: {path}" if not path.exists() else f"{path} is not a file")
        shown, opened = str(path), path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened, formats=ALLOWED_FORMATS) as image:
                if image.width * image.height > max_pixels:
                    raise ImageError(
                        f"{shown}: {image.width}x{image.height} is more than {max_pixels:,d} pixels "
                        "(refused as a possible decompression bomb)"
                    )
                if image.format == "PNG":
                    _check_png_chunks(source if isinstance(source, bytes) else Path(source).read_bytes(), shown)
                image.seek(0)
                yield image
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{shown}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{shown} is not an image file of an accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error...: all "corrupt"
        raise ImageError(f"cannot read image {shown}: {e or type(e).__name__}") from None


def _check_png_chunks(data: bytes, shown: str) -> None:
    """Verify every chunk's CRC-32: Pillow skips the image data's (IDAT), so a flipped bit there can decode silently.

    Raises:
        ImageError: a chunk whose CRC does not match, or chunks that run past the end of the file.
    """
    pos = 8  # after the signature, which Pillow checked
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise ImageError(f"cannot read image {shown}: a PNG chunk runs past the end of the file (truncated)")
        if zlib.crc32(data[pos + 4 : end]) != struct.unpack(">I", data[end : end + 4])[0]:
            raise ImageError(f"cannot read image {shown}: a PNG chunk fails its CRC check (the file is damaged)")
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        pos = end + 4
    raise ImageError(f"cannot read image {shown}: the PNG file ends without its IEND chunk (truncated)")


def load_image(
    source: str | Path | bytes, channels: int = 3, *, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None
) -> Tensor:
    """Read an image file, or an image's bytes, (first frame) as (C, H, W) uint8 with ``channels`` channels.

    Args:
        source: a PNG, JPEG (MPO too), WebP, BMP, GIF or TIFF file, or its bytes, recognised by content whatever its
            name; 16-bit and float images are scaled to 8 bits (see the module doc).
        channels: 3 for RGB, 1 for grayscale.
        max_pixels: refuse images whose header declares more pixels than this, before decoding them.
        name: what messages call bytes (default ``"the uploaded image"``).

    Raises:
        ImageError: missing, not an image of an accepted format, truncated or corrupt, or too large; the message
            names the file.
    """
    with open_image(source, max_pixels=max_pixels, name=name) as image:
        return pil_to_tensor(image, channels)


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


def check_resize(mode: str, crop_pct: float) -> None:
    """Raise `ConfigError` unless ``mode`` is one of `RESIZE_MODES` and ``crop_pct`` is in (0, 1]."""
    if mode not in RESIZE_MODES:
        raise ConfigError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    if not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"--crop-pct must be in (0, 1], got {crop_pct!r}")


def resized_shape(height: int, width: int, size: int, *, mode: str = "crop", crop_pct: float = 1.0) -> tuple[int, int]:
    """The (height, width) an image is resized to before its centre ``size`` x ``size`` crop (see `resize`).

    Raises:
        ConfigError: an unknown ``mode`` or a ``crop_pct`` outside (0, 1].
    """
    check_resize(mode, crop_pct)
    target = math.floor(size / crop_pct)  # timm's scale_size
    if mode == "squash":
        return target, target
    if height <= width:  # torchvision's Resize(int): the longer side in proportion, rounded down
        return target, int(target * width / height)
    return int(target * height / width), target


def resize(images: Tensor, size: int, *, mode: str = "crop", crop_pct: float = 1.0) -> Tensor:
    """Images (B, C, H, W) of any height and width as ``size`` x ``size`` inputs: the one rule everywhere.

    ``crop`` (timm's evaluation transform): the shorter side is resized to ``floor(size / crop_pct)``, the longer in
    proportion, then the centre ``size`` x ``size`` is cut out, so the aspect ratio is kept. ``squash``: both sides
    to ``floor(size / crop_pct)``, then the centre crop (timm's ``squash``); at ``crop_pct`` 1 a plain resize, which
    stretches a non-square image. A square image comes out the same either way at ``crop_pct`` 1, and images already
    ``size`` x ``size`` are returned as they are whatever ``crop_pct`` (used whole, as training used them: CIFAR).

    Bilinear with half-pixel centres; shrinking is antialiased (a plain bilinear shrink of a photo to 32 px aliases
    badly). Training, evaluation, the data loaders and prediction all resize through this function, so they agree.

    Raises:
        ConfigError: an unknown ``mode`` or a ``crop_pct`` outside (0, 1].
        ImageError: an image so elongated that it would exceed `MAX_IMAGE_PIXELS` once resized.
    """
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    scaled = resized_shape(height, width, size, mode=mode, crop_pct=crop_pct)
    if scaled[0] * scaled[1] > MAX_IMAGE_PIXELS:  # a 1-pixel-high strip would otherwise become gigabytes
        raise ImageError(
            f"a {width}x{height} image is too elongated to resize to {scaled[1]}x{scaled[0]} and centre-crop "
            "(pass --resize squash)"
        )
    x = images.float()
    if scaled != (height, width):
        x = F.interpolate(x, size=scaled, mode="bilinear", align_corners=False, antialias=True)
    top, left = (int(round((n - size) / 2.0)) for n in scaled)  # torchvision's CenterCrop offsets
    return x[..., top : top + size, left : left + size].contiguous()


def resize_uint8(
    image: Tensor, size: int, *, mode: str = "crop", crop_pct: float = 1.0, source: str | Path | None = None
) -> Tensor:
    """One (C, H, W) image `resize`d to ``size`` x ``size`` and rounded back to uint8: how image files are stored.

    Raises:
        ImageError: as `resize`, naming ``source`` (the file) when given.
    """
    try:
        x = resize(image[None].float(), size, mode=mode, crop_pct=crop_pct)
    except ImageError as e:
        raise ImageError(f"{source}: {e}" if source is not None else str(e)) from None
    return x[0].round().clamp(0, 255).to(torch.uint8)
