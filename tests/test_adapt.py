"""Adapting pretrained weights (channels, patch size, head) and shipping the better of a run's final weights."""

import json
import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gmlp_vision.checkpoint import load_checkpoint, load_model, resolve_checkpoint
from gmlp_vision.cli import main
from gmlp_vision.config import ModelConfig, from_preset
from gmlp_vision.errors import CheckpointError, ConfigError
from gmlp_vision.evaluate import evaluate
from gmlp_vision.export import default_export_dir
from gmlp_vision.model import GMLP
from gmlp_vision.pretrained import load_pretrained, read_pretrained
from gmlp_vision.rundir import resume_config
from gmlp_vision.train import train
from gmlp_vision.transfer import adapt_channels, resize_patch_kernel
from synthetic import make_dataset
from test_transfer import SMALL, timm_state

pytestmark = pytest.mark.usefixtures("one_thread")


def embed(kernel, patch):
    """A patch embedding without bias: the kernel (D, p*p*C) against one (C, p, p) patch, as the model flattens it."""
    return kernel @ patch.permute(1, 2, 0).reshape(-1)


@pytest.mark.parametrize("new", [1, 2, 4, 6])
def test_channels_adapt_as_timm_does(new):
    kernel = torch.randn(6, 4 * 4 * 3, dtype=torch.float64)
    adapted = adapt_channels(kernel, 3, new)
    assert adapted.shape == (6, 4 * 4 * new)
    per_channel = kernel.reshape(6, 16, 3)
    if new == 1:  # summed over RGB
        assert torch.equal(adapted, per_channel.sum(2))
    else:  # repeated, cut and scaled by 3 / new: R G B R ... for RGB weights
        assert torch.allclose(adapted.reshape(6, 16, new), per_channel[:, :, [c % 3 for c in range(new)]] * 3 / new)
    if new % 3 == 0 or new == 1:  # an image of equal channels embeds exactly as before
        gray = torch.rand(1, 4, 4, dtype=torch.float64)
        assert torch.allclose(embed(adapted, gray.expand(new, 4, 4)), embed(kernel, gray.expand(3, 4, 4)))


def test_a_patch_kernel_resized_up_embeds_each_resized_patch_as_before():
    old, new, chans = 4, 8, 3
    kernel = torch.randn(5, old * old * chans, dtype=torch.float64)
    resized = resize_patch_kernel(kernel, old, new, chans)
    patches = torch.rand(16, chans, old, old, dtype=torch.float64)
    bigger = F.interpolate(patches, size=(new, new), mode="bilinear", align_corners=False)
    for x, y in zip(patches, bigger, strict=True):
        assert torch.allclose(embed(resized, y), embed(kernel, x), atol=1e-9)
    assert torch.allclose(resize_patch_kernel(kernel, old, old, chans), kernel)  # the same size: the same kernel


def save_timm(tmp_path, **changes):
    cfg = ModelConfig(**{**SMALL, **changes})
    save_file(timm_state(cfg), tmp_path / "timm.safetensors")
    return tmp_path / "timm.safetensors"


def test_one_channel_and_another_patch_size_load_and_the_log_says_what_was_adapted(tmp_path, caplog):
    path = save_timm(tmp_path)
    model = GMLP(ModelConfig(**{**SMALL, "in_chans": 1, "patch_size": 4}))
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        assert load_pretrained(model, path) == []
    line = caplog.records[-1].getMessage()
    assert "3 input channels -> 1 (summed over the weights' channels)" in line
    assert "patch 8 -> 4 (PI-resize, least squares)" in line
    assert model.patch_embed.proj.weight.shape == (SMALL["embed_dim"], 4 * 4 * 1)
    assert model.blocks[0].sgu.proj.weight.shape == (64, 64)  # 32 px / patch 4: an 8 x 8 grid
    x = torch.rand(2, 1, 32, 32) * 255
    assert torch.isfinite(model(x)).all()


def test_a_patch_kernel_that_fits_no_patch_is_refused_in_one_line(tmp_path):
    state = timm_state(ModelConfig(**SMALL))
    state["stem.proj.weight"] = torch.randn(SMALL["embed_dim"], 3, 8, 7)  # not square
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"patch kernel \(168 inputs\) fits no square patch of 3 channels$"):
        read_pretrained(tmp_path / "odd.safetensors", ModelConfig(**SMALL))


