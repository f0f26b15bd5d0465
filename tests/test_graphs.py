"""The captured training step (`graphs.GraphStep`) against the eager one.

On a CPU the step runs without a graph (``capture=False``): the index buffers, the device-side AdamW update, the
metric buffers and the warm-up that is undone all run as they do under a capture. With CUDA the same checks run with
real graphs, and end to end through `train` (tests marked ``cuda``, skipped without a GPU).
"""

import copy

import pytest
import torch

from gmlp_vision import graphs as graphs_mod
from gmlp_vision.batches import Batch, BatchSource
from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.config import from_preset
from gmlp_vision.errors import ConfigError
from gmlp_vision.graphs import GraphStep, unsupported
from gmlp_vision.loop import train_one_epoch
from gmlp_vision.model import GMLP
from gmlp_vision.optim import KerasAdamW, adamw_apply, adamw_scalars, build_optimizer, init_adamw_state
from gmlp_vision.rundir import resume_config
from gmlp_vision.state import TrainState
from gmlp_vision.step import EagerStep
from gmlp_vision.train import train
from synthetic import make_dataset


def cuda(test):
    """Mark a test that needs a CUDA device (skipped without one)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@pytest.mark.parametrize("kind", ["keras-adamw", "adamw"])
def test_the_device_update_is_the_optimisers_step(kind):
    torch.manual_seed(0)
    cfg = from_preset("tiny", optimizer=kind, weight_decay=0.05, decay_norms_biases=False)
    a = GMLP(cfg.model)
    b = copy.deepcopy(a)
    ref, dev = build_optimizer(cfg.optim, a), build_optimizer(cfg.optim, b)
    init_adamw_state(dev)
    for i in range(12):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        for group in ref.param_groups + dev.param_groups:
            group["lr"] = 3e-3 * 0.8**i  # a schedule: the lr changes every step
        ref.step()
        adamw_apply(dev, torch.tensor(adamw_scalars(dev)))
    worst = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    # Keras' form is computed in the same order both ways; torch's folds its sqrt(c2) into eps and the step size.
    assert worst == 0.0 if kind == "keras-adamw" else worst < 1e-6
    steps = [s["step"] for s in dev.state.values()]
    assert all(int(s) == 12 for s in steps) and isinstance(steps[0], int) == isinstance(ref, KerasAdamW)
    dev.load_state_dict(ref.state_dict())  # the same state layout: each loads the other's


def run_epochs(device, graph: str, epochs=2, **kw):
    """Train ``epochs`` epochs of the tiny preset on 100 images (batches of 32: the last one holds 4)."""
    ds = make_dataset(n_train=100, n_test=10)
    cfg = from_preset("tiny", num_classes=ds.num_classes, progress=False, clip_grad=1.0, **kw)
    torch.manual_seed(0)
    net = GMLP(cfg.model).to(device)
    source = BatchSource(ds.train.images.to(device), ds.train.labels.to(device), cfg.optim.batch_size)
    generator = torch.Generator(device).manual_seed(0)
    state = TrainState(cfg, net, build_optimizer(cfg.optim, net), generator, steps_per_epoch=source.steps_per_epoch)
    if graph == "eager":
        step = EagerStep(net, state.optimizer, cfg, generator)
    else:
        step = GraphStep(net, net, state.optimizer, cfg, generator, source, capture=graph == "captured")
    rows = [train_one_epoch(state, source, step, source.new_epoch(state.order, state.step)) for _ in range(epochs)]
    default = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()  # dropout's stream
    return state, rows, default


def assert_same_run(a, b, exact):
    (sa, rows_a, default_a), (sb, rows_b, default_b) = a, b
    pa, pb = list(sa.model.parameters()), list(sb.model.parameters())
    if exact:
        assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
        assert rows_a == rows_b
    else:
        assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(pa, pb, strict=True))
        assert all(r[k] == pytest.approx(q[k], rel=1e-4) for r, q in zip(rows_a, rows_b, strict=True) for k in r)
    assert torch.equal(sa.generator.get_state(), sb.generator.get_state())  # the same random draws, no more
    assert torch.equal(default_a, default_b)
    assert sa.optimizer.state_dict()["state"][0]["step"] == sb.optimizer.state_dict()["state"][0]["step"] == 8


def test_the_uncaptured_graph_step_is_the_eager_step_on_cpu():
    # Dropout, drop path, flip, zoom and the Keras optimiser: every random draw and the update, bit for bit.
    assert_same_run(run_epochs("cpu", "eager"), run_epochs("cpu", "uncaptured"), exact=True)


def test_torch_adamw_and_its_lr_schedule_through_the_graph_step(one_thread):
    recipe = dict(optimizer="adamw", schedule="onecycle", plateau_patience=0, warmup_epochs=0.5, crop="pad")
    assert_same_run(run_epochs("cpu", "eager", **recipe), run_epochs("cpu", "uncaptured", **recipe), exact=False)


def test_a_warm_up_leaves_no_trace():
    state, _, _ = run_epochs("cpu", "eager", epochs=1)
    ds = make_dataset(n_train=100, n_test=10)
    source = BatchSource(ds.train.images, ds.train.labels, state.cfg.optim.batch_size)
    before = (copy.deepcopy(state.model.state_dict()), copy.deepcopy(state.optimizer.state_dict()))
    streams = (state.generator.get_state(), torch.get_rng_state())
    step = GraphStep(state.model, state.model, state.optimizer, state.cfg, state.generator, source, capture=False)
    step._prepare(32)
    after = state.model.state_dict(), state.optimizer.state_dict()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    for k, s in before[1]["state"].items():
        assert s["step"] == after[1]["state"][k]["step"]
        assert torch.equal(s["exp_avg_sq"], after[1]["state"][k]["exp_avg_sq"])
    assert torch.equal(streams[0], state.generator.get_state()) and torch.equal(streams[1], torch.get_rng_state())
    assert step.sums.tolist() == [0.0, 0.0, 0.0] and not step.nonfinite


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (dict(cuda_graphs=False), "--no-cuda-graphs"),
        (dict(precision="fp16"), "--precision fp16"),
        (dict(mixup=0.2), "mixup/cutmix"),
        (dict(cutmix=1.0), "mixup/cutmix"),
        (dict(policy="trivial"), "--policy trivial"),
    ],
)
def test_what_keeps_the_step_from_being_captured(monkeypatch, change, why):
    monkeypatch.setattr(graphs_mod, "captures_generators", lambda: True)
    gpu = torch.device("cuda", 0)
    assert unsupported(from_preset("seed"), gpu, distributed=False, streamed=False) is None
    assert why in unsupported(from_preset("seed", **change), gpu, distributed=False, streamed=False)
    assert "torchrun" in unsupported(from_preset("seed"), gpu, distributed=True, streamed=False)
    assert "streamed" in unsupported(from_preset("seed"), gpu, distributed=False, streamed=True)
    assert unsupported(from_preset("seed"), torch.device("cpu"), distributed=False, streamed=False)
    monkeypatch.setattr(graphs_mod, "captures_generators", lambda: False)
    assert "cannot capture" in unsupported(from_preset("seed"), gpu, distributed=False, streamed=False)


def test_the_flag_turns_capture_off(capsys):
    from gmlp_vision.cli import main

    try:
        main(["train", "--help"])
    except SystemExit:
        pass
    assert "--cuda-graphs, --no-cuda-graphs" in capsys.readouterr().out


def test_a_capture_that_fails_says_how_to_train_without(monkeypatch):
    class FakeGraph:
        def register_generator_state(self, generator):
            pass

    def failing_capture(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore lines")

    monkeypatch.setattr(graphs_mod.torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(graphs_mod.torch.cuda, "graph", failing_capture)
    ds = make_dataset(n_train=64, n_test=10)
    cfg = from_preset("tiny", num_classes=ds.num_classes)
    net = GMLP(cfg.model)
    gen = torch.Generator().manual_seed(0)
    source = BatchSource(ds.train.images, ds.train.labels, cfg.optim.batch_size)
    step = GraphStep(net, net, build_optimizer(cfg.optim, net), cfg, gen, source)
    with pytest.raises(ConfigError, match=r"not permitted when stream is capturing\); train with --no-cuda-graphs$"):
        step.step(Batch(0, torch.arange(32), 1 / 32))


def test_a_run_resumes_without_graphs(tmp_path):
    # What a failed capture tells the user to do must work on a run that already started.
    ds = make_dataset(n_train=64, n_test=10)
    train(from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run")), ds)
    resumed = train(resume_config(tmp_path / "run", {"epochs": 2, "cuda_graphs": False}), ds, resume=True)
    assert len(resumed.history) == 2 and resumed.history[-1]["epoch"] == 2


# With a GPU: real graphs.


@cuda
def test_replayed_graphs_equal_the_eager_step_on_cuda():
    assert_same_run(run_epochs("cuda", "eager"), run_epochs("cuda", "captured"), exact=False)


@cuda
def test_captured_runs_resume_exactly_and_match_eager_runs(tmp_path):
    ds = make_dataset(n_train=200, n_test=40)

    def cfg(name, **kw):
        values = dict(epochs=2, progress=False, out=str(tmp_path / name), val_split=0.2, device="cuda")
        return from_preset("tiny", **{**values, **kw})

    straight = train(cfg("straight"), ds)
    eager = train(cfg("eager", cuda_graphs=False), ds)
    train(cfg("cut", epochs=1), ds)
    resumed = train(resume_config(tmp_path / "cut", {"epochs": 2}), ds, resume=True)
    a, b = load_checkpoint(straight.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert straight.history[-1]["loss"] == resumed.history[-1]["loss"]
    assert straight.history[-1]["loss"] == pytest.approx(eager.history[-1]["loss"], rel=1e-3)


@cuda
def test_a_compiled_model_is_captured_too(tmp_path, caplog):
    ds = make_dataset(n_train=200, n_test=40)
    runs = {}
    for graphs in (True, False):
        out = str(tmp_path / f"graphs-{graphs}")
        cfg = from_preset("tiny", epochs=2, progress=False, out=out, device="cuda", compile=True, cuda_graphs=graphs)
        with caplog.at_level("INFO", logger="gmlp_vision"):
            runs[graphs] = train(cfg, ds).history
    assert "CUDA graphs: each training step is captured" in caplog.text and "--no-cuda-graphs" in caplog.text
    assert runs[True][-1]["loss"] == pytest.approx(runs[False][-1]["loss"], rel=1e-3)
