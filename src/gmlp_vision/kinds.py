"""The dataset kinds by name, and what the config needs of each: the preset it starts from.

A table below the config, the presets and the data registry alike, so that the config can offer and check
``--dataset`` without importing the data package. `data/registry.py` adds each kind's loader and data shape on these
names (tests/test_data.py keeps the two on the same names, in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """A dataset kind as the config sees it (its name is the key in `KINDS`)."""

    preset: str  # the preset `gmlp train --dataset NAME` uses when no --preset is given


KINDS: dict[str, Kind] = {
    "cifar10": Kind(preset="seed"),
    "cifar100": Kind(preset="seed"),
    "digits": Kind(preset="digits"),
    "folder": Kind(preset="general"),
}
