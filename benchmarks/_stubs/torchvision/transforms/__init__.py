"""Stub of ``torchvision.transforms``: ``timm.data.transforms`` subclasses ``ToTensor`` at import time."""

from torchvision import unavailable

ToTensor = unavailable("ToTensor")
