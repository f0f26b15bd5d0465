"""Streamed image folders: files decoded batch by batch in worker processes, for sets too large to hold decoded.

`ImageFiles` stands in for a split's uint8 image tensor. It supports the few tensor operations the training and
evaluation code applies to a split (``len``, slicing, ``tensor_split``, ``split`` into decoded batches, ``to``), so
the same loop trains from memory or from files. Training batches come from `ImageFiles.batches`: a
``torch.utils.data.DataLoader`` whose workers open each file defensively (`images.open_image`), take a random-resized
crop when asked (JPEGs are decoded at a reduced DCT scale when the crop allows: several times faster on large photos),
and resize to the model's input size; the per-batch flip and zoom then run on the training device. Training without
crops and evaluation decode each whole image and fit it to the input size exactly as in-memory folders and prediction
do (`images.resize`: centre crop or squash, the ``resize`` and ``crop_pct`` options).

Every crop is drawn from a generator keyed to (seed, step, position in the global batch), so a run's crops do not
depend on the number of workers or processes, and a resumed run draws the same ones. An unreadable file found while
streaming raises a `DataError` naming it, or with ``skip_bad`` is left out of its batch (training) or replaced by a
black image (evaluation), with a warning.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from gmlp_vision.errors import DataError, ImageError
from gmlp_vision.images import convert, load_image, open_image, pil_to_tensor, resize_uint8

log = logging.getLogger(__name__)
RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of random-resized crops (the usual one)
SKIP_BAD_HINT = "pass --skip-bad-images to leave such files out"


def bad_image_error(error: ImageError | str) -> DataError:
    """The `DataError` for an unreadable image file met without ``skip_bad``, in memory or streamed: with the hint."""
    return DataError(f"{error} ({SKIP_BAD_HINT})")


def crop_box(width: int, height: int, min_scale: float, rng: random.Random) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(left, top, w, h)`` inside a ``width`` x ``height`` image.

    As torchvision's ``RandomResizedCrop``: area fraction ~ U(min_scale, 1) and log aspect (the box's width / height in
    the file's own pixels, whatever the file's shape) ~ U(log 3/4, log 4/3), up to 10 tries; then the largest centred
    box whose aspect is within that range. The box is then resized to the square input.
    """
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height
    if aspect < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif aspect > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_crop(path: str, size: int, min_scale: float, key: int, channels: int = 3) -> Tensor:
    """A random-resized crop of the file at ``path``: (channels, size, size) uint8, its randomness keyed by ``key``."""
    rng = random.Random(key)
    with open_image(path) as image:
        width, height = image.size
        left, top, w, h = crop_box(width, height, min_scale, rng)
        # JPEG (phones' MPO too) decodes at 1/2, 1/4 or 1/8 scale: the crop keeps >= size pixels.
        if image.format in ("JPEG", "MPO") and min(w, h) >= 2 * size:
            image.draft(
                "RGB" if channels == 3 else "L",
                (math.ceil(width * size / min(w, h)), math.ceil(height * size / min(w, h))),
            )
        fx, fy = image.size[0] / width, image.size[1] / height
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        crop = convert(image, channels).resize((size, size), Image.Resampling.BILINEAR, box=box)
        return pil_to_tensor(crop, channels)


def decode_whole(path: str, size: int, *, resize: str = "crop", crop_pct: float = 1.0, channels: int = 3) -> Tensor:
    """The whole image at ``path`` fitted to (channels, size, size) uint8 (`images.resize_uint8`), as in memory."""
    return resize_uint8(load_image(path, channels), size, mode=resize, crop_pct=crop_pct, source=path)


class _Decoder(TorchDataset):
    """Decodes ``(index, key)`` items: key None for a whole image, else the random key of a crop."""

    def __init__(self, paths: Sequence[str], size: int, min_scale: float, fit: tuple[str, float, int]) -> None:
        self.paths, self.size, self.min_scale, self.fit = paths, size, min_scale, fit

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int | None]) -> tuple[Tensor, str]:
        index, key = item
        try:
            path = self.paths[index]
            if key is None:
                image = decode_whole(path, self.size, resize=self.fit[0], crop_pct=self.fit[1], channels=self.fit[2])
            else:
                image = decode_crop(path, self.size, self.min_scale, key, self.fit[2])
            return image, ""
        except ImageError as e:  # reported by the training process, which knows whether to skip it
            return torch.zeros(self.fit[2], self.size, self.size, dtype=torch.uint8), str(e)


