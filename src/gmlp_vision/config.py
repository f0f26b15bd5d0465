"""Configuration: the model's architecture (`ModelConfig`), the run (`Config`), presets, and the CLI parser.

`ModelConfig` defaults follow the paper (Liu et al., 2021, "Pay Attention to MLPs", arXiv 2105.08050, gMLP-S at
224 px); the `seed` preset overrides them to reproduce the Keras tutorial exactly (see SPEC.md). Precedence of values:
dataclass defaults < ``--preset NAME`` < ``--config run.json`` < explicit flags. The parser is generated from the
fields, so every field is a flag (``embed_dim`` -> ``--embed-dim``) and no flag is written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gmlp_vision.data.registry import DATASET_KINDS
from gmlp_vision.errors import ConfigError, first_line, shown
from gmlp_vision.presets import DATASET_PRESET, PRESETS, preset_overrides


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field whose help text (and choices) become the CLI flag's."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, and nothing else: the only thing `model.py` sees."""

    image_size: int = _f(224, "input height and width in pixels (images of another size are resized)")
    patch_size: int = _f(16, "side of the square non-overlapping patches")
    in_chans: int = _f(3, "image channels (set from the dataset when training)")
    num_classes: int = _f(1000, "classifier outputs (set from the dataset when training)")
    embed_dim: int = _f(256, "token width d")
    ffn_dim: int = _f(1536, "hidden width of each block (split in two halves by the gate)")
    depth: int = _f(30, "number of gMLP blocks")
    dropout: float = _f(0.0, "dropout after the GELU inside every block")
    head_dropout: float = _f(0.0, "dropout on the pooled features before the classifier")
    drop_path: float = _f(0.0, "stochastic depth rate of the last block (rises linearly from 0), per sample")
    norm_eps: float = _f(1e-6, "LayerNorm epsilon")
    gelu: str = _f("exact", "GELU form: exact (paper) or tanh (the tutorial's add-on default)", ("exact", "tanh"))
    shortcut: str = _f(
        "input",
        "residual source: input (paper: the block input) or normed (tutorial quirk: the normalised input)",
        ("input", "normed"),
    )
    spatial_init: str = _f(
        "near-zero",
        "spatial projection weights: near-zero (paper, each block starts as a plain MLP) or glorot (tutorial)",
        ("near-zero", "glorot"),
    )
    final_norm: bool = _f(True, "LayerNorm on the tokens before pooling (paper and timm: on; tutorial: off)")
    attn_dim: int = _f(0, "aMLP: width of a tiny single-head attention added to every gate (paper: 64; 0: gMLP)")

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choices(self)
        for name in ("image_size", "patch_size", "in_chans", "num_classes", "embed_dim", "ffn_dim", "depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be a positive integer, got {getattr(self, name)}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(f"--image-size must be at most {MAX_IMAGE_SIZE:,d} pixels, got {self.image_size}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"--patch-size {self.patch_size} does not divide --image-size {self.image_size}: "
                "patches must tile the image exactly"
            )
        if self.num_patches > MAX_TOKENS:
            raise ConfigError(
                f"--image-size {self.image_size} with --patch-size {self.patch_size} gives {self.num_patches:,d} "
                f"tokens; at most {MAX_TOKENS:,d} (the spatial projection is tokens x tokens)"
            )
        if self.attn_dim < 0:
            raise ConfigError(f"--attn-dim must be >= 0, got {self.attn_dim}")
        if self.ffn_dim % 2:
            raise ConfigError(f"--ffn-dim must be even (the gate splits it in two halves), got {self.ffn_dim}")
        for name in ("dropout", "head_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.norm_eps <= 0:
            raise ConfigError(f"--norm-eps must be positive, got {self.norm_eps}")

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
class Config:
    """One training run: data, recipe, runtime, and the nested `ModelConfig`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str | None = _f(None, "preset the values started from (recorded; set with --preset)")
    # Data.
    dataset: str = _f(
        "cifar100",
        "dataset; folder: --data DIR with train/ and val/ (or test/) class folders",
        tuple(DATASET_KINDS),
    )
    data: str | None = _f(
        None, "local archive (.tar.gz) or extracted folder; default: the cache, downloading if needed"
    )
    download: bool = _f(True, "download the official archive into the cache when it is missing")
    verify_md5: bool = _f(False, "check a local archive against the official md5 sum")
    skip_bad_images: bool = _f(False, "folder datasets: leave out unreadable image files (logged) instead of failing")
    folder_mode: str = _f(
        "auto",
        "folder datasets: memory (decode once into a cached uint8 tensor), stream (decode every batch in worker "
        "processes), auto (memory when the decoded images take at most 4 GiB and a quarter of the RAM)",
        ("auto", "memory", "stream"),
    )
    workers: int = _f(4, "streamed folders: worker processes decoding images (0: in the training process)")
    train_limit: int = _f(0, "use only the first N training images, before the validation split (0: all)")
    val_split: float = _f(0.1, "fraction of the training images held out for validation: the LAST ones (Keras)")
    # Augmentation (training only, batched on the training device).
    flip: bool = _f(True, "random horizontal flip, p=0.5 per image")
    zoom: float = _f(0.2, "random zoom: per image and axis a factor from U(1-zoom, 1+zoom); 0 turns it off")
    crop: str = _f(
        "none",
        "random-resized: a random crop (area --crop-scale..100 %%, aspect 3/4..4/3) resized to the input size, taken "
        "from the full-size file when streaming, else batched on the device; pad: a random input-size window of the "
        "image reflect-padded by --crop-padding pixels (the CIFAR classic)",
        ("none", "random-resized", "pad"),
    )
    crop_scale: float = _f(0.08, "smallest area fraction of a random-resized crop")
    crop_padding: int = _f(4, "padding in pixels of --crop pad (a random shift of up to this many pixels)")
    policy: str = _f(
        "none",
        "automatic augmentation, batched: trivial (TrivialAugment: one random op per image at a random magnitude, "
        "over RandAugment's standard ranges, not TrivialAugment-wide's) or randaugment (--policy-ops ops per image, "
        "always applied, at --policy-magnitude)",
        ("none", "trivial", "randaugment"),
    )
    policy_ops: int = _f(2, "randaugment: ops applied in a row to each image (N)")
    policy_magnitude: float = _f(9.0, "randaugment: strength of every op, 0..10 (M; 10 is the strongest)")
    erase: float = _f(0.0, "random erasing: probability per image that a random box is replaced by noise (0: off)")
    mixup: float = _f(0.0, "mixup alpha: blend each batch with itself reversed, lam ~ Beta(alpha, alpha) (0: off)")
    cutmix: float = _f(0.0, "cutmix alpha: paste a box of the reversed batch (0: off; with --mixup, one of the two)")
    # Optimisation.
    epochs: int = _f(100, "maximum number of epochs")
    batch_size: int = _f(
        128, "images per optimiser step over all processes (the global batch; the last smaller batch is kept)"
    )
    accum_steps: int = _f(
        1, "split each process's share of a batch into N micro-batches whose gradients add up (same step, less memory)"
    )
    lr: float = _f(3e-3, "learning rate")
    weight_decay: float = _f(1e-4, "weight decay")
    optimizer: str = _f(
        "keras-adamw",
        "keras-adamw: the tutorial's add-on AdamW (decay w*=(1-wd) per step, independent of the lr; Keras epsilon); "
        "adamw: torch.optim.AdamW (decay scaled by the lr)",
        ("keras-adamw", "adamw"),
    )
    schedule: str = _f(
        "constant",
        "lr schedule over the steps: constant (the tutorial: only plateau halvings), cosine (linear warm-up, cosine "
        "to --min-lr) or onecycle (cosine up from lr/25 for the warm-up, cosine down)",
        ("constant", "cosine", "onecycle"),
    )
    warmup_epochs: float = _f(0.0, "epochs of learning-rate warm-up (fractions allowed)")
    min_lr: float = _f(0.0, "learning rate at the end of a cosine or onecycle schedule")
    ema: float = _f(
        0.0,
        "keep an exponential moving average of the weights with this decay (e.g. 0.999; warm-up min(decay, "
        "(1+t)/(10+t))), evaluated beside the model on the validation split every epoch (when there is one) and on "
        "the test split at the end, saved as ema.pt (0: off)",
    )
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy (0.1 is the usual modern value)")
    clip_grad: float = _f(0.0, "clip the gradients' global L2 norm to this value before each step (0: off)")
    decay_norms_biases: bool = _f(
        True, "apply weight decay to norm weights and biases too (the tutorial does; modern recipes do not)"
    )
    plateau_patience: int = _f(5, "halve the lr on the Nth epoch in a row without val_loss improvement (0: off)")
    plateau_factor: float = _f(0.5, "lr multiplier applied on a plateau")
    plateau_threshold: float = _f(1e-4, "an epoch improves when val_loss < best - threshold (absolute)")
    early_stop_patience: int = _f(10, "stop after N epochs in a row without val_loss improvement (0: off)")
    restore_best: str = _f(
        "on-stop",
        "when the best epoch's weights become the final ones: on-stop (Keras 2, the tutorial), always (Keras 3), never",
        ("on-stop", "always", "never"),
    )
    init: str | None = _f(
        None,
        "start from these weights: a timm gMLP file (e.g. gmlp_s16_224 .safetensors/.pth) or a gmlp checkpoint; "
        "spatial projections are resampled to this token grid, the head is kept only when the classes match",
    )
    # Runtime.
    seed: int = _f(0, "random seed (weights, shuffling, augmentation, dropout)")
    device: str = _f("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    precision: str = _f(
        "fp32", "fp32, or bf16 activations and matrix products with fp32 master weights and loss", ("fp32", "bf16")
    )
    compile: bool = _f(False, "torch.compile the model (slower start; faster steps where the backend pays off)")
    threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    eval_batch_size: int = _f(500, "images per batch when evaluating")
    out: str | None = _f(None, "run directory (default: runs/<dataset>-<preset>-<time>)")
    checkpoint_every: int = _f(0, "also save a resumable last.pt every N optimiser steps within an epoch (0: off)")
    progress: bool = _f(True, "show a progress bar during each epoch")
    tensorboard: bool = _f(False, "also log every epoch's metrics to RUN_DIR/tensorboard (needs the tensorboard extra)")

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"config key 'model' must hold the model's fields, got {type(self.model).__name__}")
        _check_types(self)
        _check_choices(self)
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {shown(self.preset)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in 0..{2**32 - 1}, got {shown(self.seed)}")
        if not 0.0 <= self.val_split < 1.0:
            raise ConfigError(f"--val-split must be in [0, 1), got {self.val_split}")
        for name in ("epochs", "batch_size", "accum_steps", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be a positive integer, got {getattr(self, name)}")
        for name in ("train_limit", "plateau_patience", "early_stop_patience", "threads", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.schedule != "constant" and self.plateau_patience:
            raise ConfigError(f"--schedule {self.schedule} sets the lr itself; pass --plateau-patience 0 with it")
        if self.warmup_epochs < 0 or self.min_lr < 0 or self.clip_grad < 0:
            raise ConfigError("--warmup-epochs, --min-lr and --clip-grad must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("--mixup and --cutmix take a Beta alpha >= 0 (0: off)")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ConfigError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if self.crop_padding < 0 or self.policy_ops < 1 or not 0.0 <= self.policy_magnitude <= 10.0:
            raise ConfigError("--crop-padding must be >= 0, --policy-ops >= 1 and --policy-magnitude in 0..10")
        if self.crop == "pad" and self.crop_padding >= self.model.image_size:
            raise ConfigError(
                f"--crop-padding {self.crop_padding} must be smaller than the image ({self.model.image_size} px)"
            )
        if not 0.0 <= self.erase <= 1.0:
            raise ConfigError(f"--erase is a probability in [0, 1], got {self.erase}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"--ema is a decay in [0, 1) (0: off), got {self.ema}")
        if not 0 <= self.workers <= MAX_THREADS or self.threads > MAX_THREADS:
            raise ConfigError(
                f"--workers and --threads must be in 0..{MAX_THREADS}, got {self.workers} and {self.threads}"
            )
        if self.optimizer == "keras-adamw" and self.weight_decay >= 1.0:
            raise ConfigError(
                f"--weight-decay {self.weight_decay}: keras-adamw multiplies the weights by (1 - decay) every step, so "
                "it must be below 1"
            )
        if not 0.0 <= self.zoom < 1.0:
            raise ConfigError(f"--zoom must be in [0, 1), got {self.zoom}")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ConfigError(f"--plateau-factor must be in (0, 1), got {self.plateau_factor}")
        if self.lr <= 0 or self.weight_decay < 0 or self.plateau_threshold < 0:
            raise ConfigError("--lr must be positive; --weight-decay and --plateau-threshold must be >= 0")
        check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (what config.json and checkpoints hold)."""
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """Every field's value in one flat dict (field names are unique across `Config` and `ModelConfig`)."""
        return _flatten(self.to_dict())

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Build from a nested (config.json) or flat dict; unknown keys are an error."""
        return _from_flat(_flatten(values))


_MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig))
_RUN_FIELDS = tuple(f.name for f in fields(Config) if f.name != "model")


def check_device(name: str) -> str:
    """``name`` if it is a device the CLI accepts: auto, cpu, cuda or cuda:N.

    Raises:
        ConfigError: anything else (meta, mps, a typo), naming the flag.
    """
    if not (name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,3}", name)):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {shown(name)}")
    return name


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Each field's value type and whether None is allowed, from the annotations (``str | None`` -> (str, True))."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        kinds = [a for a in args if a is not type(None)] or [hint]
        out[name] = (kinds[0], type(None) in args)
    return out


MAX_IMAGE_SIZE = 16_384  # pixels per side: far beyond any gMLP input, far below sizes whose patches overflow
MAX_TOKENS = 65_536  # a 256 x 256 patch grid: its spatial projections alone hold 4.3G weights per block
MAX_INT = 2**31 - 1  # the largest integer any field takes (but --seed: 0..2**32-1)
MAX_THREADS = 1024  # torch crashes (SIGSEGV) when asked for 100,000 threads; no machine has more than this many cores
_KIND_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def _check_types(obj: Any) -> None:
    """Refuse a value of the wrong type (JSON files and library callers are not argparse) and non-finite floats.

    An integer given for a float field becomes that float; nothing else is converted (``"no"`` is not false, ``8.0`` is
    not an integer).
    """
    for name, (kind, optional) in _field_types(type(obj)).items():
        if kind not in _KIND_WORDS:
            continue  # the nested ModelConfig
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if kind is float and type(value) is int:
            value = float(value) if abs(value) < 2**1000 else math.inf  # larger ints overflow float: not finite
            object.__setattr__(obj, name, value)  # frozen: __post_init__ is where a field may still be set
        ok = type(value) is kind and (kind is not float or math.isfinite(value))
        if not ok:
            what = _KIND_WORDS[kind] + (" or null" if optional else "")
            raise ConfigError(f"{_flag(name)} must be {what}, got {shown(value)}")
        if kind is int and name != "seed" and abs(value) > MAX_INT:  # torch sizes and counts are 32-bit somewhere
            raise ConfigError(f"{_flag(name)} must be at most {MAX_INT:,d}, got {shown(value)}")


def _check_choices(obj: Any) -> None:
    for f in fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ConfigError(f"{_flag(f.name)} must be one of {', '.join(choices)}, got {shown(getattr(obj, f.name))}")


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    """Nested config values (``{"model": {...}, ...}``) as one flat dict; flat input passes through."""
    flat = dict(values)
    model = flat.pop("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"config key 'model' must hold an object, got {type(model).__name__}")
    return {**flat, **model}


def _from_flat(flat: dict[str, Any]) -> Config:
    unknown = set(flat) - set(_MODEL_FIELDS) - set(_RUN_FIELDS)
    if unknown:
        keys = sorted(map(str, unknown))
        names = ", ".join(k if k.isidentifier() and len(k) <= 60 else shown(k) for k in keys[:5])
        raise ConfigError(f"unknown config keys: {names}{' ...' if len(keys) > 5 else ''}")
    try:
        model = ModelConfig(**{k: v for k, v in flat.items() if k in _MODEL_FIELDS})
        return Config(model=model, **{k: v for k, v in flat.items() if k in _RUN_FIELDS})
    except TypeError as e:  # a wrong-typed value from a JSON file
        raise ConfigError(f"invalid config: {e}") from None


def from_preset(name: str, **overrides: Any) -> Config:
    """A config from preset ``name`` with flat field overrides, e.g. ``from_preset("seed", epochs=3)``."""
    return _from_flat({**preset_overrides(name), **overrides})


def _arg_type(f: dataclasses.Field) -> Any:
    return _field_types(ModelConfig if f.name in _MODEL_FIELDS else Config)[f.name][0]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field to ``parser``; unset flags stay absent from the namespace."""
    parser.add_argument("--preset", default=argparse.SUPPRESS, help=f"start from a preset: {', '.join(PRESETS)}")
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="JSON", help="config.json of an earlier run")
    for cls, names in ((Config, _RUN_FIELDS), (ModelConfig, _MODEL_FIELDS)):
        group = parser.add_argument_group("model" if cls is ModelConfig else "run")
        for f in fields(cls):
            if f.name not in names or f.name == "preset":
                continue
            kind = _arg_type(f)
            kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})")
            if kind is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = kind
                if f.metadata.get("choices"):
                    kw["choices"] = f.metadata["choices"]
                kw["metavar"] = f.name.split("_")[-1].upper() if not f.metadata.get("choices") else None
            group.add_argument(_flag(f.name), **kw)


