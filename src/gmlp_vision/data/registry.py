"""The dataset kinds: one row each, the only place a kind is named (config choices, presets, CLI and loading read it).

A row names the loader as ``module:function`` and imports it only when that kind is loaded, so this table sits below
the config and the loaders alike. A loader is called as ``loader(name, path, options)`` (`base.LoadOptions`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gmlp_vision.data.base import Dataset, LoadOptions
from gmlp_vision.errors import DataError


@dataclass(frozen=True)
class DatasetKind:
    """One dataset kind: how to load it, the shape of its data where that is fixed, and the preset it starts from."""

    loader: str  # "module:function", imported on first use
    preset: str  # the preset `gmlp train --dataset NAME` uses when no --preset is given
    num_classes: int | None = None  # None: known only from the data (folder datasets)
    in_chans: int | None = None
    help: str = ""


DATASET_KINDS: dict[str, DatasetKind] = {
    "cifar10": DatasetKind("gmlp_vision.data.cifar:load_cifar", "seed", 10, 3, "CIFAR-10 (official python archive)"),
    "cifar100": DatasetKind("gmlp_vision.data.cifar:load_cifar", "seed", 100, 3, "CIFAR-100 (the tutorial's)"),
    "digits": DatasetKind("gmlp_vision.data.digits:load_digits", "digits", 10, 1, "the embedded 8x8 digits"),
    "folder": DatasetKind("gmlp_vision.data.folders:load_folder", "general", help="--data DIR with train/ and val/"),
}
DATASETS = tuple(DATASET_KINDS)


def load_dataset(name: str, path: str | Path | None = None, **options: Any) -> Dataset:
    """Load the dataset kind ``name``: into memory, or for a large image folder as streamed files.

    Args:
        name: One of `DATASETS`.
        path: CIFAR: the official ``.tar.gz``, its extracted folder, or a folder holding either. digits: optionally a
            ``digits.csv(.gz)`` in scikit-learn's format. None: the archive in the cache dir, or the packaged digits.
            folder: the folder holding ``train/`` and ``val/`` or ``test/`` class folders (required).
        **options: fields of `base.LoadOptions` (download, verify_md5, cache_dir, progress, image_size, skip_bad,
            folder_mode, workers, crop_scale); each kind reads the ones that concern it.

    Returns:
        The dataset, both splits as uint8 image (or for a streamed folder `stream.ImageFiles`) and int64 label
        tensors.

    Raises:
        DataError: An unknown name; missing, corrupt, hostile or wrong-kind data; a failed download.
    """
    key = name.lower()
    if key not in DATASET_KINDS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    unknown = set(options) - {f.name for f in fields(LoadOptions)}
    if unknown:
        raise TypeError(f"load_dataset() got unexpected options: {', '.join(sorted(unknown))}")
    module, function = DATASET_KINDS[key].loader.split(":")
    return getattr(importlib.import_module(module), function)(key, path, LoadOptions(**options))
