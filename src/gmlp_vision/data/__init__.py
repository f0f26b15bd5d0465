"""Datasets as uint8 tensors (or streamed files): the kinds in `registry`, what they produce in `base`.

Modules: `base` (`Split`, `Dataset`, `LoadOptions`, the cache dir), `registry` (one row per kind, `load_dataset`),
`cifar` (CIFAR-10/100 archives, downloads), `digits` (the embedded 8x8 digits), `folders` (image folders, decoded and
cached), `stream` (image folders decoded per batch by worker processes). The table of kinds loads without torch (the
CLI's parser reads it); the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gmlp_vision.data.registry import DATASET_KINDS, DATASETS, DatasetKind, load_dataset

_BASE = ("Dataset", "LoadOptions", "Split", "default_cache_dir")
__all__ = [
    "DATASETS",
    "DATASET_KINDS",
    "Dataset",
    "DatasetKind",
    "LoadOptions",
    "Split",
    "default_cache_dir",
    "load_dataset",
]

if TYPE_CHECKING:
    from gmlp_vision.data.base import Dataset, LoadOptions, Split, default_cache_dir


def __getattr__(name: str) -> Any:
    if name not in _BASE:
        raise AttributeError(f"module 'gmlp_vision.data' has no attribute {name!r}")
    return getattr(importlib.import_module("gmlp_vision.data.base"), name)
