"""The config's groups, one per concern: the model's architecture, the data, the augmentation, the recipe, the run.

Each group checks its own values when it is built; `core.Config` nests them and checks the rules that join two.
Every field becomes a flag of the same name (``embed_dim`` -> ``--embed-dim``), its help and choices from ``option``.
`ModelConfig` defaults follow the paper (Liu et al., 2021, "Pay Attention to MLPs", arXiv 2105.08050, gMLP-S at 224 px).
"""

from __future__ import annotations

from dataclasses import dataclass

from gmlp_vision.config.checks import (
    MAX_IMAGE_SIZE,
    MAX_THREADS,
    MAX_TOKENS,
    check_device,
    check_fields,
    fraction,
    non_negative,
    option,
    positive,
    require,
)
from gmlp_vision.errors import shown
from gmlp_vision.kinds import KINDS


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, and nothing else: the only thing `model.py` sees."""

    image_size: int = option(224, "input height and width in pixels (images of another size are resized)")
    patch_size: int = option(16, "side of the square non-overlapping patches")
    in_chans: int = option(3, "image channels: image folders are read as RGB (3) or grayscale (1); others set it")
    num_classes: int = option(1000, "classifier outputs")
    embed_dim: int = option(256, "token width d")
    ffn_dim: int = option(1536, "hidden width of each block (split in two halves by the gate)")
    depth: int = option(30, "number of gMLP blocks")
    dropout: float = option(0.0, "dropout after the GELU inside every block")
    head_dropout: float = option(0.0, "dropout on the pooled features before the classifier")
    drop_path: float = option(0.0, "stochastic depth rate of the last block (rises linearly from 0), per sample")
    norm_eps: float = option(1e-6, "LayerNorm epsilon")
    gelu: str = option("exact", "GELU form: exact (paper) or tanh (the tutorial's add-on default)", ("exact", "tanh"))
    shortcut: str = option(
        "input",
        "residual source: input (paper: the block input) or normed (tutorial quirk: the normalised input)",
        ("input", "normed"),
    )
    spatial_init: str = option(
        "near-zero",
        "spatial projection weights: near-zero (paper, each block starts as a plain MLP) or glorot (tutorial)",
        ("near-zero", "glorot"),
    )
    final_norm: bool = option(True, "LayerNorm on the tokens before pooling (paper and timm: on; tutorial: off)")
    patch_init: str = option(
        "glorot", "patch embedding: glorot, or whiten (PCA whitening of training patches, frozen)", ("glorot", "whiten")
    )
    attn_dim: int = option(0, "aMLP: width of a tiny single-head attention added to every gate (paper: 64; 0: gMLP)")

    def __post_init__(self) -> None:
        check_fields(self)
        positive(self, "image_size", "patch_size", "in_chans", "num_classes", "embed_dim", "ffn_dim", "depth")
        require(
            self.image_size <= MAX_IMAGE_SIZE,
            f"--image-size must be at most {MAX_IMAGE_SIZE:,d} pixels, got {self.image_size}",
        )
        require(
            self.image_size % self.patch_size == 0,
            f"--patch-size {self.patch_size} does not divide --image-size {self.image_size}: "
            "patches must tile the image exactly",
        )
        require(
            self.num_patches <= MAX_TOKENS,
            f"--image-size {self.image_size} with --patch-size {self.patch_size} gives {self.num_patches:,d} "
            f"tokens; at most {MAX_TOKENS:,d} (the spatial projection is tokens x tokens)",
        )
        require(self.attn_dim >= 0, f"--attn-dim must be >= 0, got {self.attn_dim}")
        require(self.ffn_dim % 2 == 0, f"--ffn-dim must be even (the gate splits it in two halves), got {self.ffn_dim}")
        fraction(self, "dropout", "head_dropout", "drop_path")
        require(self.norm_eps > 0, f"--norm-eps must be positive, got {self.norm_eps}")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image."""
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch."""
        return self.patch_size**2 * self.in_chans


@dataclass(frozen=True)
class DataConfig:
    """Which images, from where, and how they are read and split."""

    dataset: str = option(
        "cifar100",
        "dataset; folder: --data DIR of class folders, with or without train/ and val/ or test/; csv: --data "
        "FILE.csv or .tsv of path,label[,split] rows (either is chosen by itself when --data names one)",
        tuple(KINDS),
    )
    data: str | None = option(
        None,
        "CIFAR: a local archive (.tar.gz) or extracted folder (default: the cache, downloading if needed); folder: "
        "the folder; csv: the table",
    )
    download: bool = option(True, "download missing archives to the cache")
    verify_md5: bool = option(False, "check a local archive's md5 sum")
    skip_bad_images: bool = option(False, "skip unreadable image files, logged")
    folder_mode: str = option(
        "auto",
        "folders: memory (decoded once, cached), stream (decoded per batch by workers), auto (memory up to 4 GiB "
        "and 1/4 of the RAM)",
        ("auto", "memory", "stream"),
    )
    resize: str = option(
        "crop",
        "other sizes: crop (shorter side to size/--crop-pct, centre crop) or squash",
        ("crop", "squash"),
    )
    crop_pct: float = option(1.0, "share of the resized image kept (timm's crop_pct); input-size images stay whole")
    workers: int = option(4, "streamed folders: worker processes decoding images (0: in the training process)")
    train_limit: int = option(0, "use only the first N training images, before the validation split (0: all)")
    val_split: float = option(0.1, "fraction of the training images held out for validation: the LAST ones (Keras)")
    sampler: str = option(
        "shuffle",
        "epoch order: shuffle (every training image once) or balanced (as many draws, with replacement, each class "
        "equally likely)",
        ("shuffle", "balanced"),
    )
    holdout: float = option(
        0.2,
        "folder, csv without a val or test part: the share of each class held out as the test split (a fixed draw, "
        "recorded in the run's holdout.json)",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        fraction(self, "val_split")
        require(0.0 < self.holdout < 1.0, f"--holdout must be in (0, 1), got {self.holdout}")
        non_negative(self, "train_limit")
        require(0.0 < self.crop_pct <= 1.0, f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        require(0 <= self.workers <= MAX_THREADS, f"--workers must be in 0..{MAX_THREADS}, got {self.workers}")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation, batched on the training device (`augment.py` builds the pipeline from it)."""

    flip: bool = option(True, "random horizontal flip, p=0.5 per image")
    flip_mode: str = option(
        "random",
        "random: p=0.5 per drawn image; alternate: each image mirrored every other epoch",
        ("random", "alternate"),
    )
    zoom: float = option(0.2, "random zoom: per image and axis a factor from U(1-zoom, 1+zoom); 0 turns it off")
    crop: str = option(
        "none",
        "random-resized: a random crop (area --crop-scale..100 %%, aspect 3/4..4/3) resized to the input size (from "
        "the full-size file when streaming); pad: a random window of the image reflect-padded by --crop-padding px",
        ("none", "random-resized", "pad"),
    )
    crop_scale: float = option(0.08, "smallest area fraction of a random-resized crop")
    crop_padding: int = option(4, "padding in pixels of --crop pad (a random shift of up to this many pixels)")
    policy: str = option(
        "none",
        "automatic augmentation, batched: trivial (TrivialAugment, one op per image at a random magnitude, on "
        "RandAugment's ranges), randaugment (--policy-ops ops per image at --policy-magnitude) or randaugment-timm "
        "(DeiT's: timm's rand-m9-mstd0.5-inc1)",
        ("none", "trivial", "randaugment", "randaugment-timm"),
    )
    policy_ops: int = option(2, "randaugment(-timm): ops per image")
    policy_magnitude: float = option(
        9.0, "randaugment, randaugment-timm: strength of every op, 0..10 (M; 10 is the strongest)"
    )
    policy_prob: float = option(0.5, "randaugment-timm: probability that each drawn op is applied (timm's p)")
    policy_magnitude_std: float = option(
        0.5,
        "randaugment-timm: std of the Gaussian noise on each op's magnitude, clipped to 0..10 (timm's mstd; 0: none)",
    )
    erase: float = option(0.0, "random erasing: probability per image that a random box is replaced by noise (0: off)")
    mixup: float = option(0.0, "mixup alpha: blend each batch with itself reversed, lam ~ Beta(alpha, alpha) (0: off)")
    cutmix: float = option(
        0.0, "cutmix alpha: paste a box of the reversed batch (0: off; with --mixup, one of the two)"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        fraction(self, "zoom")
        require(0.0 < self.crop_scale <= 1.0, f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        require(
            self.crop_padding >= 0 and self.policy_ops >= 1 and 0.0 <= self.policy_magnitude <= 10.0,
            "--crop-padding must be >= 0, --policy-ops >= 1 and --policy-magnitude in 0..10",
        )
        require(0.0 <= self.policy_prob <= 1.0, f"--policy-prob is a probability in [0, 1], got {self.policy_prob}")
        require(
            0.0 <= self.policy_magnitude_std <= 100.0,
            f"--policy-magnitude-std must be in 0..100 (timm's uniform magnitude, mstd > 100, is not offered), "
            f"got {self.policy_magnitude_std}",
        )
        require(0.0 <= self.erase <= 1.0, f"--erase is a probability in [0, 1], got {self.erase}")
        require(self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix take a Beta alpha >= 0 (0: off)")


@dataclass(frozen=True)
class OptimConfig:
    """The recipe: how long, in what batches, with which optimiser, schedule, loss and stopping rules."""

    epochs: int = option(100, "maximum number of epochs")
    batch_size: int = option(
        128, "images per optimiser step over all processes (the global batch; the last smaller batch is kept)"
    )
    accum_steps: int = option(
        1, "split each process's share of a batch into N micro-batches whose gradients add up (same step, less memory)"
    )
    lr: float = option(3e-3, "learning rate")
    recipe: str = option(
        "auto",
        "finetune (auto with --init): unless set, cosine, >= 1 warm-up epoch, --layer-decay 0.75, <= 30 epochs",
        ("auto", "scratch", "finetune"),
    )
    layer_decay: float = option(1.0, "layer-wise lr decay per block, from the head down (1: off)")
    weight_decay: float = option(1e-4, "weight decay")
    optimizer: str = option(
        "keras-adamw",
        "keras-adamw: the tutorial's add-on AdamW (decay w*=(1-wd) per step, independent of the lr; Keras epsilon); "
        "adamw: torch.optim.AdamW (decay scaled by the lr); muon: Muon on the blocks' matrices, AdamW-sized",
        ("keras-adamw", "adamw", "muon"),
    )
    schedule: str = option(
        "constant",
        "lr schedule over the steps: constant (the tutorial: only plateau halvings), cosine (linear warm-up, cosine "
        "to --min-lr) or onecycle (cosine up from lr/25 for the warm-up, cosine down)",
        ("constant", "cosine", "onecycle"),
    )
    warmup_epochs: float = option(0.0, "epochs of learning-rate warm-up (fractions allowed)")
    min_lr: float = option(0.0, "final lr of cosine and onecycle")
    ema: float = option(
        0.0,
        "an exponential moving average of the weights with this decay (e.g. 0.999; warm-up min(decay, "
        "(1+t)/(10+t))), evaluated beside the model every epoch and at the end, saved as ema.pt (0: off)",
    )
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy (0.1 is the usual modern value)")
    class_weights: str = option(
        "none",
        "balanced: each image's loss weighted by n / (classes x its class's training images), so that every class "
        "counts the same (scikit-learn's and Keras' class_weight)",
        ("none", "balanced"),
    )
    clip_grad: float = option(0.0, "clip the gradients' global L2 norm to this value before each step (0: off)")
    decay_norms_biases: bool = option(
        True, "apply weight decay to norm weights and biases too (the tutorial does; modern recipes do not)"
    )
    plateau_patience: int = option(5, "halve the lr on the Nth epoch in a row without val_loss improvement (0: off)")
    plateau_factor: float = option(0.5, "lr multiplier applied on a plateau")
    plateau_threshold: float = option(1e-4, "an epoch improves when val_loss < best - threshold (absolute)")
    early_stop_patience: int = option(10, "stop after N epochs in a row without val_loss improvement (0: off)")
    restore_best: str = option(
        "on-stop",
        "when the best epoch's weights become the final ones: on-stop (Keras 2, the tutorial), always (Keras 3), never",
        ("on-stop", "always", "never"),
    )

    def __post_init__(self) -> None:
        check_fields(self)
        positive(self, "epochs", "batch_size", "accum_steps")
        non_negative(self, "plateau_patience", "early_stop_patience")
        require(
            self.schedule == "constant" or not self.plateau_patience,
            f"--schedule {self.schedule} sets the lr itself; pass --plateau-patience 0 with it",
        )
        require(
            self.warmup_epochs >= 0 and self.min_lr >= 0 and self.clip_grad >= 0,
            "--warmup-epochs, --min-lr and --clip-grad must be >= 0",
        )
        fraction(self, "label_smoothing")
        require(0.0 <= self.ema < 1.0, f"--ema is a decay in [0, 1) (0: off), got {self.ema}")
        require(
            self.optimizer != "keras-adamw" or self.weight_decay < 1.0,
            f"--weight-decay {self.weight_decay}: keras-adamw multiplies the weights by (1 - decay) every step, so "
            "it must be below 1",
        )
        require(0.0 < self.plateau_factor < 1.0, f"--plateau-factor must be in (0, 1), got {self.plateau_factor}")
        require(0.0 < self.layer_decay <= 1.0, f"--layer-decay must be in (0, 1] (1: off), got {self.layer_decay}")
        require(
            self.lr > 0 and self.weight_decay >= 0 and self.plateau_threshold >= 0,
            "--lr must be positive; --weight-decay and --plateau-threshold must be >= 0",
        )


@dataclass(frozen=True)
class RunConfig:
    """Where and how the run executes: weights to start from, seed, device, precision, threads, output."""

    init: str | None = option(
        None,
        "start from these weights: a file (timm's gMLP, a gmlp checkpoint or export) or a Hugging Face Hub id "
        "(timm/gmlp_s16_224.ra3_in1k; the hub extra), adapted to this model's grid, channels, patch size and classes",
    )
    reset_head: bool = option(False, "with --init: always a new head")
    seed: int = option(0, "random seed (weights, shuffling, augmentation, dropout)")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    precision: str = option(
        "auto",
        "auto: bf16 where the device computes it natively (CPUs with AMX or AVX-512 bf16, GPUs of compute capability "
        "8.0+), else fp32; fp32; or bf16 or fp16 activations and matrix products with fp32 master weights and loss; "
        "fp16 (with a gradient scaler) is for GPUs without fast bf16, such as T4 and V100",
        ("auto", "fp32", "bf16", "fp16"),
    )
    compile: bool = option(False, "torch.compile the model (slower start; faster steps where the backend pays off)")
    cuda_graphs: bool = option(True, "replay each CUDA training step as a captured graph where the run allows it")
    threads: int = option(0, "CPU threads for torch (0: the usable cores less those busy with other work at start)")
    eval_batch_size: int = option(500, "images per batch when evaluating")
    out: str | None = option(None, "run directory (default: runs/<dataset>-<preset>-<time>)")
    checkpoint_every: int = option(0, "also save a resumable last.pt every N optimiser steps within an epoch (0: off)")
    progress: bool = option(True, "show a progress bar during each epoch")
    tensorboard: bool = option(
        False,
        "also log every epoch's metrics, the hyper-parameters and the test metrics to RUN_DIR/tensorboard (needs the "
        "tensorboard extra)",
    )
    mlflow: str | None = option(
        None,
        "also log the hyper-parameters, every epoch's metrics and the test metrics to this MLflow tracking URI: "
        "sqlite:///mlflow.db (or a path ending .db), http://host:5000 (needs the mlflow extra)",
    )
    wandb: str | None = option(
        None,
        "also log them to this Weights & Biases project (needs the wandb extra and a login; WANDB_MODE=offline keeps "
        "the run in RUN_DIR/wandb)",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        require(
            self.mlflow is None or "://" in self.mlflow or self.mlflow.endswith(".db"),
            f"--mlflow takes a tracking URI (sqlite:///mlflow.db, http://host:5000) or a path ending .db, got "
            f"{shown(self.mlflow)}",
        )
        bad = set("/\\#?%:") & set(self.wandb or "")
        require(
            self.wandb is None or (0 < len(self.wandb) <= 128 and not bad and self.wandb.isprintable()),
            f"--wandb takes a W&B project name (1 to 128 characters, none of / \\ # ? % :), got {shown(self.wandb)}",
        )
        require(0 <= self.seed < 2**32, f"--seed must be in 0..{2**32 - 1}, got {shown(self.seed)}")
        positive(self, "eval_batch_size")
        non_negative(self, "threads", "checkpoint_every")
        require(self.threads <= MAX_THREADS, f"--threads must be in 0..{MAX_THREADS}, got {self.threads}")
        check_device(self.device)
        require(self.init is not None or not self.reset_head, "--reset-head applies with --init only")
