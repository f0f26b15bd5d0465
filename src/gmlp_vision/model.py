"""gMLP image classifier: patch embedding, gMLP blocks with the Spatial Gating Unit, pooled linear head.

Implements Liu, Dai, So and Le, "Pay Attention to MLPs" (2021, arXiv 2105.08050), section 2, and, through
`ModelConfig` switches, the Keras tutorial's variant of it (residual around the normalised input, Glorot-initialised
spatial weights, tanh GELU, no final norm). Reference code consulted: timm's ``mlp_mixer.py`` (SpatialGatingUnit).

Input is raw pixels in 0..255 (any float or uint8 tensor, (B, C, H, W)); the per-channel normalisation computed from
the training set lives in the model as buffers, like the Keras model's Normalization layer, so every checkpoint,
export and prediction normalises exactly as training did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gmlp_vision.fused as fused  # the module, not the package: no import cycle through __init__
from gmlp_vision.config.groups import ModelConfig
from gmlp_vision.errors import CheckpointError


def linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """``layer(x)`` computed in ``x``'s dtype: fp32 master weights are cast on use (bf16 runs without autocast)."""
    return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))


def layer_norm(x: Tensor, norm: nn.LayerNorm | nn.Identity) -> Tensor:
    """``norm(x)`` computed in ``x``'s dtype (statistics are accumulated in fp32 by PyTorch's kernels)."""
    if isinstance(norm, nn.Identity):
        return x
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


