"""`gmlp export --format triton`: a model repository whose config.pbtxt parses as Triton's ModelConfig (tritonclient
ships the message) and agrees with the ONNX graph beside it, which reproduces the checkpoint."""

import pytest

from gmlp_vision.checkpoint import load_model
from gmlp_vision.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
onnx = pytest.importorskip("onnx", reason="the onnx extra")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="the triton extra")
text_format = pytest.importorskip("google.protobuf.text_format")


def dims(value_info) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


def test_the_repository_parses_as_triton_reads_it_and_matches_its_graph(tiny_run, tmp_path, capsys):
    repo = tmp_path / "models"
    assert main(["export", str(tiny_run), "--format", "triton", "--out", str(repo), "--check"]) == 0
    out = capsys.readouterr().out
    assert "max abs logit difference" in out
    folder = repo / "run"  # the run directory's name
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1/model.onnx", "README.md", "config.pbtxt", "labels.txt"]  # fmt: skip
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("run", "onnxruntime", 64)
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 5000
    graph = onnx.load(str(folder / "1" / "model.onnx")).graph
    (given,), (produced,) = config.input, config.output
    assert (given.name, produced.name) == (graph.input[0].name, graph.output[0].name) == ("pixels", "logits")
    assert given.data_type == produced.data_type == model_config_pb2.TYPE_FP32
    assert dims(graph.input[0]) == [-1, *given.dims]  # Triton's batch axis is the graph's dynamic one
    assert dims(graph.output[0]) == [-1, *produced.dims]
    model, ckpt = load_model(tiny_run / "last.pt")
    assert list(given.dims) == [model.cfg.in_chans, model.cfg.image_size, model.cfg.image_size]
    assert list(produced.dims) == [len(ckpt.classes)] and produced.label_filename == "labels.txt"
    assert (folder / "labels.txt").read_text().splitlines() == list(ckpt.classes)
    assert "float32 in 0..255" in (folder / "README.md").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--format", "triton", "--name", "../up"], "--name ../up: a Triton model name is 1 to 128 of"),
        (["--format", "onnx", "--name", "x"], "--name applies to --format triton only"),
        (["--format", "triton", "--push-to-hub", "me/m"], "--push-to-hub takes --format safetensors or onnx"),
    ],
)
def test_impossible_triton_exports_are_one_line(tiny_run, tmp_path, capsys, flags, message):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "r"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
