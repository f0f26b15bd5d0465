"""gMLP image classifier: patch embedding, gMLP blocks with the Spatial Gating Unit, pooled linear head.

Implements Liu, Dai, So and Le, "Pay Attention to MLPs" (2021, arXiv 2105.08050), section 2, and, through
`ModelConfig` switches, the Keras tutorial's variant of it (residual around the normalised input, Glorot-initialised
spatial weights, tanh GELU, no final norm). Reference code consulted: timm's ``mlp_mixer.py`` (SpatialGatingUnit).

Input is raw pixels in 0..255 (any float or uint8 tensor, (B, C, H, W)); the per-channel normalisation computed from
the training set lives in the model as buffers, like the Keras model's Normalization layer, so every checkpoint,
export and prediction normalises exactly as training did.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from gmlp_vision.config import ModelConfig


class PatchEmbed(nn.Module):
    """Cut (B, C, H, W) images into non-overlapping patches and project each to ``embed_dim``.

    Patches are taken in row-major order and flattened as (row, column, channel), the layout of TF's
    ``extract_patches`` in the tutorial, so its Dense weights load unchanged (transposed).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Linear(cfg.patch_dim, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
        return self.proj(x.reshape(B, (H // p) * (W // p), p * p * C))  # (B, N, D)


class SpatialGatingUnit(nn.Module):
    """Split channels into ``u, v``; normalise ``v``; mix ``v`` across tokens; gate: ``u * v``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.ffn_dim // 2, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.num_patches, cfg.num_patches)  # weight (N_out, N_in): mixes tokens
        self.spatial_init = cfg.spatial_init

    def reset_parameters(self) -> None:
        """Paper: weights near zero and bias one, so the unit starts as ``u * 1`` (a plain MLP block)."""
        if self.spatial_init == "glorot":
            nn.init.xavier_uniform_(self.proj.weight)
        else:
            nn.init.normal_(self.proj.weight, std=1e-6)
        nn.init.ones_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        u, v = x.chunk(2, dim=-1)  # (B, N, F/2) each
        v = self.norm(v)
        # One (N, N) @ (B, N, F/2) batched product; the bias is per output token.
        v = torch.matmul(self.proj.weight, v) + self.proj.bias[:, None]
        return u * v


class GMLPBlock(nn.Module):
    """``shortcut + drop_path(fc2(sgu(dropout(gelu(fc1(norm(x)))))))``.

    The shortcut is the block input (paper) or, with ``shortcut="normed"``, the normalised input (the tutorial).
    """

    def __init__(self, cfg: ModelConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.act = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.drop = nn.Dropout(cfg.dropout)
        self.sgu = SpatialGatingUnit(cfg)
        self.fc2 = nn.Linear(cfg.ffn_dim // 2, cfg.embed_dim)
        self.drop_path = drop_path
        self.normed_shortcut = cfg.shortcut == "normed"

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x)
        shortcut = y if self.normed_shortcut else x
        y = self.fc2(self.sgu(self.drop(self.act(self.fc1(y)))))
        return shortcut + drop_path(y, self.drop_path, self.training)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth per sample: zero a sample's whole branch with probability ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = torch.empty(x.shape[0], *(1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class GMLP(nn.Module):
    """gMLP classifier built from a `ModelConfig` alone.

    Args:
        cfg: the architecture.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Normalisation of raw 0..255 pixels, set from the training data by `set_normalization`.
        self.register_buffer("pixel_mean", torch.zeros(cfg.in_chans))
        self.register_buffer("pixel_std", torch.ones(cfg.in_chans))
        self.patch_embed = PatchEmbed(cfg)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*(GMLPBlock(cfg, r) for r in rates))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and zero biases for every channel projection (Keras Dense), then the gates' init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, SpatialGatingUnit):
                m.reset_parameters()

    @torch.no_grad()
    def set_normalization(self, mean: Tensor, var: Tensor) -> None:
        """Store per-channel pixel statistics; the model computes ``(x - mean) / max(sqrt(var), 1e-7)`` (Keras)."""
        self.pixel_mean.copy_(mean)
        self.pixel_std.copy_(var.sqrt().clamp_min(1e-7))

    def normalize(self, x: Tensor) -> Tensor:
        """Raw pixels (B, C, H, W) in 0..255 to normalised floats."""
        x = x.float() if not x.is_floating_point() else x
        return (x - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]

    def forward_features(self, x: Tensor) -> Tensor:
        """Raw pixels (B, C, H, W) to tokens (B, N, D) after the blocks and the final norm."""
        if x.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected {self.cfg.image_size}x{self.cfg.image_size} images, got {tuple(x.shape)}")
        x = self.patch_embed(self.normalize(x))
        return self.norm(self.blocks(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, N, D) to logits (B, num_classes), or to pooled features (B, D) with ``pre_logits``."""
        x = self.head_drop(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one with ``num_classes`` outputs (fine-tuning)."""
        head = nn.Linear(self.cfg.embed_dim, num_classes, device=self.head.weight.device)
        nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)
        self.head = head
        self.cfg = replace(self.cfg, num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_image(cfg: ModelConfig) -> int:
    """Multiply-adds x 2 of one forward pass (matrix products only), e.g. 30.2 MFLOP for the `seed` preset."""
    n, d, f = cfg.num_patches, cfg.embed_dim, cfg.ffn_dim
    per_block = n * d * f + n * n * (f // 2) + n * (f // 2) * d
    return 2 * (n * cfg.patch_dim * d + cfg.depth * per_block + d * cfg.num_classes)


__all__ = ["GMLP", "GMLPBlock", "PatchEmbed", "SpatialGatingUnit", "count_parameters", "drop_path", "flops_per_image"]