class PatchEmbed(nn.Module):
    """Cut (B, C, H, W) images into non-overlapping patches and project each to ``embed_dim``, token-major.

    Patches are taken in row-major order and flattened as (row, column, channel), the layout of TF's
    ``extract_patches`` in the tutorial, so its Dense weights load unchanged (transposed). The output is token-major
    (N, B, D): see `GMLP` for why.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Linear(cfg.patch_dim, cfg.embed_dim)

    def patches(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to flattened patches (N, B, p * p * C), token-major."""
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(2, 4, 0, 3, 5, 1)  # (gh, gw, B, p, p, C)
        return x.reshape((H // p) * (W // p), B, p * p * C)

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.patches(x), self.proj)  # (N, B, D)


class SpatialGatingUnit(nn.Module):
    """Normalise ``v``, mix it across tokens, and gate ``u`` with it: ``u * (W @ norm(v) + b)``.

    ``u, v`` are the two halves of the block's hidden channels, passed separately (see `GMLPBlock`).
    """

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

    def forward(self, u: Tensor, v: Tensor, scale: float = 1.0, attn: Tensor | None = None) -> Tensor:
        """Gate ``scale * u`` with ``W @ norm(scale * v) + b (+ attn)``, computed without multiplying by ``scale``.

        ``scale`` is inverted dropout's ``1 / keep`` when the block passes masked-but-unscaled halves: on ``v`` it is
        absorbed exactly by the norm (``LN(s v; eps) = LN(v; eps / s^2)``), on ``u`` by the product's alpha and beta.
        ``attn`` is aMLP's tiny attention output, added to the spatial projection.
        """
        N, B, C = v.shape  # token-major
        norm = self.norm
        v = F.layer_norm(v, norm.normalized_shape, norm.weight.to(v.dtype), norm.bias.to(v.dtype), norm.eps / scale**2)
        # Token-major, the token mixing of the whole batch is ONE (N, N) @ (N, B*C) product, no transposes.
        weight, bias = self.proj.weight.to(v.dtype), self.proj.bias
        if scale == 1.0 and fused.applies(u):  # the product without its bias; bias and gate in one pass (`fused`)
            z = torch.mm(weight, v.reshape(N, B * C)).view(N, B, C)
            return fused.gate(u, z if attn is None else z + attn, bias)
        v = torch.addmm(bias.to(v.dtype)[:, None], weight, v.reshape(N, B * C), beta=scale, alpha=scale).view(N, B, C)
        if attn is not None:
            v = torch.add(v, attn, alpha=scale)
        return u * v


class TinyAttention(nn.Module):
    """aMLP's single-head self-attention of width ``attn_dim`` over the tokens, projected to the gate's width.

    Paper, section 4.3: its output is added to the spatial gating unit's token mixing. Input: the block's normalised
    tokens, token-major (N, B, D); output (N, B, ffn_dim / 2).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.attn_dim)
        self.proj = nn.Linear(cfg.attn_dim, cfg.ffn_dim // 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = linear(x, self.qkv).permute(1, 0, 2)[:, None].chunk(3, dim=-1)  # (B, 1, N, attn_dim) each
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(attn_dim)) v
        return linear(out[:, 0].transpose(0, 1), self.proj)


class GMLPBlock(nn.Module):
    """``shortcut + drop_path(fc2(sgu(dropout(gelu(fc1(norm(x)))))))`` on token-major (N, B, D) tokens.

    The shortcut is the block input (paper) or, with ``shortcut="normed"``, the normalised input (the tutorial).
    ``fc1`` is one Linear (so weights match Keras and timm) applied as two products, one per half, so ``u`` and
    ``v`` come out contiguous: no split copies forward, no concatenation backward.
    """

    def __init__(self, cfg: ModelConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.approximate = "tanh" if cfg.gelu == "tanh" else "none"
        self.dropout = cfg.dropout
        self.sgu = SpatialGatingUnit(cfg)
        self.fc2 = nn.Linear(cfg.ffn_dim // 2, cfg.embed_dim)
        self.attn = TinyAttention(cfg) if cfg.attn_dim else None
        self.drop_path = drop_path
        self.normed_shortcut = cfg.shortcut == "normed"

    def forward(self, x: Tensor) -> Tensor:
        y = layer_norm(x, self.norm)
        shortcut = y if self.normed_shortcut else x
        if fused.applies(y):  # float32 or bfloat16 on the CPU: the fused kernels (`fused`)
            return self._fused_forward(y, shortcut)
        half = self.fc1.out_features // 2
        w, b = self.fc1.weight.to(y.dtype), self.fc1.bias.to(y.dtype)
        u, v = F.linear(y, w[:half], b[:half]), F.linear(y, w[half:], b[half:])
        u, v = F.gelu(u, approximate=self.approximate), F.gelu(v, approximate=self.approximate)
        scale = 1.0
        if self.training and self.dropout > 0:
            # Mask only; the 1 / keep rescaling is folded into the gate (see SpatialGatingUnit.forward).
            (mask_u, mask_v), scale = keep_masks(u, self.dropout, 2)
            u, v = u * mask_u, v * mask_v
        attn = self.attn(y) if self.attn is not None else None
        y = linear(self.sgu(u, v, scale, attn), self.fc2)
        return shortcut + drop_path(y, self.drop_path, self.training)

    def _fused_forward(self, y: Tensor, shortcut: Tensor) -> Tensor:
        """`forward` with the CPU kernels: every bias is added inside a pass that runs anyway.

        ``fc1`` is one product without its bias; one kernel adds the bias, applies GELU and dropout and writes the
        halves apart (its backward: one gradient buffer, so one product for ``y``'s gradient). The gate adds the
        spatial bias (`SpatialGatingUnit.forward`). Without drop path, ``fc2``'s product accumulates onto
        ``shortcut + bias`` in place of a broadcast copy of its bias and a separate residual sum.
        """
        rate = self.dropout if self.training else 0.0
        u, v = fused.gelu_halves(F.linear(y, self.fc1.weight.to(y.dtype)), self.fc1.bias, self.approximate, rate)
        gated = self.sgu(u, v, 1.0, self.attn(y) if self.attn is not None else None)
        if self.training and self.drop_path > 0:
            return shortcut + drop_path(linear(gated, self.fc2), self.drop_path, self.training)
        out = torch.add(shortcut.reshape(-1, shortcut.shape[-1]), self.fc2.bias.to(y.dtype))  # a new tensor, not a view
        out.addmm_(gated.view(-1, gated.shape[-1]), self.fc2.weight.to(y.dtype).t())
        return out.view(shortcut.shape)


# Values one random int16 lane takes (see `dropout`).
_INT16_SPAN = 1 << 16


def keep_masks(like: Tensor, rate: float, count: int = 1) -> tuple[list[Tensor], float]:
    """``count`` boolean dropout masks shaped like ``like``, and the inverted-dropout scale ``1 / P(keep)``.

    On CPU, ``torch.bernoulli_`` draws one random number per element and took ~30 % of a training step; here each
    random int64 is split into four int16 lanes compared with a threshold, so an element is kept with probability
    ``round((1 - rate) 2^16) / 2^16`` (within 2^-17 of ``1 - rate``), and the scale is that probability's inverse. On
    GPUs, where random numbers are cheap, masks come from ``torch.rand``.
    """
    n = like.numel()
    if like.device.type != "cpu":
        return [torch.rand(like.shape, device=like.device) >= rate for _ in range(count)], 1.0 / (1.0 - rate)
    keep = round((1.0 - rate) * _INT16_SPAN)
    lanes = torch.randint(-(2**63), 2**63 - 1, ((count * n + 3) // 4,), dtype=torch.int64).view(torch.int16)
    masks = lanes[: count * n].view(count, *like.shape) < keep - _INT16_SPAN // 2
    return list(masks.unbind(0)), _INT16_SPAN / keep


def dropout(x: Tensor, rate: float, training: bool) -> Tensor:
    """Inverted dropout with `keep_masks`' cheap masks."""
    if rate == 0.0 or not training:
        return x
    (mask,), scale = keep_masks(x, rate)
    return x * mask * scale


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth per sample (dim 1 of token-major tokens): zero a sample's branch with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = torch.empty(1, x.shape[1], 1, dtype=x.dtype, device=x.device).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class GMLP(nn.Module):
    """gMLP classifier built from a `ModelConfig` alone.

    Inside, tokens are token-major (N, B, D) rather than (B, N, D): every channel projection is then a plain
    (N*B, D) matrix product as before, and the spatial projection becomes one large (N, N) @ (N, B*D/2) product
    instead of B small ones behind transposes. `forward_features` still returns the usual (B, N, D).

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
        self.head_dropout = cfg.head_dropout
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.reset_parameters()
        # A whitened embedding is not trained (`initial.whiten_patch_embedding` sets it from the data, from scratch).
        self.patch_embed.proj.weight.requires_grad_(cfg.patch_init != "whiten")

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
        """Raw pixels (B, C, H, W) in 0..255 to normalised values, computed in fp32, returned in ``x``'s float dtype.

        The input's dtype picks the compute dtype of the whole forward pass: uint8 and fp32 run in fp32, bf16 in bf16
        (fp32 master weights cast on use; no autocast, so no per-op casts of activations).
        """
        dtype = x.dtype if x.is_floating_point() else torch.float32
        x = (x.float() - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]
        return x.to(dtype)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Raw pixels (B, C, H, W) to token-major tokens (N, B, D) after the blocks and the final norm."""
        if x.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected {self.cfg.image_size}x{self.cfg.image_size} images, got {tuple(x.shape)}")
        x = self.patch_embed(self.normalize(x))
        return layer_norm(self.blocks(x), self.norm)

    def forward_features(self, x: Tensor) -> Tensor:
        """Raw pixels (B, C, H, W) to tokens (B, N, D) after the blocks and the final norm."""
        return self.forward_tokens(x).transpose(0, 1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, N, D) to logits (B, num_classes), or to pooled features (B, D) with ``pre_logits``."""
        return self._head(x.mean(dim=1), pre_logits)

    def _head(self, pooled: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = dropout(pooled, self.head_dropout, self.training)
        return pooled if pre_logits else linear(pooled, self.head)

    def forward(self, x: Tensor) -> Tensor:
        return self._head(self.forward_tokens(x).mean(dim=0))

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
    if cfg.attn_dim:  # aMLP: q, k, v, the two attention products, the output projection
        a = cfg.attn_dim
        per_block += n * d * 3 * a + 2 * n * n * a + n * a * (f // 2)
    return 2 * (n * cfg.patch_dim * d + cfg.depth * per_block + d * cfg.num_classes)


__all__ = [
    "GMLP",
    "GMLPBlock",
    "PatchEmbed",
    "SpatialGatingUnit",
    "TinyAttention",
    "count_parameters",
    "drop_path",
    "dropout",
    "flops_per_image",
]


def nonfinite_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` that hold a NaN or an infinity (one device sync in all)."""
    floats = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).cpu()
    return [k for (k, _), ok in zip(floats, finite.tolist(), strict=True) if not ok]


def check_weights_fit(cfg: ModelConfig, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Check that ``state`` holds exactly the finite tensors of the model ``cfg`` describes, before building it.

    A config travels beside its weights (a checkpoint, an export's ``config.json``), and a digest is a checksum, not
    a signature: a 3 KB file could describe a model of 40 GB. The expected shapes come from the model built on the
    ``meta`` device, which allocates nothing; its depth is first bounded by the blocks the file really holds.

    Raises:
        CheckpointError: a missing, unexpected or differently shaped tensor, or a NaN or infinity.
    """
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    if cfg.depth > len(blocks):
        raise CheckpointError(f"{what} config describes {cfg.depth} blocks but its weights hold {len(blocks)}")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in GMLP(cfg).state_dict().items()}
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:  # sizes torch cannot even describe
        raise CheckpointError(f"{what} config describes a model that cannot be built ({type(e).__name__})") from None
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(
            f"{what} weights do not fit the model its config describes: {len(missing)} missing and "
            f"{len(unexpected)} unexpected tensors ({first})"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{what} weights do not fit the model its config describes: {key} has shape "
                f"{tuple(state[key].shape)}, the config needs {shape}"
            )
    bad = nonfinite_names(state)
    if bad:
        raise CheckpointError(
            f"{what} holds NaN or infinite weights in {len(bad)} of {len(state)} tensors (e.g. {bad[0]}); "
            "the run that wrote them diverged, so they cannot be used"
        )
