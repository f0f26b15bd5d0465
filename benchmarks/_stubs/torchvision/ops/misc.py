"""Stub of ``torchvision.ops.misc``: only the name timm imports."""

from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """Placeholder: timm imports the name; the gMLP benchmark never builds one."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("torchvision is stubbed in the benchmark: FrozenBatchNorm2d is not available")