def explicit_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given explicitly on the command line (flat)."""
    return {k: v for k, v in vars(args).items() if k in _MODEL_FIELDS or k in _RUN_FIELDS}


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve defaults < preset < --config file < explicit flags into a validated `Config`.

    With no --preset (and none in the --config file), the dataset's default preset is used (`DATASET_PRESET`).

    Raises:
        ConfigError: an unknown preset, an unreadable config file, or an impossible combination of values.
    """
    given = explicit_values(args)
    from_file: dict[str, Any] = {}
    if getattr(args, "config", None):
        from_file = load_config_file(args.config)
    preset = getattr(args, "preset", None) or from_file.get("preset")
    if preset is None:
        dataset = given.get("dataset", from_file.get("dataset", Config.dataset))
        if not isinstance(dataset, str) or dataset not in DATASET_PRESET:
            raise ConfigError(f"--dataset must be one of {', '.join(DATASET_PRESET)}, got {shown(dataset)}")
        preset = DATASET_PRESET[dataset]
    return _from_flat({**preset_overrides(preset), **from_file, **given, "preset": preset})


CONFIG_FILE_LIMIT = 1 << 20  # bytes; a run's config.json is about 2 KB


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A flat dict of the values in a config.json file (nested or flat); types are checked when a `Config` is built.

    Raises:
        ConfigError: not a regular file, larger than `CONFIG_FILE_LIMIT`, not JSON, or not a JSON object.
    """
    path = Path(path)
    try:
        if not path.is_file():  # /dev/zero, a FIFO or a folder would be read forever or not at all
            raise ConfigError(f"config file {path} " + ("not found" if not path.exists() else "is not a regular file"))
        with open(path, "rb") as f:
            data = f.read(CONFIG_FILE_LIMIT + 1)
        if len(data) > CONFIG_FILE_LIMIT:
            raise ConfigError(f"config file {path} is larger than {CONFIG_FILE_LIMIT >> 20} MiB; not a run config")
        values = json.loads(data)
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"cannot read config file {path}: {first_line(e)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return _flatten(values)


def to_flags(cfg: Config) -> list[str]:
    """Command-line flags that rebuild ``cfg`` exactly (used by tests and to print a run's command)."""
    flags = []
    for name, value in cfg.to_flat().items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [_flag(name), repr(value) if isinstance(value, float) else str(value)]
    return flags
