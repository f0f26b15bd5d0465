"""``--precision fp16``: the gradient scaler (overflow, clipping, resume) and fp16 evaluate, predict and export."""

import json
import os
import signal

import pytest
import torch

from gmlp_vision.checkpoint import load_checkpoint
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.data import load_dataset
from gmlp_vision.errors import ConfigError, TrainingInterrupted
from gmlp_vision.evaluate import evaluate, infer
from gmlp_vision.model import GMLP, layer_norm
from gmlp_vision.optim import build_optimizer
from gmlp_vision.precision import PRECISIONS, Precision
from gmlp_vision.predict import Classifier
from gmlp_vision.rundir import resume_config
from gmlp_vision.step import EagerStep, train_step
from gmlp_vision.train import train
from synthetic import make_dataset, make_split

eager_step = EagerStep.step  # the real step, for the wrappers below that count or poison steps

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def step_setup(**overrides):
    """A tiny fp16 model, its optimiser and scaler, a seeded stream and one batch of 32 images."""
    cfg = from_preset("tiny", num_classes=4, precision="fp16", **overrides)
    torch.manual_seed(0)
    model = GMLP(cfg.model)
    batch = make_split(32, 4, 32, seed=0)
    return cfg, model, build_optimizer(cfg.optim, model), PRECISIONS["fp16"].scaler(CPU), (batch.images, batch.labels)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def adam_steps(optimizer):
    return [float(s["step"]) for s in optimizer.state.values()]


def test_only_fp16_gets_a_scaler_and_an_old_torch_is_told_which_flag_needs_a_newer_one(monkeypatch):
    assert PRECISIONS["fp32"].scaler(CPU) is None and PRECISIONS["bf16"].scaler(CPU) is None
    scaler = PRECISIONS["fp16"].scaler(CPU)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    monkeypatch.delattr(torch.amp, "GradScaler")
    with pytest.raises(ConfigError, match="--precision fp16 needs torch 2.3"):
        PRECISIONS["fp16"].scaler(CPU)


def test_an_overflowing_gradient_skips_the_step_halves_the_scale_and_training_goes_on():
    cfg, model, optimizer, scaler, (images, labels) = step_setup()
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(model, optimizer, images, labels, cfg, generator, scaler=scaler)
    scale, before, steps = scaler.get_scale(), weights(model), adam_steps(optimizer)
    # The simulated overflow: one parameter's gradient is inf in this step only.
    handle = model.head.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    losses, logits = train_step(model, optimizer, images, labels, cfg, generator, scaler=scaler)
    handle.remove()
    assert torch.isfinite(losses).all() and torch.isfinite(logits).all()  # the loss was fine: no error to raise
    assert scaler.get_scale() == scale / 2
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped: weights and optimiser state unchanged
    assert adam_steps(optimizer) == steps
    for _ in range(3):
        losses, _ = train_step(model, optimizer, images, labels, cfg, generator, scaler=scaler)
    assert adam_steps(optimizer) == [s + 3 for s in steps]
    assert not torch.equal(after["head.weight"], model.head.weight)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values()) and torch.isfinite(losses).all()
    assert scaler.get_scale() <= scale / 2


def test_gradients_are_unscaled_before_they_are_clipped():
    cfg, model, optimizer, scaler, (images, labels) = step_setup(clip_grad=1e-3)
    train_step(model, optimizer, images, labels, cfg, torch.Generator().manual_seed(0), scaler=scaler)
    assert scaler.get_scale() == 2.0**16  # no overflow: the step was taken with the clipped gradients
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    # Clipped after unscaling: the true norm is cut to 1e-3 (clipping the scaled ones would leave 1e-3 / 2^16).
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)


def cfg_for(tmp_path, name):
    return from_preset("tiny", epochs=2, progress=False, out=str(tmp_path / name), val_split=0.2, threads=1,
                       precision="fp16", ema=0.9)  # fmt: skip


def same_weights(a, b):
    sa, sb = load_checkpoint(a).model_state, load_checkpoint(b).model_state
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def start_high(precision, device):
    """A scaler starting at 2^24, so that the first steps overflow and the scale at the cut is not the initial one."""
    return torch.amp.GradScaler(device.type, init_scale=2.0**24) if precision.needs_scaler else None


def interrupt_at(monkeypatch, calls):
    """SIGTERM during optimiser step number ``calls`` (1-based)."""
    count = {"n": 0}

    def step(stepper, batch):
        count["n"] += 1
        if count["n"] == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return eager_step(stepper, batch)

    monkeypatch.setattr(EagerStep, "step", step)


