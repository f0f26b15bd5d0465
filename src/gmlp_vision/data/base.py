"""What every dataset kind produces (`Split`, `Dataset`), the options loaders take, the cache, pixel statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the data, not with this module: the CLI's parser reads the dataset table
    import torch
    from torch import Tensor


@dataclass(frozen=True, eq=False)
class Split:
    """One split: ``images`` (N, C, H, W) uint8, contiguous, channel-major; ``labels`` (N,) int64.

    A streamed image folder holds a `stream.ImageFiles` as ``images``: files decoded on demand, with the operations
    training and evaluation use on the tensor.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named dataset: train and test splits plus the class names in label order.

    ``test_split`` is what the data calls its evaluation split: ``test`` for CIFAR and digits, ``val`` or ``test``
    for an image folder or a table (as the user named it), ``holdout`` where the loader held files out of the training
    data (`layout.hold_out`; ``holdout`` then lists them, relative to the data's folder, for the run to record).
    ``val`` is a validation split of the data's own (a folder with train/, val/ and test/), which training then
    uses instead of a slice of ``train``.
    """

    name: str
    train: Split
    test: Split
    classes: tuple[str, ...]
    test_split: str = "test"
    val: Split | None = None
    holdout: tuple[str, ...] = ()
    layout: str = ""  # how the loader found the splits, for the log ("train/ and val/", ...); empty: the kind's own

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_size(self) -> int:
        """Side of the square images, in pixels."""
        return int(self.train.images.shape[-1])

    @property
    def in_chans(self) -> int:
        """Number of image channels."""
        return int(self.train.images.shape[1])


def default_cache_dir() -> Path:
    """Return ``$GMLP_DATA`` if set, else ``$XDG_CACHE_HOME/gmlp-vision``, else ``~/.cache/gmlp-vision``."""
    if os.environ.get("GMLP_DATA"):
        return Path(os.environ["GMLP_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gmlp-vision"


@dataclass(frozen=True)
class LoadOptions:
    """How to load a dataset; each kind's loader reads the options that concern it (`registry.DATASET_KINDS`)."""

    download: bool = True  # CIFAR: download a missing archive into the cache dir (only when no path is given)
    verify_md5: bool = False  # CIFAR: check a .tar.gz against the official md5 sum
    cache_dir: Path | None = None  # archives and decoded folders; default `default_cache_dir()`
    progress: bool = True  # download or decoding progress bar on stderr
    image_size: int = 32  # folder: the side images are resized to (the other kinds keep their own size)
    skip_bad: bool = False  # folder: leave out unreadable images instead of failing
    folder_mode: str = "auto"  # folder: memory, stream or auto
    workers: int = 4  # folder, streamed: decoding worker processes
    crop_scale: float = 0.08  # folder, streamed: smallest area fraction of a random-resized crop
    resize: str = "crop"  # folder: crop (keep the aspect) or squash, `images.resize`
    crop_pct: float = 1.0  # folder: the share of the resized image `images.resize` keeps
    channels: int = 3  # folder: 3 (RGB) or 1 (grayscale, Pillow's L); the other kinds keep their own
    holdout: float = 0.2  # folder, csv without a test split: the share of each class held out for testing
    holdout_files: tuple[str, ...] | None = None  # folder, csv: a run's recorded hold-out, used instead of drawing one


def channel_stats(images: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population variance of (N, C, H, W) uint8 pixels, accumulated in float64.

    Works through ``chunk`` images at a time, so the temporaries stay small (a few MB) whatever the dataset size.
    """
    import torch

    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    n = 0
    for part in images.split(chunk):
        x = part.float()  # exact for 0..255; squares are exact in fp32 too
        total += x.sum(dim=(0, 2, 3), dtype=torch.float64)
        total_sq += (x * x).sum(dim=(0, 2, 3), dtype=torch.float64)
        n += x.numel() // x.shape[1]
    mean = total / n
    return mean.float(), (total_sq / n - mean * mean).clamp_min(0).float()
