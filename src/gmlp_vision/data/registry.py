"""The dataset kinds: one row each, on the names of `kinds.KINDS` (which the config reads), for the CLI and loading.

A row names the loader as ``module:function`` and imports it only when that kind is loaded, so reading this table
loads no loader (nor torch). A loader is called as ``loader(name, path, options)`` (`base.LoadOptions`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gmlp_vision.data.base import Dataset, LoadOptions
from gmlp_vision.errors import DataError
from gmlp_vision.kinds import KINDS


@dataclass(frozen=True)
class DatasetKind:
    """One dataset kind: how to load it and the shape of its data where that is fixed (its preset: `kinds.KINDS`)."""

    loader: str  # "module:function", imported on first use
    num_classes: int | None = None  # None: known only from the data (folder datasets)
    in_chans: int | None = None
    help: str = ""


DATASET_KINDS: dict[str, DatasetKind] = {
    "cifar10": DatasetKind("gmlp_vision.data.cifar:load_cifar", 10, 3, "CIFAR-10 (official python archive)"),
    "cifar100": DatasetKind("gmlp_vision.data.cifar:load_cifar", 100, 3, "CIFAR-100 (the tutorial's)"),
    "digits": DatasetKind("gmlp_vision.data.digits:load_digits", 10, 1, "the embedded 8x8 digits"),
    "folder": DatasetKind("gmlp_vision.data.folders:load_folder", help="--data DIR: class folders, train/ or not"),
    "csv": DatasetKind("gmlp_vision.data.folders:load_table", help="--data FILE.csv/.tsv: path,label[,split] rows"),
}
DATASETS = tuple(KINDS)  # the names the config offers; tests/test_data.py keeps the rows above on the same ones


def load_dataset(name: str, path: str | Path | None = None, **options: Any) -> Dataset:
    """Load the dataset kind ``name``: into memory, or for a large image folder as streamed files.

    Args:
        name: One of `DATASETS`.
        path: CIFAR: the official ``.tar.gz``, its extracted folder, or a folder holding either. digits: optionally a
            ``digits.csv(.gz)`` in scikit-learn's format. None: the archive in the cache dir, or the packaged digits.
            folder: the folder of class folders, with or without ``train/`` and ``val/`` or ``test/`` (required).
            csv: the ``.csv`` or ``.tsv`` table of ``path,label[,split]`` rows (required).
        **options: fields of `base.LoadOptions` (download, verify_md5, cache_dir, progress, image_size, skip_bad,
            folder_mode, workers, crop_scale, resize, crop_pct, channels, holdout, holdout_files); each kind reads the
            ones that concern it.

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
