"""The model a run starts from: normalised by its training images, then pretrained or (maybe) whitened.

Seeded by the run; then pretrained weights (``--init``) or, from scratch with ``--patch-init whiten``, a patch
embedding whitened from the training patches.

The whitened embedding: the fast CIFAR-10 trainers (airbench, hlb-CIFAR10) start their first convolution as the
whitening of the training images' patches and do not train its weights. Here the first layer is the patch embedding,
a linear map of each ``patch_size`` x ``patch_size`` x C patch (48 values at patch 4, RGB). Its rows become a random
orthonormal mix of the patches' principal directions, each divided by its standard deviation, so the blocks see tokens
that vary as much in every direction from the first step. The weights stay frozen (`model.GMLP` freezes them wherever
a model with ``patch_init="whiten"`` is built, so a resumed run or a fine-tune keeps the embedding it was given); the
bias trains. docs/experiments.md has the runs that chose it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gmlp_vision.config import Config
from gmlp_vision.data.base import channel_stats
from gmlp_vision.data.stream import ImageFiles, stats_sample
from gmlp_vision.images import resize
from gmlp_vision.model import GMLP
from gmlp_vision.transfer import Pretrained, apply_pretrained

WHITEN_EPS = 5e-4  # added to every eigenvalue: the directions with less variance than this are damped, not amplified
WHITEN_PATCHES = 320_000  # patches counted, at most: 5,000 CIFAR images at patch 4, 1,632 at 224 px and patch 16
COVARIANCE_CHUNK = 1_536_000  # input values per step of `patch_covariance` (12 MB in float64)


def new_model(
    cfg: Config, images: Tensor | ImageFiles, pretrained: Pretrained | None, fresh: Tensor | ImageFiles | None
) -> tuple[GMLP, str | None]:
    """The model a run starts from, on the CPU, and what to log about its start (None: nothing to add).

    Seeded by the run's seed; normalised by ``images`` (the validation tail included: Keras' ``adapt``), then given
    the ``pretrained`` weights (which bring their own normalisation) or, when ``fresh`` holds the training images of
    a run from scratch and the model asks for it, a whitened patch embedding (`whiten_patch_embedding`).
    """
    torch.manual_seed(cfg.run.seed)
    model = GMLP(cfg.model)
    model.set_normalization(*channel_stats(stats_sample(images, cfg.run.seed)))
    whiten = cfg.model.patch_init == "whiten"
    if pretrained is not None:
        apply_pretrained(model, pretrained)
        return model, "patch embedding: --init's, frozen (--patch-init whiten)" if whiten else None
    if fresh is not None and whiten:
        return model, whiten_patch_embedding(model, fresh, cfg.run.seed)
    return model, None


@torch.no_grad()
def patch_covariance(model: GMLP, images: Tensor | ImageFiles, pick: Tensor | None = None) -> Tensor:
    """The (P, P) float64 covariance of ``model``'s normalised input patches over raw ``images`` (N, C, H, W).

    ``pick``: the indices of the images to count (default: all). Works through `COVARIANCE_CHUNK` input values at a
    time (500 CIFAR images, 10 at 224 px), indexing each chunk alone: a few MB, whatever the sample.
    """
    cfg = model.cfg
    dim = cfg.patch_dim
    total = torch.zeros(dim, dtype=torch.float64)
    outer = torch.zeros(dim, dim, dtype=torch.float64)
    n = 0
    pick = torch.arange(len(images)) if pick is None else pick
    for index in pick.split(max(1, COVARIANCE_CHUNK // (cfg.in_chans * cfg.image_size**2))):
        part = images[index] if isinstance(images, Tensor) else torch.cat(list(images.subset(index).split(len(index))))
        x = model.normalize(resize(part.float(), cfg.image_size))
        patches = model.patch_embed.patches(x).reshape(-1, dim).double()
        total += patches.sum(dim=0)
        outer += patches.T @ patches
        n += len(patches)
    if n < 1:
        raise ValueError("the patch covariance needs at least one image")
    mean = total / n
    return outer / n - torch.outer(mean, mean)


def whitening(cov: Tensor, eps: float = WHITEN_EPS) -> Tensor:
    """The (P, P) matrix whose rows are the eigenvectors of ``cov`` divided by ``sqrt(eigenvalue + eps)``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    return (eigenvectors / (eigenvalues.clamp_min(0) + eps).sqrt()).T


@torch.no_grad()
def whiten_patch_embedding(model: GMLP, images: Tensor | ImageFiles, seed: int) -> str:
    """Set ``model``'s patch embedding to a whitening of ``images``' patches (a seeded sample); return a log line.

    The weight is ``Q @ W``. ``W`` is the `whitening` of the patches' covariance, over a random sample of at most
    `WHITEN_PATCHES` patches (whole images). ``Q`` is a random (D, P) matrix with orthonormal columns; when the
    tokens are narrower than a patch (D < P), a random rotation of the D principal directions with the most
    variance instead, so that no token is mostly the whitened noise of the weakest ones. Scaled so that the tokens
    vary as much as under the Glorot init (the embedding's output variance at unit-variance inputs, ``2 P / (P + D)``).
    The bias is zeroed. ``model`` must already hold its pixel normalisation (`GMLP.set_normalization`).
    """
    if len(images) < 1:
        raise ValueError("whitening the patch embedding needs training images")
    generator = torch.Generator().manual_seed(seed)
    count = max(1, WHITEN_PATCHES // model.cfg.num_patches)
    pick = torch.randperm(len(images), generator=generator)[:count]
    white = whitening(patch_covariance(model, images, pick))  # rows: principal directions, weakest first
    proj = model.patch_embed.proj
    d, p = proj.out_features, white.shape[0]
    q, _ = torch.linalg.qr(torch.randn(d, min(d, p), generator=generator, dtype=torch.float64))
    white = white[p - min(d, p) :]  # all P directions, or the D strongest
    scale = math.sqrt(2 * p / (p + d) * d / min(d, p))
    proj.weight.copy_(scale * q @ white)
    proj.bias.zero_()
    return f"patch embedding: the PCA whitening of {len(pick):,} training images' patches, frozen (--patch-init whiten)"


__all__ = ["WHITEN_EPS", "WHITEN_PATCHES", "new_model", "patch_covariance", "whiten_patch_embedding", "whitening"]