def test_an_interrupted_fp16_run_resumes_its_scaler_and_equals_a_straight_run(monkeypatch, tmp_path):
    monkeypatch.setattr(Precision, "scaler", start_high)
    ds = make_dataset()
    straight = train(cfg_for(tmp_path, "straight"), ds)
    end = load_checkpoint(straight.run_dir / "last.pt")
    # Skipped steps count as steps (8 per epoch); the scale came down from 2^24 by halving and stayed finite.
    assert end.step == 16 and all(torch.isfinite(v).all() for v in end.model_state.values())
    assert end.train_state["scaler"]["scale"] < 2.0**24
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        with pytest.raises(TrainingInterrupted):
            train(cfg_for(tmp_path, "cut"), ds)
    cut = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert cut.step == 5 and cut.train_state["scaler"]["scale"] < 2.0**24  # a fresh scaler would overflow again
    resumed = train(resume_config(tmp_path / "cut", {}), ds, resume=True)
    for name in ("last.pt", "best.pt", "ema.pt"):
        assert same_weights(straight.run_dir / name, resumed.run_dir / name), name
    assert load_checkpoint(resumed.run_dir / "last.pt").train_state["scaler"] == end.train_state["scaler"]
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history) and resumed.test == straight.test


def test_an_fp32_run_saves_no_scaler(tmp_path):
    run = train(from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "r"), threads=1), make_dataset(64, 8))
    assert load_checkpoint(run.run_dir / "last.pt").train_state["scaler"] is None


DIGITS_MODEL = ["--image-size", "8", "--patch-size", "4", "--embed-dim", "16", "--ffn-dim", "32", "--depth", "2"]


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    """A finished ``--precision fp16`` run of the tiny preset on 100 embedded digits."""
    out = tmp_path_factory.mktemp("fp16") / "run"
    argv = ["train", "--preset", "tiny", "--dataset", "digits", *DIGITS_MODEL, "--train-limit", "100", "--epochs",
            "2", "--threads", "1", "--no-progress", "--precision", "fp16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_fp16_checkpoint_evaluates_in_fp16(fp16_run, capsys):
    ckpt = load_checkpoint(fp16_run / "last.pt")
    assert ckpt.config.run.precision == "fp16"
    assert main(["evaluate", str(fp16_run / "last.pt"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    test = load_dataset("digits").test
    model = ckpt.build_model("cpu")
    fp16 = evaluate(model, test.images, test.labels, precision="fp16")
    fp32 = evaluate(model, test.images, test.labels, precision="fp32")
    assert printed["loss"] == fp16["loss"] != fp32["loss"] and printed["acc"] == fp16["acc"]
    assert fp16["loss"] == pytest.approx(fp32["loss"], rel=1e-2)


def test_fp16_checkpoint_predicts_in_fp16(fp16_run):
    clf = Classifier.from_checkpoint(fp16_run)
    seen = []
    clf.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    images = load_dataset("digits").test.images[:6]
    logits = clf.logits(images)
    assert clf.precision == "fp16" and seen == [torch.float16]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert torch.equal(logits, infer(clf.model, images, "fp16"))
    assert [p.top_k[0].index for p in clf.predict(images, top_k=1)] == logits.argmax(1).tolist()


def test_fp16_checkpoint_exports_an_fp32_onnx_graph_that_passes_the_check(fp16_run, tmp_path):
    pytest.importorskip("onnx", reason="the onnx extra is not installed; CI installs it")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed; CI installs it")
    import onnx

    out = tmp_path / "m.onnx"
    assert main(["export", str(fp16_run), "--check", "--out", str(out)]) == 0
    graph = onnx.load(str(out)).graph
    assert {i.type.tensor_type.elem_type for i in (*graph.input, *graph.output)} == {onnx.TensorProto.FLOAT}


def test_fp16_logits_are_close_to_fp32_logits_of_the_same_weights():
    torch.manual_seed(0)
    model = GMLP(from_preset("tiny", num_classes=10, attn_dim=16, final_norm=True).model).eval()
    model.set_normalization(torch.tensor([125.0, 120.0, 110.0]), torch.tensor([3600.0, 3500.0, 4000.0]))
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ref, fp16, bf16 = (infer(model, x, p) for p in ("fp32", "fp16", "bf16"))
    err = (fp16 - ref).abs().max()
    # fp16 keeps 11 significant bits: measured ~6e-4 of the largest logit; 5e-3 leaves 8x room. bf16 (8 bits) is
    # ~8x worse, so this also tells fp16 from a bf16 or fp32 computation.
    assert 0 < err <= 5e-3 * ref.abs().max()
    assert err < (bf16 - ref).abs().max() / 2
    assert torch.equal(fp16.argmax(1), ref.argmax(1))


def test_fp16_layer_norm_statistics_do_not_overflow():
    # Activations of ~1000 have squares past fp16's 65504: statistics accumulated in fp16 would be inf.
    norm = torch.nn.LayerNorm(64)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 300 + 1000
    out = layer_norm(x.half(), norm)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), norm(x.half().float()), atol=5e-3, rtol=0)
