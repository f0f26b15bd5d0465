"""The dataset kinds by name, and what the config needs of each: the preset it starts from.

A table below the config, the presets and the data registry alike, so that the config can offer and check
``--dataset`` without importing the data package. `data/registry.py` adds each kind's loader and data shape on these
names (tests/test_data.py keeps the two on the same names, in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Kind:
    """A dataset kind as the config sees it (its name is the key in `KINDS`)."""

    preset: str  # the preset `gmlp train --dataset NAME` uses when no --preset is given


KINDS: dict[str, Kind] = {
    "cifar10": Kind(preset="seed"),
    "cifar100": Kind(preset="seed"),
    "digits": Kind(preset="digits"),
    "folder": Kind(preset="general"),
    "csv": Kind(preset="general"),
}
CIFAR_FILES = ("data_batch_1", "batches.meta", "meta", "train", "test")  # in an extracted CIFAR folder
CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")


def kind_of_data(data: Any) -> str | None:
    """The kind ``--data`` names by itself, when no ``--dataset`` is given, or None.

    ``csv`` for a .csv or .tsv file; ``folder`` for a folder of folders that holds no CIFAR files, archives or
    extracted CIFAR folders (CIFAR's own are files).
    """
    if not isinstance(data, str) or not data:
        return None
    path = Path(data).expanduser()
    if path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        return "csv"
    try:
        if not path.is_dir() or any((path / name).is_file() for name in CIFAR_FILES):
            return None
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    except OSError:
        return None
    if any(p.name in CIFAR_FOLDERS or p.name.endswith(".tar.gz") for p in entries):
        return None
    return "folder" if any(p.is_dir() for p in entries) else None
