"""Tests for gmlp_vision.export and `gmlp export`: ONNX parity through onnxruntime, int8, safetensors round trip."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from gmlp_vision.artifacts import load_safetensors, read_safetensors_config
from gmlp_vision.checkpoint import load_model
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.errors import CheckpointError, ExportError
from gmlp_vision.evaluate import infer
from gmlp_vision.export import check_onnx, export_onnx, export_safetensors, onnx_logits, onnx_session, quantize_onnx
from gmlp_vision.train import train
from synthetic import make_dataset

ONNX_REASON = "the onnx extra is not installed (pip install 'gmlp-vision[onnx]'); CI installs it"


def needs_onnx() -> None:
    pytest.importorskip("onnx", reason=ONNX_REASON)
    pytest.importorskip("onnxruntime", reason=ONNX_REASON)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return make_dataset()


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    return train(from_preset("tiny", epochs=1, progress=False, out=str(out)), data).run_dir


def test_onnx_matches_pytorch(run, tmp_path, data):
    needs_onnx()
    import onnx

    path = export_onnx(run, tmp_path / "m.onnx")
    model, ckpt = load_model(run / "last.pt")
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == list(ckpt.classes) and meta["image_size"] == "32"
    assert check_onnx(path, model, data.test.images) < 1e-4
    big = torch.randint(0, 256, (3, 3, 50, 70), dtype=torch.uint8)  # resized with images.resize first
    assert check_onnx(path, model, big) < 1e-4
    session = onnx_session(path)
    for batch in (1, 7):  # dynamic batch axis
        x = data.test.images[:batch].float()
        with torch.no_grad():
            assert torch.allclose(onnx_logits(session, x), infer(model, x), atol=1e-4)


def test_fixed_batch_and_failing_check(run, tmp_path, data):
    needs_onnx()
    path = export_onnx(run, tmp_path / "fixed.onnx", dynamic_batch=False)
    assert list(onnx_session(path).get_inputs()[0].shape) == [1, 3, 32, 32]
    model, _ = load_model(run / "last.pt")
    with torch.no_grad():
        model.head.bias += 1.0  # another model: the check must fail loudly
    with pytest.raises(ExportError, match="differ from PyTorch"):
        check_onnx(export_onnx(run, tmp_path / "dyn.onnx"), model, data.test.images[:4])


def test_int8_quantisation_keeps_predictions(run, tmp_path, data):
    needs_onnx()
    import onnx
    from onnx.numpy_helper import to_array

    fp32 = export_onnx(run, tmp_path / "m.onnx")
    int8 = quantize_onnx(fp32, tmp_path / "m.int8.onnx")
    assert int8.stat().st_size < 0.8 * fp32.stat().st_size
    # 7-bit weights (reduce_range): a u8 x s8 pair sum then fits int16 (2 * 255 * 64 < 32768), so CPUs without VNNI
    # (AVX2's vpmaddubsw saturates there) compute what VNNI CPUs do; this machine's agreement alone cannot show it.
    weights = [to_array(t) for t in onnx.load(str(int8)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(abs(w.astype(int)).max()) for w in weights) <= 64
    x = data.test.images.float()
    ref = onnx_logits(onnx_session(fp32), x).argmax(dim=1)
    agree = (onnx_logits(onnx_session(int8), x).argmax(dim=1) == ref).float().mean().item()
    assert agree >= 0.9


def test_cli_export_onnx(run, capsys):
    needs_onnx()
    assert main(["export", str(run), "--check", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / 'export' / 'model.onnx'}" in out and "model.int8.onnx" in out
    assert "max abs logit difference" in out and "limit 1e-4" in out
    assert (run / "export" / "model.int8.onnx").is_file()


def test_safetensors_round_trip_is_exact(run, tmp_path, data):
    weights = export_safetensors(run / "best.pt", tmp_path / "st")
    assert weights == tmp_path / "st" / "model.safetensors"
    model, ckpt = load_model(run / "best.pt")
    cfg, classes = read_safetensors_config(tmp_path / "st")
    assert cfg == model.cfg and classes == ckpt.classes
    loaded = load_safetensors(tmp_path / "st")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(data.test.images), model(data.test.images))


def test_exported_files_get_the_usual_permissions(run, tmp_path):
    old = os.umask(0o022)
    try:
        weights = export_safetensors(run / "best.pt", tmp_path / "st")
    finally:
        os.umask(old)
    for path in (weights, tmp_path / "st" / "config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # safetensors alone writes 0600
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["config.json", "model.safetensors"]  # no temp


def test_safetensors_errors(run, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_safetensors(tmp_path)
    export_safetensors(run, tmp_path / "st")
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    config["model_args"]["embed_dim"] = 48
    (tmp_path / "st" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit the model its config describes"):
        load_safetensors(tmp_path / "st")
    (tmp_path / "st" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_safetensors(tmp_path / "st")


def test_cli_export_safetensors(run, tmp_path, capsys):
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "st"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "max abs logit difference 0" in out


def test_missing_onnx_extra_names_the_extra(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(ExportError, match=r"pip install 'gmlp-vision\[onnx\]'"):
        export_onnx(run, tmp_path / "m.onnx")
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "gmlp-vision[onnx]" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--format", "safetensors", "--quantize", "int8"], 2, "--quantize int8 applies to --format onnx only"),
        (["--format", "tflite"], 2, "invalid choice"),
        (["--ckpt", "NOT_A_CHECKPOINT"], 1, "not a gmlp-vision checkpoint"),
    ],
)
def test_cli_export_errors(run, tmp_path, capsys, argv, code, message):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    argv = ["export", str(bad)] if argv[0] == "--ckpt" else ["export", str(run), *argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
