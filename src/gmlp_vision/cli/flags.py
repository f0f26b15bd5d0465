"""The training flags, generated from the config's fields: every field is a flag of its name, none written twice.

``embed_dim`` becomes ``--embed-dim``, a bool field a ``--x/--no-x`` pair; help and choices come from the field. Unset
flags stay absent from the namespace, so `explicit_values` holds only what the user typed, and `config_from_args`
resolves defaults < preset < ``--config`` file < flags with `config.resolve_config`.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from gmlp_vision.config import GROUP_OF, GROUPS, PRESETS, Config, field_types, flag, resolve_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field to ``parser``, a group per config group; unset flags stay absent."""
    parser.add_argument("--preset", default=argparse.SUPPRESS, help=f"start from a preset: {', '.join(PRESETS)}")
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="JSON", help="config.json of an earlier run")
    for group, cls in GROUPS.items():
        arguments = parser.add_argument_group(group)
        for f in fields(cls):
            kind = field_types(cls)[f.name][0]
            default = f.default if f.default is not MISSING else None
            kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {default})")
            if kind is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = kind
                if f.metadata.get("choices"):
                    kw["choices"] = f.metadata["choices"]
                kw["metavar"] = f.name.split("_")[-1].upper() if not f.metadata.get("choices") else None
            arguments.add_argument(flag(f.name), **kw)


def explicit_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given explicitly on the command line (flat)."""
    return {k: v for k, v in vars(args).items() if k in GROUP_OF}


def config_from_args(args: argparse.Namespace) -> Config:
    """The `Config` the parsed flags describe: defaults < preset < ``--config`` file < explicit flags.

    Raises:
        ConfigError: an unknown preset, an unreadable config file, or an impossible combination of values.
    """
    return resolve_config(explicit_values(args), getattr(args, "config", None), getattr(args, "preset", None))
