"""A small learnable image dataset made in memory (no files), for training tests."""

import torch

from gmlp_vision.data import Dataset, Split


def make_split(n: int, num_classes: int, size: int, seed: int, chans: int = 3) -> Split:
    """Class k: noise plus a bright horizontal band at a class-specific height, tinted per class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = torch.randint(0, 90, (n, chans, size, size), generator=g).float()
    band = size // num_classes
    for k in range(num_classes):
        sel = labels == k
        images[sel, :, k * band : (k + 1) * band, :] += 150
        images[sel, k % chans] += 10
    return Split(images.clamp(0, 255).to(torch.uint8), labels)


def make_dataset(
    n_train: int = 320, n_test: int = 100, num_classes: int = 4, size: int = 32, chans: int = 3
) -> Dataset:
    return Dataset(
        name="cifar10",
        train=make_split(n_train, num_classes, size, seed=0, chans=chans),
        test=make_split(n_test, num_classes, size, seed=1, chans=chans),
        classes=tuple(f"class{k}" for k in range(num_classes)),
    )


def perturbed_seed_block():
    """A `seed` gMLP block in training mode with every weight moved off its initial value, and a token-major input."""
    from gmlp_vision.config import from_preset
    from gmlp_vision.model import GMLPBlock

    cfg = from_preset("seed", num_classes=10, spatial_init="glorot").model
    block = GMLPBlock(cfg).train()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    return cfg, block, torch.randn(cfg.num_patches, 5, cfg.embed_dim)