def gmlp_file(tmp_path, name, **changes):
    """A gmlp-layout state dict with per-channel statistics, saved as ``name``; ``changes`` replace tensors."""
    model = GMLP(ModelConfig(**SMALL))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pixel_mean"], state["pixel_std"] = torch.tensor([120.0, 110.0, 100.0]), torch.tensor([60.0, 55.0, 50.0])
    state.update(changes)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pixel_mean": torch.tensor(3.0)}, "pixel_mean and pixel_std are not finite values, one per channel"),
        ({"pixel_std": torch.tensor([60.0, 0.0, 50.0])}, "pixel_mean and pixel_std are not finite values"),
        ({"pixel_mean": torch.tensor([1, 2, 3])}, "pixel_mean and pixel_std are not finite values"),
        ({"pixel_mean": torch.tensor([float("nan"), 1.0, 2.0])}, "pixel_mean and pixel_std are not finite values"),
        ({"patch_embed.proj.weight": torch.zeros(0, 192)}, "its patch kernel is no float matrix"),
        ({"patch_embed.proj.weight": torch.ones(16, 192, dtype=torch.int64)}, "its patch kernel is no float matrix"),
        ({"head.weight": torch.tensor(1.0)}, r"its head.weight is no matrix \(shape \(\)\)"),
        ({"blocks.0.sgu.proj.weight": torch.tensor(1.0)}, "a spatial projection must be a float"),
    ],
)
def test_hostile_init_files_are_one_line_each(tmp_path, changes, message):
    path = gmlp_file(tmp_path, "hostile.safetensors", **changes)
    with pytest.raises(CheckpointError, match=message) as info:
        read_pretrained(path, ModelConfig(**{**SMALL, "in_chans": 1}))
    assert "\n" not in str(info.value)


def test_one_channel_folds_the_per_channel_normalisation_in_exactly(tmp_path):
    rgb = GMLP(ModelConfig(**SMALL)).eval()
    path = gmlp_file(tmp_path, "rgb.safetensors")
    load_pretrained(rgb, path)
    gray = GMLP(ModelConfig(**{**SMALL, "in_chans": 1})).eval()
    load_pretrained(gray, path)
    pixels = torch.rand(3, 1, 32, 32) * 255
    with torch.no_grad():
        a, b = rgb.forward_tokens(pixels.expand(3, 3, 32, 32)), gray.forward_tokens(pixels)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert gray.pixel_mean.tolist() == [110.0] and gray.pixel_std.tolist() == [55.0]


def test_a_one_channel_timm_kernel_loads_unchanged_into_one_channel(tmp_path):
    state = timm_state(ModelConfig(**SMALL))
    state["stem.proj.weight"] = state["stem.proj.weight"][:, :1].contiguous()  # a grayscale timm model
    save_file(state, tmp_path / "gray.safetensors")
    fitted = read_pretrained(tmp_path / "gray.safetensors", ModelConfig(**{**SMALL, "in_chans": 1}))
    assert fitted.adapted == [] and fitted.state["patch_embed.proj.weight"].shape == (SMALL["embed_dim"], 64)


def test_a_resumed_run_does_not_read_its_init_file_again(tmp_path):
    path = save_timm(tmp_path)
    cfg = from_preset("tiny", **{**SMALL, "num_classes": 4}, init=str(path), epochs=1, progress=False,
                      out=str(tmp_path / "run"))  # fmt: skip
    train(cfg, make_dataset())
    path.unlink()  # its weights are last.pt's now
    resumed = train(resume_config(tmp_path / "run", {"epochs": 2}), make_dataset(), resume=True)
    assert len(resumed.history) == 2


def test_reset_head_without_init_is_refused():
    with pytest.raises(ConfigError, match="--reset-head applies with --init only"):
        from_preset("tiny", reset_head=True)


