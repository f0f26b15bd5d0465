"""Presets: named lists of overrides of the config's defaults, each with a comment saying why its values were chosen.

`seed` reproduces the Keras tutorial exactly (README); `digits` is the offline Quickstart; `tiny` is for tests; the
paper's gMLP-Ti/S/B; and two CIFAR recipes chosen by the runs in docs/experiments.md. Applied by
`config.from_preset` and ``--preset``: defaults < preset < ``--config`` file < explicit flags.
"""

from __future__ import annotations

from typing import Any

from gmlp_vision.errors import ConfigError, shown
from gmlp_vision.kinds import KINDS

# A preset is a short list of overrides; the comment says why.
PRESETS: dict[str, dict[str, Any]] = {
    # The Keras tutorial exactly (README): 32 px, patch 4, width 128, 4 blocks, its three departures from the paper,
    # no final norm, dropout 0.2, batch 128, lr 3e-3 with the add-on AdamW, plateau halving, early stopping.
    "seed": dict(
        image_size=32,
        patch_size=4,
        embed_dim=128,
        ffn_dim=256,
        depth=4,
        dropout=0.2,
        head_dropout=0.2,
        gelu="tanh",
        shortcut="normed",
        spatial_init="glorot",
        final_norm=False,
        epochs=100,
        batch_size=128,
        lr=3e-3,
        weight_decay=1e-4,
        optimizer="keras-adamw",
        val_split=0.1,
        flip=True,
        zoom=0.2,
        plateau_patience=5,
        early_stop_patience=10,
        restore_best="on-stop",
        precision="fp32",
    ),
    # The embedded 8x8 digits: patch 2 gives 16 tokens; no flip (a mirrored digit is another symbol), mild zoom;
    # the paper's block otherwise. Reaches >= 90 % test top-1 in well under a minute on 2 CPU cores.
    "digits": dict(
        image_size=8,
        patch_size=2,
        embed_dim=64,
        ffn_dim=256,
        depth=4,
        dropout=0.1,
        head_dropout=0.1,
        epochs=40,
        batch_size=64,
        lr=3e-3,
        weight_decay=1e-4,
        val_split=0.1,
        flip=False,
        zoom=0.1,
        plateau_patience=5,
        early_stop_patience=10,
        restore_best="always",
    ),
    # For tests: a very small model that still exercises every part (both block forms come from the flags); fp32,
    # so that a test computes the same numbers on every machine (auto would pick bf16 on some).
    "tiny": dict(
        image_size=32,
        patch_size=8,
        embed_dim=32,
        ffn_dim=64,
        depth=2,
        dropout=0.1,
        head_dropout=0.1,
        drop_path=0.1,
        epochs=2,
        batch_size=32,
        lr=3e-3,
        precision="fp32",
    ),
}

# The paper's ImageNet models (Liu et al. 2021, Table 1): 224 px, patch 16, 30 blocks, survival probability of the last
# block 1.00 / 0.95 / 0.80 (stochastic depth rising linearly with depth); 6M / 20M / 73M parameters at 1000 classes.
# The recipe is the paper's DeiT-style one as far as it is built here: AdamW, lr 1e-3 for batch 1024, weight decay 0.05
# (not on norms and biases), 5 warm-up epochs then cosine, label smoothing 0.1, mixup 0.8 / cutmix 1.0, random-resized
# crops and flips, DeiT's RandAugment (timm's rand-m9-mstd0.5-inc1: 2 ops from timm's 15, each applied with probability
# 0.5 at magnitude 9 plus Gaussian noise of std 0.5, bicubic, mean-colour fill; `policy_timm`, checked against timm's
# ops) and random erasing with probability 0.25.
_PAPER = dict(
    image_size=224,
    patch_size=16,
    depth=30,
    dropout=0.0,
    head_dropout=0.0,
    gelu="exact",
    shortcut="input",
    spatial_init="near-zero",
    final_norm=True,
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.05,
    decay_norms_biases=False,
    schedule="cosine",
    warmup_epochs=5.0,
    min_lr=1e-5,
    label_smoothing=0.1,
    crop="random-resized",
    mixup=0.8,
    cutmix=1.0,
    policy="randaugment-timm",
    policy_ops=2,
    policy_magnitude=9.0,
    policy_prob=0.5,
    policy_magnitude_std=0.5,
    erase=0.25,
    flip=True,
    zoom=0.0,
    batch_size=1024,
    epochs=300,
    plateau_patience=0,
    early_stop_patience=0,
)
PRESETS.update(
    {
        "gmlp-ti": dict(_PAPER, embed_dim=128, ffn_dim=768, drop_path=0.0),
        "gmlp-s": dict(_PAPER, embed_dim=256, ffn_dim=1536, drop_path=0.05),
        "gmlp-b": dict(_PAPER, embed_dim=512, ffn_dim=3072, drop_path=0.2),
    }
)