class ImageFiles:
    """A split's images as files, decoded on demand to (channels, size, size) uint8 (see the module doc).

    ``resize`` and ``crop_pct`` fit whole images to the size (`images.resize`); ``min_scale`` is the area fraction of
    the smallest random-resized crop; ``channels`` 3 reads RGB, 1 grayscale (Pillow's L).
    """

    def __init__(
        self,
        paths: Sequence[str],
        size: int,
        *,
        workers: int = 4,
        skip_bad: bool = False,
        min_scale: float = 0.08,
        resize: str = "crop",
        crop_pct: float = 1.0,
        channels: int = 3,
    ) -> None:
        self.paths, self.size, self.workers, self.skip_bad = list(paths), size, workers, skip_bad
        self.min_scale, self.fit = min_scale, (resize, crop_pct, channels)  # how a file becomes pixels
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:  # noqa: D102
        return (len(self.paths), self.fit[2], self.size, self.size)

    def _like(self, paths: Sequence[str]) -> ImageFiles:
        resize, crop_pct, channels = self.fit
        other = ImageFiles(
            paths,
            self.size,
            workers=self.workers,
            skip_bad=self.skip_bad,
            min_scale=self.min_scale,
            resize=resize,
            crop_pct=crop_pct,
            channels=channels,
        )
        other._warned = self._warned  # parts of one split warn once about a file between them
        return other

    def __getitem__(self, key: int | slice) -> Tensor | ImageFiles:
        """An int: that image decoded; a slice: the files it selects."""
        if isinstance(key, slice):
            return self._like(self.paths[key])
        return self._decode_checked(int(key))

    def subset(self, indices: Tensor) -> ImageFiles:
        """The files at ``indices``, still undecoded."""
        return self._like([self.paths[int(i)] for i in indices])

    def tensor_split(self, sections: int) -> list[ImageFiles]:
        """``sections`` contiguous parts whose sizes differ by at most one (as `torch.tensor_split`)."""
        base, extra = divmod(len(self), sections)
        bounds = [k * base + min(k, extra) for k in range(sections + 1)]
        return [self._like(self.paths[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]

    def to(self, *args: object, **kwargs: object) -> ImageFiles:
        """Files stay files; each decoded batch is moved to the device where it is used."""
        return self

    def split(self, batch_size: int) -> Iterator[Tensor]:
        """Every image in order, whole and resized, in decoded batches of ``batch_size`` (workers prefetch)."""
        order = torch.arange(len(self))
        for images, _ in self.batches([part.tolist() for part in order.split(batch_size)]):
            yield images

    def batches(
        self, index_batches: Sequence[Sequence[int]], keys: Sequence[Sequence[int]] | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Decode the given batches of file indices in order: (uint8 images, bool mask of the readable ones).

        Args:
            index_batches: file indices, one list per batch.
            keys: per image, the random key of its random-resized crop; None: whole images, no crop.

        Raises:
            DataError: an unreadable file (without ``skip_bad``).
        """
        if keys is None:
            items = [[(int(i), None) for i in batch] for batch in index_batches]
        else:
            items = [
                [(int(i), int(k)) for i, k in zip(b, ks, strict=True)]
                for b, ks in zip(index_batches, keys, strict=True)
            ]
        loader = DataLoader(
            _Decoder(self.paths, self.size, self.min_scale, self.fit),
            batch_sampler=items,
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.workers else None,
            generator=torch.Generator().manual_seed(0),  # its own: drawing worker seeds must not move the global RNG
        )
        for images, errors in loader:
            ok = torch.tensor([not e for e in errors], dtype=torch.bool)
            for error in filter(None, errors):
                if not self.skip_bad:
                    raise bad_image_error(error)
                if error not in self._warned:  # once per file, not every epoch
                    self._warned.add(error)
                    log.warning("skipped %s", error)
            yield images, ok

    def _decode_checked(self, index: int) -> Tensor:
        image, error = _Decoder(self.paths, self.size, self.min_scale, self.fit)[(index, None)]
        if error and not self.skip_bad:
            raise bad_image_error(error)
        return image


STATS_SAMPLE = 10_000  # streamed folders: images the normalisation statistics are computed from


def stats_sample(images: Tensor | ImageFiles, seed: int) -> Tensor | ImageFiles:
    """All training images in memory; a fixed random sample of `STATS_SAMPLE` streamed files."""
    if isinstance(images, Tensor) or len(images) <= STATS_SAMPLE:
        return images
    return images.subset(torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE])
