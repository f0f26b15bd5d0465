"""Configuration: `Config` (one run: the preset and the groups model, data, augment, optim, run) and how it is built.

`checks.py` holds the rules every field obeys, `groups.py` the groups, `core.py` `Config` and its construction from
presets, files and flat values. The command line's flags are generated from these fields in `gmlp_vision.cli.flags`.

The package's API is ``__all__``: the names of `checks`, `core`, `groups` and `presets` that callers use, imported
from here (``from gmlp_vision.config import Config``); like `gmlp_vision/__init__.py`, this file re-exports on purpose.
"""

from gmlp_vision.config.checks import MAX_IMAGE_SIZE, MAX_INT, MAX_THREADS, MAX_TOKENS, check_device, field_types, flag
from gmlp_vision.config.core import (
    CONFIG_FILE_LIMIT,
    GROUP_OF,
    GROUPS,
    Config,
    config_yaml,
    fine_tunes,
    finetune_values,
    from_preset,
    load_config_file,
    recipe_line,
    resolve_config,
    to_flags,
    train_command,
)
from gmlp_vision.config.groups import AugmentConfig, DataConfig, ModelConfig, OptimConfig, RunConfig
from gmlp_vision.presets import DATASET_PRESET, PRESETS, preset_overrides

__all__ = [
    "CONFIG_FILE_LIMIT",
    "DATASET_PRESET",
    "GROUPS",
    "GROUP_OF",
    "MAX_IMAGE_SIZE",
    "MAX_INT",
    "MAX_THREADS",
    "MAX_TOKENS",
    "PRESETS",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "check_device",
    "config_yaml",
    "field_types",
    "fine_tunes",
    "finetune_values",
    "flag",
    "from_preset",
    "load_config_file",
    "preset_overrides",
    "recipe_line",
    "resolve_config",
    "to_flags",
    "train_command",
]