# CIFAR presets, chosen by the runs in docs/experiments.md. Both use the paper's block (input shortcut, near-zero
# spatial init, final norm), 32 px and patch 4 (64 tokens), no dropout, AdamW without decay on norms and biases, a
# warm-up then a schedule that ends at (nearly) zero, label smoothing, reflect-padded random crops and flips, and all
# 50,000 training images (no validation split: the test split is evaluated at the end).
_CIFAR = dict(
    image_size=32,
    patch_size=4,
    dropout=0.0,
    head_dropout=0.0,
    gelu="tanh",
    shortcut="input",
    spatial_init="near-zero",
    final_norm=True,
    optimizer="adamw",
    weight_decay=0.05,
    decay_norms_biases=False,
    label_smoothing=0.1,
    crop="pad",
    crop_padding=4,
    flip=True,
    zoom=0.0,
    val_split=0.0,
    plateau_patience=0,
    early_stop_patience=0,
    restore_best="never",
)
# The CPU record: the tutorial's width (128 / 256) with 6 blocks instead of 4 (333k parameters), no dropout,
# 16 epochs of one-cycle with Muon on the blocks' matrices (docs/experiments.md, run R6: 1.2-1.9 points above AdamW
# at every epoch) and a frozen whitened patch embedding (run R9: a point ahead of R7, the same without it, at every
# epoch from the 2nd; 85 % with TTA from epoch 14): about 14.5 minutes of training on 2 cores, a weight average beside
# it. Like every preset but seed, --precision auto: bf16 where the machine computes it natively, fp32 elsewhere
# (20x faster there).
_CIFAR10_FAST = dict(
    _CIFAR,
    embed_dim=128,
    ffn_dim=256,
    depth=6,
    patch_init="whiten",
    batch_size=128,
    optimizer="muon",
    lr=2e-3,
    schedule="onecycle",
    warmup_epochs=2.0,
    epochs=16,
    ema=0.998,
)
PRESETS.update(
    {
        "cifar10-fast": _CIFAR10_FAST,
        # The default for your own images (--dataset folder), chosen on CIFAR-10 written out as PNG class folders
        # (benchmarks/bench_folder.py): cifar10-fast's model and schedule, made safe for any data: 20 epochs; a 10 %
        # validation split to watch over-fitting (the folder's val/ is evaluated at the end).
        # AdamW and a trained patch embedding, as measured there (cifar10-fast's Muon and whitened embedding came
        # later, chosen on CIFAR-10 alone).
        "general": dict(_CIFAR10_FAST, optimizer="adamw", patch_init="glorot", epochs=20, val_split=0.1),
        # The accuracy preset for a GPU: 4.1M parameters (at 100 classes), 12 blocks of width 192 / 1152, 300 epochs
        # with the regularisation a long run needs: TrivialAugment, mixup / cutmix, random erasing, drop path, EMA.
        "cifar100-strong": dict(
            _CIFAR,
            embed_dim=192,
            ffn_dim=1152,
            depth=12,
            drop_path=0.1,
            batch_size=256,
            lr=2e-3,
            schedule="cosine",
            warmup_epochs=10.0,
            min_lr=1e-5,
            epochs=300,
            policy="trivial",
            mixup=0.8,
            cutmix=1.0,
            erase=0.25,
            ema=0.9995,
        ),
    }
)

PRESET_HELP: dict[str, str] = {
    "seed": "the Keras tutorial exactly (CIFAR-100, 236,004 parameters, 78.91 % top-5 reported)",
    "digits": "the embedded 8x8 digits dataset (offline Quickstart, >= 90 % test top-1 in under a minute)",
    "tiny": "a very small model for tests and smoke runs",
    "gmlp-ti": "the paper's gMLP-Ti: 224 px, patch 16, 30 blocks, width 128 (5.9M params at 1000 classes)",
    "gmlp-s": "the paper's gMLP-S: 224 px, patch 16, 30 blocks, width 256 (19.4M params at 1000 classes)",
    "gmlp-b": "the paper's gMLP-B: 224 px, patch 16, 30 blocks, width 512 (73.1M params at 1000 classes)",
    "cifar10-fast": "CPU time-to-accuracy on CIFAR: 333k params, Muon, one-cycle, 85 % CIFAR-10 (with --tta) in 15 min",
    "general": "your own images (the --dataset folder default): the paper's block, 6 blocks, one-cycle, 20 epochs",
    "cifar100-strong": "accuracy on CIFAR with a GPU: 4.1M params, 12 blocks, 300 epochs of a modern recipe",
}

# The preset a dataset gets when --dataset is given and --preset is not.
DATASET_PRESET: dict[str, str] = {name: kind.preset for name, kind in KINDS.items()}


def preset_overrides(name: str) -> dict[str, Any]:
    """The overrides of preset ``name``, plus the preset's own name."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {shown(name)}; choose from {', '.join(PRESETS)}")
    return {**PRESETS[name], "preset": name}


__all__ = ["DATASET_PRESET", "PRESETS", "PRESET_HELP", "preset_overrides"]
