"""Datasets as uint8 tensors (or streamed files): the kinds in `registry`, what they produce in `base`.

Modules: `base` (`Split`, `Dataset`, `LoadOptions`, the cache dir), `registry` (one row per kind, `load_dataset`),
`cifar` (CIFAR-10/100 archives, downloads), `digits` (the embedded 8x8 digits), `folders` (image folders, decoded and
cached), `stream` (image folders decoded per batch by worker processes). Neither `base` nor `registry` imports torch at
load time (the CLI's parser reads the table of kinds); the loaders do.

The package's API is ``__all__``: what callers use of `base` and `registry`, imported from here
(``from gmlp_vision.data import load_dataset``); like `gmlp_vision/__init__.py`, this file re-exports on purpose.
"""

from gmlp_vision.data.base import Dataset, LoadOptions, Split, default_cache_dir
from gmlp_vision.data.registry import DATASET_KINDS, DATASETS, DatasetKind, load_dataset

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
