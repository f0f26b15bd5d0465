"""Stub of ``torchvision.transforms.functional``: timm builds lookup tables from ``InterpolationMode`` at import."""

from enum import Enum


class InterpolationMode(Enum):
    """The interpolation names of torchvision's enum (values as torchvision spells them)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"
