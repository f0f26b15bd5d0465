"""What a new user meets first: truthful help, no guessing at typos, a fast parser, and their own config back."""

import json
import subprocess
import sys

import pytest

from gmlp_vision.cli import main
from gmlp_vision.cli.flags import SECTION_TITLES, section, shown_defaults
from gmlp_vision.config import GROUP_OF, from_preset, resolve_config
from gmlp_vision.errors import ConfigError
from gmlp_vision.rundir import default_run_dir


def help_text(capsys, *argv):
    assert main([*argv, "-h"]) == 0
    return capsys.readouterr().out


def flag_help(text: str, flag: str) -> str:
    """The help paragraph of ``flag`` in argparse's output, on one line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" " * 24) or not lines[i].strip())
    return " ".join(line.strip() for line in lines[start:end])


@pytest.mark.parametrize("command", ["train", "info"])
def test_help_shows_the_defaults_a_plain_run_uses(capsys, command):
    text = help_text(capsys, command)
    seed, digits = from_preset("seed"), resolve_config({"dataset": "digits"})
    folder = resolve_config({"dataset": "folder"})
    assert f"(default: {seed.model.image_size}; digits: {digits.model.image_size})" in flag_help(text, "--image-size N")
    epochs = f"(default: {seed.optim.epochs}; digits: {digits.optim.epochs}; folder, csv: {folder.optim.epochs})"
    assert epochs in flag_help(text, "--epochs N")
    assert "(default: 4; folder, csv: 6)" in flag_help(text, "--depth N")  # the tutorial's 4 blocks, not the paper's 30
    assert "(default: the dataset's)" in flag_help(text, "--num-classes N")
    assert "224" not in flag_help(text, "--image-size N") and "(default: 30" not in flag_help(text, "--depth N")


def test_every_shown_default_is_what_train_resolves():
    plain = resolve_config({}).to_flat()
    for name, text in shown_defaults().items():
        if name not in ("num_classes", "in_chans") and plain[name] is not None:
            assert text.split(";")[0] == str(plain[name]), name


def test_flags_sit_in_topic_sections_with_honest_metavars(capsys):
    text = help_text(capsys, "train")
    titles = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles == ["options", *SECTION_TITLES.values()]
    assert {section(name) for name in GROUP_OF} == set(SECTION_TITLES)
    for flag in ("--drop-path P", "--ema DECAY", "--lr LR", "--out DIR", "--mixup ALPHA", "--seed N"):
        assert flag in text
    assert "--drop-path PATH" not in text and "--ema EMA" not in text
    assert text.index("schedule and stopping:") < text.index("--plateau-patience") < text.index("run:")
    assert text.count("\n") < 260  # the usage line names the few positional flags, not all 72


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["train", "--epoc", "3"], "usage: gmlp train"),
        (["train", "--bogus"], "usage: gmlp train"),
        (["predict", "x.pt", "y.png", "--bogus"], "usage: gmlp predict"),
        (["evaluate", "x.pt", "--batch", "3"], "usage: gmlp evaluate"),
    ],
)
def test_typos_are_errors_with_the_commands_own_usage(capsys, argv, usage):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert usage in err and "unrecognized arguments" in err


def test_building_the_parser_imports_no_torch():
    code = (
        "import sys\n"
        "from gmlp_vision.cli import main\n"
        "for argv in (['--help'], ['train', '-h'], ['info', '-h'], ['predict', '-h'], ['export', '-h']):\n"
        "    assert main(argv) == 0\n"
        "heavy = [m for m in ('torch', 'numpy', 'PIL', 'matplotlib', 'tqdm') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("heavy: []")


def test_a_runs_config_json_trains_again_in_a_new_directory(tmp_path, capsys, monkeypatch):
    first = tmp_path / "first"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--no-progress", "--threads", "1"]
    assert main([*argv, "--out", str(first)]) == 0
    saved = json.loads((first / "config.json").read_text())
    assert saved["run"]["out"] == str(first)
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    assert json.loads((again / "config.json").read_text()) == {**saved, "run": {**saved["run"], "out": str(again)}}
    cfg = resolve_config({}, first / "config.json")
    assert cfg.run.out is None  # the file's out never reuses its run directory
    monkeypatch.chdir(tmp_path)
    made = [default_run_dir(cfg) for _ in range(3)]  # a fresh folder each time, also within one second
    assert all(str(p).startswith("runs/digits-digits-") and p.is_dir() for p in made) and len(set(made)) == 3


def test_a_schedule_turns_the_presets_plateau_off_unless_asked_for():
    assert from_preset("seed").optim.plateau_patience == 5
    assert resolve_config({"schedule": "cosine"}).optim.plateau_patience == 0
    assert resolve_config({"dataset": "digits", "schedule": "onecycle"}).optim.plateau_patience == 0
    with pytest.raises(ConfigError, match="--plateau-patience 0"):
        resolve_config({"schedule": "cosine", "plateau_patience": 3})


def test_the_readme_tables_list_every_command_and_preset_and_nothing_else():
    import re
    from pathlib import Path

    from gmlp_vision.cli.main import build_parser
    from gmlp_vision.presets import PRESETS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = set(re.findall(r"^\| `gmlp (\w+)", readme, flags=re.M))
    presets = set(re.findall(r"^\| `([\w-]+)` \|", readme, flags=re.M))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert commands == set(sub.choices)
    assert presets == set(PRESETS)
