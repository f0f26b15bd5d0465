"""Stand-in for the parts of torchvision that ``import timm`` touches (benchmark only, never installed).

The real torchvision wheel pins a CUDA torch that does not load beside this venv's CPU build. timm imports a few
torchvision names at import time (dataset classes, transforms, ``FrozenBatchNorm2d``); the gMLP benchmark builds
none of them, so each is a placeholder class that raises if anything tries to use it.
"""

__version__ = "0.0.0+benchmark-stub"


def unavailable(name: str) -> type:
    """A placeholder class named ``name`` that cannot be instantiated."""

    def __init__(self: object, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"torchvision is stubbed in the benchmark: {name} is not available")

    return type(name, (), {"__init__": __init__})