def test_the_head_is_new_when_the_classes_differ_or_when_asked(tmp_path, caplog):
    cfg = from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run"), num_classes=4)
    result = train(cfg, make_dataset())
    last = result.run_dir / "last.pt"
    classes = tuple(f"class{k}" for k in range(4))  # make_dataset's names
    assert read_pretrained(last, cfg.model, classes=classes).fresh == []
    renamed = read_pretrained(last, cfg.model, classes=("cat", "dog", "car", "ship"))
    assert renamed.fresh == ["head.weight", "head.bias"]
    assert renamed.adapted == ["new classifier head (the class names differ from the weights')"]
    asked = read_pretrained(last, cfg.model, classes=classes, reset_head=True)
    assert asked.adapted == ["new classifier head (--reset-head)"]
    other = read_pretrained(last, replace(cfg.model, num_classes=10))
    assert other.adapted == ["new classifier head (10 classes, the weights' 4)"]
    # Through the command line, onto one channel: the run starts from the adapted weights and says so.
    data = make_dataset(chans=1)
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        run = train(cfg.replace(init=str(last), in_chans=1, out=str(tmp_path / "gray")), data)
    assert "initialised from" in caplog.text and "3 input channels -> 1" in caplog.text
    assert load_checkpoint(run.run_dir / "last.pt").model_state["pixel_mean"].shape == (1,)


def ema_run(tmp_path, name, **kw):
    cfg = from_preset("tiny", epochs=2, progress=False, out=str(tmp_path / name), ema=0.5, **kw)
    return train(cfg, make_dataset())


def test_a_run_with_a_weight_average_ships_the_better_of_the_two_and_every_command_takes_it(tmp_path, caplog):
    data = make_dataset()
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        result = ema_run(tmp_path, "run", val_split=0.25)
    last = result.history[-1]
    ema_wins = (last["val_ema_acc"], -last["val_ema_loss"]) > (last["val_acc"], -last["val_loss"])
    shipped = "ema.pt" if ema_wins else "last.pt"
    assert result.final_checkpoint == shipped and f"shipping {shipped}: the weight average's validation" in caplog.text
    results = json.loads((result.run_dir / "results.json").read_text())
    assert results["final_checkpoint"] == shipped and results["test_checkpoint"] == "last.pt"
    assert resolve_checkpoint(result.run_dir) == result.run_dir / shipped  # what evaluate, predict, export take
    model, _ = load_model(resolve_checkpoint(result.run_dir))
    measured = evaluate(model, data.test.images, data.test.labels)
    expected = results["test_ema"] if shipped == "ema.pt" else results["test"]
    assert measured["acc"] == pytest.approx(expected["acc"]) and measured["loss"] == pytest.approx(expected["loss"])


def test_without_validation_images_the_weight_average_ships(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        result = ema_run(tmp_path, "run", val_split=0.0)
    assert result.final_checkpoint == "ema.pt"
    assert "shipping ema.pt, the weight average: no validation images to choose on" in caplog.text


def test_each_checkpoint_of_a_run_exports_to_its_own_folder_and_none_overwrites_another(tmp_path, capsys):
    result = ema_run(tmp_path, "run", val_split=0.0)  # ships ema.pt
    run = result.run_dir
    assert default_export_dir(run) == default_export_dir(run / "ema.pt") == run / "export"
    assert default_export_dir(run / "last.pt") == run / "export-last"
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.pt").write_bytes((run / "last.pt").read_bytes())
    assert default_export_dir(lone / "model.pt") == lone / "export"  # a checkpoint alone: export/ as before
    for name in ("ema.pt", "last.pt"):
        assert main(["export", str(run / name), "--format", "safetensors"]) == 0
    recorded = json.loads((run / "export-last" / "config.json").read_text())["gmlp_vision"]
    assert recorded["checkpoint"] == "last.pt" and str(tmp_path) not in json.dumps(recorded)
    capsys.readouterr()
    out = ["--format", "safetensors", "--out", str(run / "export")]
    assert main(["export", str(run / "last.pt"), *out]) == 1  # export/ holds ema.pt's
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "holds the export of another checkpoint (ema.pt); pass --out with a new path, or remove it first"
    )
    assert "\n" not in err
    assert main(["export", str(run), *out]) == 0  # the same checkpoint again: overwritten as asked
    # The folder counts, not one file: last.pt's ONNX beside ema.pt's safetensors is refused too, before any write.
    before = sorted(p.name for p in (run / "export").iterdir())
    assert main(["export", str(run / "last.pt"), "--out", str(run / "export" / "model.onnx")]) == 1
    assert "holds the export of another checkpoint (ema.pt)" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "export").iterdir()) == before
    # A moved run exports its own checkpoints again; a damaged results.json still lets a named file export.
    moved = run.rename(tmp_path / "moved")
    assert main(["export", str(moved), "--format", "safetensors"]) == 0
    (moved / "results.json").write_text("{not json")
    assert default_export_dir(moved / "last.pt") == moved / "export-last"
