"""`Config`: one training run, as the preset it started from and one group per concern; and how one is built.

Field names are unique across the groups, so flags, presets and flat dicts name a value without its group (``--lr``,
``from_preset("seed", lr=1e-3)``). Precedence of values: dataclass defaults < preset < config file < explicit values
(`resolve_config`). config.json files of every version load: grouped (0.2), nested with only ``model`` (0.1), or flat.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from gmlp_vision.config.checks import check_fields, flag, option, require
from gmlp_vision.config.groups import AugmentConfig, DataConfig, ModelConfig, OptimConfig, RunConfig
from gmlp_vision.errors import ConfigError, first_line, shown
from gmlp_vision.kinds import kind_of_data
from gmlp_vision.presets import DATASET_PRESET, PRESETS, preset_overrides

CONFIG_FILE_LIMIT = 1 << 20  # bytes; a run's config.json is about 2 KB

GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "augment": AugmentConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}
GROUP_OF: dict[str, str] = {f.name: group for group, cls in GROUPS.items() for f in fields(cls)}  # field -> group


@dataclass(frozen=True)
class Config:
    """One training run: the preset it started from and one group per concern."""

    preset: str | None = option(None, "preset the values started from (recorded; set with --preset)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        for group, cls in GROUPS.items():
            value = getattr(self, group)
            if not isinstance(value, cls):
                raise ConfigError(f"config key {group!r} must hold the {group} fields, got {type(value).__name__}")
        check_fields(self)
        require(
            self.preset is None or self.preset in PRESETS,
            f"--preset must be one of {', '.join(PRESETS)}, got {shown(self.preset)}",
        )
        crop_padding, image_size = self.augment.crop_padding, self.model.image_size
        require(
            self.augment.crop != "pad" or crop_padding < image_size,
            f"--crop-padding {crop_padding} must be smaller than the image ({image_size} px)",
        )

    def to_dict(self) -> dict[str, Any]:
        """Grouped plain dict (what config.json and checkpoints hold)."""
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """Every field's value in one flat dict (field names are unique across the groups)."""
        return _flatten(self.to_dict())

    def load_options(self, **changes: Any) -> dict[str, Any]:
        """The options this run's data is loaded with (`data.load_dataset`'s keywords), with ``changes`` applied.

        The one mapping from the config to the loaders: training and the commands that reload a run's data use it.
        """
        data = self.data
        options = {
            "download": data.download,
            "verify_md5": data.verify_md5,
            "progress": self.run.progress,
            "image_size": self.model.image_size,
            "skip_bad": data.skip_bad_images,
            "folder_mode": data.folder_mode,
            "workers": data.workers,
            "crop_scale": self.augment.crop_scale,
            "resize": data.resize,
            "crop_pct": data.crop_pct,
            "channels": self.model.in_chans,  # image folders only: the other kinds have their own
            "holdout": data.holdout,
        }
        return {**options, **changes}

    def replace(self, **values: Any) -> Config:
        """A checked copy with these fields changed, named flat: ``cfg.replace(epochs=3, num_classes=10)``."""
        return _from_flat({**self.to_flat(), **values})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Build from a grouped (0.2), model-nested (0.1) or flat dict; unknown keys are an error."""
        return _from_flat(_flatten(values))


def _names(keys: Any) -> str:
    keys = sorted(map(str, keys))
    names = ", ".join(k if k.isidentifier() and len(k) <= 60 else shown(k) for k in keys[:5])
    return names + (" ..." if len(keys) > 5 else "")


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    """Grouped or model-nested config values as one flat dict; flat input passes through.

    A group's key holds an object (``"data"`` is also a field: the path, a string or null, which stays a field).
    """
    flat = dict(values)
    if "model" in flat and not isinstance(flat["model"], dict):
        raise ConfigError(f"config key 'model' must hold an object, got {type(flat['model']).__name__}")
    for group in GROUPS:
        if not isinstance(flat.get(group), dict):
            continue
        inner = flat.pop(group)
        foreign = set(inner) - {f.name for f in fields(GROUPS[group])}
        if foreign:
            raise ConfigError(f"unknown config keys in {group!r}: {_names(foreign)}")
        twice = set(inner) & set(flat)
        if twice:
            raise ConfigError(f"config keys given twice (in {group!r} and at the top): {_names(twice)}")
        flat.update(inner)
    return flat


def _from_flat(flat: dict[str, Any]) -> Config:
    unknown = set(flat) - set(GROUP_OF) - {"preset"}
    if unknown:
        raise ConfigError(f"unknown config keys: {_names(unknown)}")
    try:
        groups = {g: cls(**{k: v for k, v in flat.items() if GROUP_OF.get(k) == g}) for g, cls in GROUPS.items()}
        return Config(preset=flat.get("preset"), **groups)
    except TypeError as e:  # a wrong-typed value from a JSON file
        raise ConfigError(f"invalid config: {e}") from None


def from_preset(name: str, **overrides: Any) -> Config:
    """A config from preset ``name`` with flat field overrides, e.g. ``from_preset("seed", epochs=3)``."""
    return _from_flat({**preset_overrides(name), **overrides})


def resolve_config(
    given: dict[str, Any],
    config_file: str | Path | None = None,
    preset: str | None = None,
    fit_of: Callable[[Any], dict[str, Any]] | None = None,
) -> Config:
    """Resolve defaults < preset < config file < ``given`` (flat explicit values) into a checked `Config`.

    With no ``preset`` (and none in the config file), the dataset's default preset is used (`DATASET_PRESET`). A
    config file's ``out`` is ignored (a run's own config.json names its directory; running it again starts a new
    one): only ``given`` sets it. A schedule other than ``constant`` sets the lr itself, so it turns the preset's
    plateau halvings off unless ``plateau_patience`` is given too. With the finetune recipe (`fine_tunes`), its
    values (`finetune_values`) sit between the preset and the file: what the file or ``given`` set wins. So does
    how the pretrained model fitted its images, ``fit_of(init)`` (``resize``, ``crop_pct``; the config layer reads no
    weights: the caller passes the reader, `pretrained.weights_fit`).

    Raises:
        ConfigError: an unknown preset, an unreadable config file, or an impossible combination of values.
    """
    from_file = load_config_file(config_file) if config_file else {}
    from_file.pop("out", None)
    if "dataset" not in given and "dataset" not in from_file:
        kind = kind_of_data(given.get("data", from_file.get("data")))
        if kind is not None:  # --data names an image folder or a table: its kind without --dataset
            given = {**given, "dataset": kind}
    preset = preset or from_file.get("preset")
    if preset is None:
        dataset = given.get("dataset", from_file.get("dataset", DataConfig.dataset))
        if not isinstance(dataset, str) or dataset not in DATASET_PRESET:
            raise ConfigError(f"--dataset must be one of {', '.join(DATASET_PRESET)}, got {shown(dataset)}")
        preset = DATASET_PRESET[dataset]
    values = {**preset_overrides(preset), **from_file, **given, "preset": preset}
    chosen = {**from_file, **given}
    if fine_tunes(values.get("recipe", OptimConfig.recipe), values.get("init")):
        init = values.get("init")
        recipe = {**finetune_values(values), **(fit_of(init) if fit_of and isinstance(init, str) and init else {})}
        applied = {k: v for k, v in recipe.items() if k not in chosen}  # unless set
        values.update(applied)
        if applied:  # the run's config says which recipe its values came from
            values["recipe"] = "finetune"
        chosen["schedule"] = values.get("schedule", OptimConfig.schedule)
    if chosen.get("schedule", "constant") != "constant" and "plateau_patience" not in chosen:
        values["plateau_patience"] = 0
    return _from_flat(values)


def recipe_line(cfg: Config) -> str:
    """The log line that names the recipe and its values (each one a flag)."""
    o = cfg.optim
    name = "finetune" if o.recipe == "finetune" else "scratch"  # resolve_config says which one applied
    why = " (--init)" if name == "finetune" and cfg.run.init is not None else ""
    decay = f", --layer-decay {o.layer_decay:g}" if o.layer_decay != 1.0 else ""
    schedule = f"--schedule {o.schedule}" + (f" with --warmup-epochs {o.warmup_epochs:g}" if o.warmup_epochs else "")
    fit = f", --resize {cfg.data.resize} --crop-pct {cfg.data.crop_pct:g}" if name == "finetune" else ""
    return f"recipe {name}{why}: --lr {o.lr:g}, {schedule}{decay}, --epochs {o.epochs}{fit}"


FINETUNE_EPOCHS = 30  # at most, with the finetune recipe
FINETUNE_LAYER_DECAY = 0.75


def fine_tunes(recipe: Any, init: Any) -> bool:
    """Whether a run trains with the finetune recipe: asked for, or ``auto`` with ``--init``."""
    return recipe == "finetune" or (recipe == "auto" and init is not None)


def finetune_values(values: dict[str, Any]) -> dict[str, Any]:
    """The finetune recipe over flat ``values`` (defaults where absent), as fine-tuning studies and timm do.

    A cosine schedule after a warm-up of at least one epoch, layer-wise lr decay (BEiT's and MAE's 0.75: the new head
    trains at the preset's lr, every pretrained layer at a lower one) and a short run (at most `FINETUNE_EPOCHS`).
    The lr itself stays the preset's: a tenth of it left the new head untrained in 30 short epochs
    (`benchmarks/bench_transfer.py`, 6 epochs of pretraining: 57.6 % with a tenth, 74.8 % with the preset's lr, 68.5 %
    from scratch).
    """
    lr, warmup, epochs = (values.get(k, getattr(OptimConfig, k)) for k in ("lr", "warmup_epochs", "epochs"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lr, warmup, epochs)):
        return {}  # the config's own checks name the value of the wrong type
    return {
        "lr": lr,
        "schedule": "cosine",
        "warmup_epochs": max(warmup, 1.0),
        "layer_decay": FINETUNE_LAYER_DECAY,
        "epochs": min(epochs, FINETUNE_EPOCHS),
    }


YAML_SUFFIXES = (".yaml", ".yml")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A flat dict of the values in a config file of any version; types are checked when a `Config` is built.

    JSON (a run's config.json), or YAML where the name ends in .yaml or .yml (`gmlp train --print-config` writes it),
    grouped as config.json is or flat.

    Raises:
        ConfigError: not a regular file, larger than `CONFIG_FILE_LIMIT`, not JSON or YAML, YAML with aliases, or
            not a mapping.
    """
    path = Path(path)
    if not path.is_file():  # /dev/zero, a FIFO or a folder would be read forever or not at all
        raise ConfigError(f"config file {path} " + ("not found" if not path.exists() else "is not a regular file"))
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_FILE_LIMIT + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {first_line(e)}") from None
    if len(data) > CONFIG_FILE_LIMIT:
        raise ConfigError(f"config file {path} is larger than {CONFIG_FILE_LIMIT >> 20} MiB; not a run config")
    values = _yaml(data, path) if path.suffix.lower() in YAML_SUFFIXES else _json(data, path)
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of names to values")
    return _flatten(values)


def _json(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # TOML or a typo: say what is read
        raise ConfigError(
            f"config file {path} is not JSON ({first_line(e)}); --config reads JSON, or YAML from a .yaml or .yml file"
        ) from None


class _NoAliases(yaml.SafeLoader):
    """YAML's safe loader without aliases: a config needs none, and nested aliases expand exponentially."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not allowed in a config: write the values out")
        return super().compose_node(parent, index)


def _yaml(data: bytes, path: Path) -> Any:
    try:
        return yaml.load(data, Loader=_NoAliases)  # noqa: S506 (a safe loader, aliases refused)
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise ConfigError(f"config file {path} is not YAML we read: {problem}{where}") from None


def config_yaml(cfg: Config) -> str:
    """``cfg`` as YAML, grouped as config.json is: what ``--print-config`` prints and ``--config`` reads back."""
    plain = json.loads(json.dumps(cfg.replace(out=None).to_dict()))  # lists for tuples; out: a new run's own
    head = "# gmlp train --config FILE reads this back; num_classes and in_chans are the data's when it trains\n"
    return head + yaml.safe_dump(plain, sort_keys=False, allow_unicode=False, width=1000)


def to_flags(cfg: Config, base: Config | None = None, leave_out: tuple[str, ...] = ()) -> list[str]:
    """Command-line flags that rebuild ``cfg`` exactly; with ``base``, only the values that differ from it.

    ``leave_out`` names fields to leave out (e.g. ``out``, so that the command starts a new run directory).
    """
    flags = []
    before = base.to_flat() if base is not None else {}
    for name, value in cfg.to_flat().items():
        if value is None or name in leave_out or (name in before and before[name] == value):
            continue
        if isinstance(value, bool):
            flags.append(flag(name) if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag(name), repr(value) if isinstance(value, float) else str(value)]
    return flags


def train_command(cfg: Config) -> str:
    """The ``gmlp train`` command that runs ``cfg`` again in a new run directory (results.json records it).

    The flags are those that differ from the preset; the class count and channels come from the data, so they are
    left out with ``out``.
    """
    base = from_preset(cfg.preset) if cfg.preset else None  # no preset: every value, over the dataset's preset
    flags = to_flags(cfg, base, leave_out=("out", "num_classes", "in_chans", "preset"))
    return shlex.join(["gmlp", "train", *(["--preset", cfg.preset] if cfg.preset else []), *flags])
