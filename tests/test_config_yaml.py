"""YAML configs: `gmlp train --print-config` prints the whole resolved config as YAML and trains nothing; --config
reads it back (and flat YAML, as people write it) to the same run; hostile YAML is one line."""

import pytest
import yaml

from gmlp_vision.cli import main
from gmlp_vision.config import config_yaml, load_config_file, resolve_config
from gmlp_vision.errors import ConfigError

FLAGS = ["--dataset", "digits", "--epochs", "3", "--lr", "0.0005", "--schedule", "cosine", "--no-flip", "--ema", "0.99"]


def test_print_config_prints_yaml_only_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *FLAGS, "--print-config"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and list(tmp_path.iterdir()) == []  # no run directory, nothing else
    text = captured.out
    assert text.startswith("# gmlp train --config FILE reads this back")
    values = yaml.safe_load(text)
    assert values["preset"] == "digits" and values["optim"]["epochs"] == 3 and values["optim"]["lr"] == 0.0005
    assert values["augment"]["flip"] is False and values["run"]["out"] is None
    assert set(values) == {"preset", "model", "data", "augment", "optim", "run"}


def test_the_printed_yaml_reads_back_to_the_same_config(tmp_path, capsys):
    assert main(["train", *FLAGS, "--out", str(tmp_path / "run"), "--print-config"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "run.yaml"
    path.write_text(text)
    from_flags = resolve_config(
        {"dataset": "digits", "epochs": 3, "lr": 0.0005, "schedule": "cosine", "flip": False, "ema": 0.99}
    )
    assert resolve_config({}, config_file=path) == from_flags
    assert main(["train", "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == text == config_yaml(from_flags)
    assert main(["train", "--config", str(path), "--epochs", "5", "--print-config"]) == 0  # flags still win
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["epochs"] == 5


def test_flat_yaml_as_people_write_it(tmp_path):
    path = tmp_path / "mine.yml"
    path.write_text("# my run\ndataset: digits\nepochs: 2\nlr: 1.0e-3\nflip: false\n")
    cfg = resolve_config({}, config_file=path)
    assert (cfg.data.dataset, cfg.optim.epochs, cfg.optim.lr, cfg.augment.flip) == ("digits", 2, 0.001, False)
    assert cfg.preset == "digits"  # the dataset's own preset, as with flags


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &x [1, 2]\nb: *x\n", "aliases \\(\\*name\\) are not allowed"),
        ("epochs: [\n", "is not YAML we read: .* \\(line 2\\)"),
        ("- 1\n- 2\n", "must hold a mapping of names to values"),
        ("epochs: 2\nwho: me\n", "unknown config keys: who"),
        ("epochs: two\n", "--epochs must be an integer"),
        ("!!python/object/apply:os.system ['true']\n", "is not YAML we read"),
        ("[" * 5000, "is not YAML we read"),
    ],
)  # fmt: skip
def test_hostile_or_wrong_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        resolve_config({}, config_file=path)
    assert "\n" not in str(caught.value)


def test_a_json_file_is_still_json_and_says_yaml_is_read_too(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("epochs: 2\n")
    with pytest.raises(ConfigError, match="is not JSON .*or YAML from a .yaml or .yml file"):
        load_config_file(path)


def test_print_config_of_a_run_to_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--threads", "1", "--no-progress", "--out",
                 str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "4", "--print-config"]) == 0
    values = yaml.safe_load(capsys.readouterr().out)
    assert values["optim"]["epochs"] == 4 and values["data"]["dataset"] == "digits"
