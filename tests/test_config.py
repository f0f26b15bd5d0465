import argparse
import dataclasses
import json

import pytest

from gmlp_vision.cli.flags import add_config_arguments, config_from_args
from gmlp_vision.config import DATASET_PRESET, GROUP_OF, GROUPS, PRESETS, Config, from_preset, to_flags, train_command
from gmlp_vision.errors import ConfigError
from gmlp_vision.kinds import KINDS


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_field_names_are_unique_across_the_groups_and_never_a_group_name_but_data():
    names = [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    # "data" is both a group and the path field: a group's key holds an object, the path a string or null.
    assert set(names) & {*GROUPS, "preset"} == {"data"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips_through_flags(name):
    cfg = from_preset(name)
    assert cfg.preset == name
    assert parse(to_flags(cfg)) == cfg
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_every_preset_key_is_a_field():
    names = set(GROUP_OF)
    for overrides in PRESETS.values():
        assert set(overrides) <= names


def test_no_flags_is_the_tutorial():
    cfg = parse([])
    assert (cfg.data.dataset, cfg.preset) == ("cifar100", "seed")
    assert cfg == from_preset("seed")


def test_dataset_alone_picks_its_preset_and_explicit_preset_wins():
    assert parse(["--dataset", "digits"]).preset == DATASET_PRESET["digits"] == "digits"
    assert parse(["--dataset", "cifar10"]).preset == "seed"
    assert parse(["--dataset", "digits", "--preset", "tiny"]).preset == "tiny"
    folder = parse(["--dataset", "folder", "--data", "photos"])  # your own images: the general recipe, not seed's
    assert folder.preset == "general" and folder.optim.schedule == "onecycle" and folder.model.dropout == 0.0
    assert folder.run.precision == "auto" and folder.data.val_split == 0.1  # bf16 where native, else fp32


def test_every_dataset_kind_starts_from_a_preset():
    assert tuple(DATASET_PRESET) == tuple(KINDS)
    assert set(DATASET_PRESET.values()) <= set(PRESETS)


def test_precedence_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "seed", "lr": 0.01, "model": {"depth": 6}, "epochs": 7}))
    cfg = parse(["--config", str(path), "--epochs", "3"])
    assert (cfg.preset, cfg.optim.lr, cfg.model.depth, cfg.optim.epochs) == ("seed", 0.01, 6, 3)
    assert cfg.model.embed_dim == 128  # from the preset
    assert parse(["--config", str(path), "--preset", "tiny"]).model.embed_dim == 32


def test_booleans_have_negative_flags():
    assert parse(["--no-flip"]).augment.flip is False
    assert parse(["--preset", "digits", "--flip"]).augment.flip is True


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--patch-size", "5"], "--patch-size 5 does not divide --image-size 32"),
        (["--ffn-dim", "255"], "--ffn-dim must be even"),
        (["--dropout", "1.5"], "--dropout must be in"),
        (["--val-split", "1.0"], "--val-split"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_impossible_values_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse(flags)


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON .*--config reads JSON, or YAML from a .yaml or .yml file"):
        parse(["--config", str(bad)])
    bad.write_text(json.dumps({"no_such_field": 1}))
    with pytest.raises(ConfigError, match="unknown config keys: no_such_field"):
        parse(["--config", str(bad)])
    with pytest.raises(ConfigError, match="config file .*missing.json not found"):
        parse(["--config", str(tmp_path / "missing.json")])
    (tmp_path / "run.yaml").write_text("lr: 0.01\nepochs: 3\n")  # YAML is read (tests/test_config_yaml.py)
    assert parse(["--config", str(tmp_path / "run.yaml")]).optim.epochs == 3
    bad.write_text(json.dumps({"model": 5}))
    with pytest.raises(ConfigError, match="'model' must hold an object"):
        parse(["--config", str(bad)])


def test_derived_values_are_properties():
    cfg = from_preset("seed").model
    assert (cfg.num_patches, cfg.patch_dim, cfg.grid_size) == (64, 48, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.depth = 3


def test_config_json_layouts_of_every_version_load_to_the_same_config():
    cfg = from_preset("seed", lr=0.01, depth=6, dataset="cifar10", out="runs/x")
    grouped = cfg.to_dict()  # 0.2: one object per group
    assert set(grouped) == {"preset", *GROUPS} and grouped["optim"]["lr"] == 0.01 and grouped["data"]["data"] is None
    flat = cfg.to_flat()
    v010 = {k: v for k, v in flat.items() if k not in dataclasses.asdict(cfg.model)} | {"model": grouped["model"]}
    for values in (grouped, flat, v010):
        assert Config.from_dict(json.loads(json.dumps(values))) == cfg
    assert Config.from_dict({**flat, "data": "/some/archive.tar.gz"}).data.data == "/some/archive.tar.gz"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optim": {"lr": 0.1, "dataset": "cifar10"}}, "unknown config keys in 'optim': dataset"),
        ({"optim": {"lr": 0.1}, "lr": 0.2}, r"given twice .* lr"),
        ({"run": 3}, "unknown config keys: run"),
        ({"model": [1]}, "'model' must hold an object"),
    ],
)
def test_grouped_config_files_are_checked_group_by_group(values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(values)


def test_each_group_checks_its_own_values_and_config_the_rules_across_groups():
    cfg = from_preset("seed")
    with pytest.raises(ConfigError, match="--val-split must be in"):
        dataclasses.replace(cfg.data, val_split=1.5)
    with pytest.raises(ConfigError, match="--plateau-patience 0"):
        dataclasses.replace(cfg.optim, schedule="cosine")
    with pytest.raises(ConfigError, match="smaller than the image"):
        cfg.replace(crop="pad", crop_padding=32)  # augment against model: only Config sees both
    assert cfg.replace(crop="pad", crop_padding=8).augment.crop_padding == 8
    with pytest.raises(ConfigError, match="'optim' must hold the optim fields"):
        dataclasses.replace(cfg, optim=cfg.run)


def test_train_command_reruns_the_config(tmp_path):
    cfg = from_preset("seed", dataset="cifar10", lr=0.01, flip=False, num_classes=10, out=str(tmp_path / "run"))
    command = train_command(cfg)
    assert command == "gmlp train --preset seed --dataset cifar10 --no-flip --lr 0.01"
    again = parse(command.split()[2:])
    assert again.replace(num_classes=10, out=cfg.run.out) == cfg
