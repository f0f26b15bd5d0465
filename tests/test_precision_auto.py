"""--precision auto: bf16 where the device computes it natively, fp32 elsewhere; said, recorded, kept on resume."""

import json
import logging
from pathlib import Path

import pytest
import torch

import gmlp_vision.precision as precision
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset, resolve_config
from gmlp_vision.cpu import cpu_features
from gmlp_vision.presets import PRESETS
from gmlp_vision.rundir import resume_config
from gmlp_vision.train import train
from synthetic import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def with_features(monkeypatch, *names: str) -> None:
    monkeypatch.setattr(precision, "cpu_features", lambda: frozenset({"fpu", "avx2", *names}))


def test_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    with_features(monkeypatch)
    choice = precision.choose_precision("auto", CPU)
    assert choice.name == "fp32" and choice.warning is None
    assert choice.line == "precision: fp32 (auto: this CPU has no amx_bf16 or avx512_bf16)"
    with_features(monkeypatch, "avx512_bf16")
    assert precision.choose_precision("auto", CPU).line == "precision: bf16 (auto: this CPU has avx512_bf16)"
    with_features(monkeypatch, "amx_bf16", "avx512_bf16")
    assert precision.choose_precision("auto", CPU).line.endswith("(auto: this CPU has amx_bf16 and avx512_bf16)")


def test_an_explicit_bf16_without_bf16_units_warns_with_the_slowdown(monkeypatch):
    with_features(monkeypatch)
    slow = precision.choose_precision("bf16", CPU)
    assert slow.name == "bf16" and slow.line == "precision: bf16"
    assert "this CPU has no amx_bf16 or avx512_bf16, so bf16 is emulated here, about 20x slower" in slow.warning
    for name in ("fp32", "fp16"):
        assert precision.choose_precision(name, CPU).warning is None
    with_features(monkeypatch, "amx_bf16")
    assert precision.choose_precision("bf16", CPU).warning is None
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        precision.choose_precision("fp8", CPU)


def test_auto_on_a_gpu_follows_its_compute_capability(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert precision.choose_precision("auto", gpu).line == (
        "precision: fp32 (auto: this GPU has compute capability 7.5; bf16 needs 8.0)"
    )
    assert "much slower than fp32" in precision.choose_precision("bf16", gpu).warning
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert precision.choose_precision("auto", gpu).name == "bf16"


def test_every_preset_but_the_tutorial_and_the_tests_own_chooses_by_itself():
    assert from_preset("seed").run.precision == "fp32"  # the tutorial, exactly
    assert from_preset("tiny").run.precision == "fp32"  # tests: the same numbers on every machine
    others = [name for name in PRESETS if name not in ("seed", "tiny")]
    assert others and all(from_preset(name).run.precision == "auto" for name in others)
    assert resolve_config({"dataset": "folder"}).run.precision == "auto"


def test_cpu_features_are_read_from_the_system():
    features = cpu_features()
    assert isinstance(features, frozenset)
    if Path("/proc/cpuinfo").is_file() and any(
        line.startswith(("flags", "Features")) for line in Path("/proc/cpuinfo").read_text().splitlines()
    ):
        assert features and all(" " not in name for name in features)


@pytest.mark.parametrize(("features", "resolved"), [((), "fp32"), (("avx512_bf16",), "bf16")])
def test_a_run_says_and_records_what_auto_chose_and_resume_keeps_it(monkeypatch, tmp_path, caplog, features, resolved):
    with_features(monkeypatch, *features)
    cfg = from_preset("tiny", precision="auto", epochs=1, progress=False, out=str(tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        train(cfg, make_dataset())
    assert f"precision: {resolved} (auto: this CPU has" in caplog.text
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["run"]["precision"] == resolved
    with_features(monkeypatch, "amx_bf16" if resolved == "fp32" else "sse2")  # another machine: the run's own kept
    again = resume_config(tmp_path / "run", {"epochs": 2})
    assert again.run.precision == resolved
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        train(again, make_dataset(), resume=True)
    assert f"precision: {resolved}" in caplog.text and "(auto:" not in caplog.text  # the recorded one, as given
    assert ("bf16 is emulated here" in caplog.text) == (resolved == "bf16")  # and this machine has no bf16 units
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["precision"] == resolved


def test_the_command_line_takes_auto_and_warns_of_an_emulated_bf16(monkeypatch, tmp_path, capsys):
    with_features(monkeypatch)
    argv = ["train", "--preset", "tiny", "--dataset", "digits", "--epochs", "1", "--threads", "1", "--no-progress"]
    assert main([*argv, "--precision", "bf16", "--out", str(tmp_path / "slow")]) == 0
    err = capsys.readouterr().err
    assert "warning: --precision bf16: this CPU has no amx_bf16 or avx512_bf16, so bf16 is emulated here" in err
    assert main([*argv, "--precision", "auto", "--out", str(tmp_path / "auto")]) == 0
    shown = capsys.readouterr()
    assert "precision: fp32 (auto: this CPU has no amx_bf16 or avx512_bf16)" in shown.out and not shown.err
