"""The training flags, generated from the config's fields: every field is a flag of its name, none written twice.

``embed_dim`` becomes ``--embed-dim``, a bool field a ``--x/--no-x`` pair; help and choices come from the field. The
help's sections follow the config's groups, with the recipe split into optimisation and schedule and the run's outputs
on their own, and each default shown is the one plain ``gmlp train`` runs (the default dataset's preset), with the
values another dataset's preset changes. Unset flags stay absent from the namespace, so `explicit_values` holds only
what the user typed, and `config_from_args` resolves defaults < preset < ``--config`` file < flags.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from gmlp_vision.config import (
    DATASET_PRESET,
    GROUP_OF,
    GROUPS,
    PRESETS,
    Config,
    DataConfig,
    field_types,
    flag,
    resolve_config,
)

# Help sections in order: a config group each, but the recipe's schedule and the run's outputs stand apart.
SECTION_TITLES = {
    "data": "data",
    "model": "model (the architecture)",
    "augment": "augmentation (training only)",
    "optim": "optimisation",
    "schedule": "schedule and stopping",
    "run": "run",
    "output": "output",
}
_SECTION_OF = {
    **dict.fromkeys(("epochs", "schedule", "warmup_epochs", "min_lr", "restore_best"), "schedule"),
    **dict.fromkeys(("plateau_patience", "plateau_factor", "plateau_threshold", "early_stop_patience"), "schedule"),
    **dict.fromkeys(("out", "checkpoint_every", "progress", "tensorboard"), "output"),
}
# What a value is, where the field's kind alone would say too little (a float may be a rate, a decay, a size).
METAVARS = {
    **dict.fromkeys(("dropout", "head_dropout", "drop_path", "erase"), "P"),
    **dict.fromkeys(("val_split", "zoom", "crop_scale", "label_smoothing"), "FRACTION"),
    **dict.fromkeys(("lr", "min_lr"), "LR"),
    **dict.fromkeys(("mixup", "cutmix"), "ALPHA"),
    **dict.fromkeys(("data", "init"), "PATH"),
    "out": "DIR",
    "mlflow": "URI",
    "wandb": "PROJECT",
    "ema": "DECAY",
    "weight_decay": "WD",
    "warmup_epochs": "EPOCHS",
    "clip_grad": "NORM",
    "norm_eps": "EPS",
    "plateau_factor": "FACTOR",
    "plateau_threshold": "DELTA",
    "policy_magnitude": "M",
    "device": "DEVICE",
}


def section(name: str) -> str:
    """The help section of field ``name``."""
    return _SECTION_OF.get(name, GROUP_OF[name])


@functools.cache
def shown_defaults() -> dict[str, str]:
    """Each field's default as plain ``gmlp train`` runs it, and what each other dataset's own preset changes.

    For example ``"100; digits: 40; folder, csv: 20"`` for ``epochs``: the help says what a run will use, not the
    dataclass (kinds that share a value are named together, in the table's order).
    Fields the data decides say so; unset optional values show nothing (their help says what happens).
    """
    plain = resolve_config({}).to_flat()
    own = {d for d, p in DATASET_PRESET.items() if p != DATASET_PRESET[_DEFAULT_DATASET]}
    others = {d: resolve_config({"dataset": d}).to_flat() for d in sorted(own, key=list(DATASET_PRESET).index)}
    out = {}
    for name, value in plain.items():
        if name in FROM_DATA:
            out[name] = "the dataset's"
            continue
        changed: dict[str, list[str]] = {}
        for d, flat in others.items():
            if flat[name] != value != flat["dataset"]:
                changed.setdefault(str(flat[name]), []).append(d)
        changes = [f"{', '.join(kinds)}: {shown}" for shown, kinds in changed.items()]
        out[name] = "; ".join([str(value), *changes]) if value is not None or changes else ""
    return out


FROM_DATA = ("num_classes", "in_chans")  # set from the dataset when training
_DEFAULT_DATASET = DataConfig().dataset
USAGE = "%(prog)s [-h] [--preset NAME] [--config FILE] [FLAG VALUE ...]"
DEFAULTS_NOTE = (
    f"Defaults are those of plain `gmlp train`: {_DEFAULT_DATASET} with the {DATASET_PRESET[_DEFAULT_DATASET]} preset. "
    "Another --dataset starts from its own preset; where that changes a default, the help adds it (`digits: 8`: with "
    "--dataset digits). --preset NAME starts from NAME (`gmlp presets -v` lists every value); a --config file, then "
    "the flags, override them."
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field to ``parser``, in topic sections; unset flags stay absent from the namespace."""
    parser.add_argument(
        "--preset", default=argparse.SUPPRESS, metavar="NAME", help=f"start from a preset: {', '.join(PRESETS)}"
    )
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="a config.json (e.g. an earlier run's) or a .yaml/.yml file (--print-config writes one); its out is "
        "ignored, so the run gets a new directory",
    )
    sections = {key: parser.add_argument_group(title) for key, title in SECTION_TITLES.items()}
    defaults = shown_defaults()
    for cls in GROUPS.values():
        for f in fields(cls):
            sections[section(f.name)].add_argument(flag(f.name), **_argument(cls, f, defaults[f.name]))


def _argument(cls: type, f: Any, default: str) -> dict[str, Any]:
    kind = field_types(cls)[f.name][0]
    text = f"{f.metadata['help']} (default: {default})" if default else f.metadata["help"]
    kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=text)
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif f.metadata.get("choices"):
        kw.update(type=kind, choices=f.metadata["choices"])
    else:
        kw.update(type=kind, metavar=METAVARS.get(f.name, "N" if kind is int else "X" if kind is float else "VALUE"))
    return kw


def explicit_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given explicitly on the command line (flat)."""
    return {k: v for k, v in vars(args).items() if k in GROUP_OF}


def config_from_args(args: argparse.Namespace, fit_of: Callable[[Any], dict[str, Any]] | None = None) -> Config:
    """The `Config` the parsed flags describe: defaults < preset < ``--config`` file < explicit flags.

    ``fit_of`` reads how ``--init``'s weights fitted their images, for the finetune recipe (`resolve_config`).

    Raises:
        ConfigError: an unknown preset, an unreadable config file, or an impossible combination of values.
    """
    preset = getattr(args, "preset", None)
    return resolve_config(explicit_values(args), getattr(args, "config", None), preset, fit_of)
