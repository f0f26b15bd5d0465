import argparse
import dataclasses
import json

import pytest

from gmlp_vision.config import (
    DATASET_PRESET,
    PRESETS,
    Config,
    ModelConfig,
    add_config_arguments,
    config_from_args,
    from_preset,
    to_flags,
)
from gmlp_vision.errors import ConfigError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_field_names_are_unique_across_config_and_model():
    run = {f.name for f in dataclasses.fields(Config)}
    model = {f.name for f in dataclasses.fields(ModelConfig)}
    assert not run & model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips_through_flags(name):
    cfg = from_preset(name)
    assert cfg.preset == name
    assert parse(to_flags(cfg)) == cfg
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_every_preset_key_is_a_field():
    names = {f.name for f in dataclasses.fields(Config)} | {f.name for f in dataclasses.fields(ModelConfig)}
    for overrides in PRESETS.values():
        assert set(overrides) <= names


def test_no_flags_is_the_tutorial():
    cfg = parse([])
    assert (cfg.dataset, cfg.preset) == ("cifar100", "seed")
    assert cfg == from_preset("seed")


def test_dataset_alone_picks_its_preset_and_explicit_preset_wins():
    assert parse(["--dataset", "digits"]).preset == DATASET_PRESET["digits"] == "digits"
    assert parse(["--dataset", "cifar10"]).preset == "seed"
    assert parse(["--dataset", "digits", "--preset", "tiny"]).preset == "tiny"


def test_precedence_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "seed", "lr": 0.01, "model": {"depth": 6}, "epochs": 7}))
    cfg = parse(["--config", str(path), "--epochs", "3"])
    assert (cfg.preset, cfg.lr, cfg.model.depth, cfg.epochs) == ("seed", 0.01, 6, 3)
    assert cfg.model.embed_dim == 128  # from the preset
    assert parse(["--config", str(path), "--preset", "tiny"]).model.embed_dim == 32


def test_booleans_have_negative_flags():
    assert parse(["--no-flip"]).flip is False
    assert parse(["--preset", "digits", "--flip"]).flip is True


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
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse(["--config", str(bad)])
    bad.write_text(json.dumps({"no_such_field": 1}))
    with pytest.raises(ConfigError, match="unknown config keys: no_such_field"):
        parse(["--config", str(bad)])
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse(["--config", str(tmp_path / "missing.json")])
    bad.write_text(json.dumps({"model": 5}))
    with pytest.raises(ConfigError, match="'model' must hold an object"):
        parse(["--config", str(bad)])


def test_derived_values_are_properties():
    cfg = from_preset("seed").model
    assert (cfg.num_patches, cfg.patch_dim, cfg.grid_size) == (64, 48, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.depth = 3
