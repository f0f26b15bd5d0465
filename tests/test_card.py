"""What `gmlp export` writes beside the weights: config.json in timm's Hub layout, the README.md model card, and
exports of gmlp-vision 0.1.0 (tests/fixtures/v0_1_0/export) that still load."""

import dataclasses
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gmlp_vision.artifacts import load_safetensors, read_export_config
from gmlp_vision.card import MARKER, _header, model_card
from gmlp_vision.checkpoint import load_checkpoint, load_model, resolve_checkpoint
from gmlp_vision.cli import main
from gmlp_vision.config import from_preset
from gmlp_vision.errors import CheckpointError
from gmlp_vision.export import export_safetensors
from gmlp_vision.predict import Classifier
from gmlp_vision.pretrained import read_pretrained
from gmlp_vision.timm_layout import gmlp_to_timm, timm_architecture
from gmlp_vision.train import train
from synthetic import make_dataset

OLD_EXPORT = Path(__file__).parent / "fixtures" / "v0_1_0" / "export"
OLD_RUN = Path(__file__).parent / "fixtures" / "v0_1_0" / "run"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return make_dataset()


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("card") / "run"
    cfg = from_preset("tiny", epochs=1, progress=False, out=str(out), resize="squash", crop_pct=0.9)
    return train(cfg, data).run_dir


def test_config_json_has_timms_hub_layout(run, tmp_path):
    export_safetensors(run, tmp_path / "st")
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    model, ckpt = load_model(resolve_checkpoint(run))
    mc = model.cfg
    # The tiny preset is no model timm builds (2 blocks): version 2, our names, and the card says why.
    assert isinstance(timm_architecture(mc), str) and config["gmlp_vision"]["version"] == 2
    assert config["architecture"] == "gmlp" and config["num_classes"] == mc.num_classes == 4
    assert config["num_features"] == mc.embed_dim and config["global_pool"] == "avg"
    written = {k: v for k, v in dataclasses.asdict(mc).items() if k != "patch_init"}  # at its default: left out
    assert config["label_names"] == list(ckpt.classes) and config["model_args"] == written
    pretrained = config["pretrained_cfg"]
    assert pretrained["input_size"] == [3, 32, 32] and pretrained["num_classes"] == 4
    assert (pretrained["crop_mode"], pretrained["crop_pct"]) == ("squash", 0.9)
    assert config["gmlp_vision"]["pixel_mean"] == pytest.approx(model.pixel_mean.tolist())
    assert read_export_config(tmp_path / "st").model == mc
    state = dict(model.state_dict())
    for key in (pretrained["first_conv"] + ".weight", pretrained["classifier"] + ".weight"):
        assert key in state
    card = model_card(resolve_checkpoint(run), ckpt, ["model.safetensors", "config.json"])
    assert "timm cannot build this model: timm's gMLPs have patch 16, 30 blocks" in card


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory) -> Path:
    """gMLP-Ti's network (30 blocks, width 128, patch 16) at 32 px on one channel: a model timm builds."""
    out = tmp_path_factory.mktemp("paper") / "run"
    cfg = from_preset("gmlp-ti", image_size=32, epochs=1, batch_size=32, progress=False, out=str(out))
    return train(cfg, make_dataset(n_train=64, n_test=16, num_classes=5, chans=1)).run_dir


def test_a_model_timm_builds_exports_in_its_layout_and_loads_back(paper_run, tmp_path):
    assert main(["export", str(paper_run), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    model, ckpt = load_model(resolve_checkpoint(paper_run))
    mc = model.cfg
    assert config["architecture"] == "gmlp_ti16_224" and config["model_args"] == {"img_size": 32, "in_chans": 1}
    written = {k: v for k, v in dataclasses.asdict(mc).items() if k != "patch_init"}  # at its default: left out
    assert config["gmlp_vision"]["version"] == 3 and config["gmlp_vision"]["model"] == written
    pretrained = config["pretrained_cfg"]
    assert pretrained["mean"] == pytest.approx((model.pixel_mean / 255).tolist())
    assert pretrained["std"] == pytest.approx((model.pixel_std / 255).tolist())
    state = safetensors.torch.load_file(tmp_path / "st" / "model.safetensors")
    assert state.keys() == gmlp_to_timm(model.state_dict(), mc).keys()  # exactly timm's names, no pixel buffers
    assert "stem.proj.weight" in state and state["stem.proj.weight"].shape == (128, 1, 16, 16)
    pixels = torch.randint(0, 256, (4, 1, 32, 32), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        assert torch.equal(load_safetensors(tmp_path / "st")(pixels), model(pixels))  # our names back, exactly
    assert "In timm this is `gmlp_ti16_224`" in (tmp_path / "st" / "README.md").read_text()
    assert timm_architecture(replace(mc, shortcut="normed")) == "its residuals start from the normed input"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["gmlp_vision"].pop("model"), "model must be a JSON object, got nothing"),
        (lambda c: c["gmlp_vision"]["model"].update(evil=1), "unknown model argument 'evil'"),
        (lambda c: c["gmlp_vision"].update(pixel_std=[0.0]), "pixel_std must be a list of finite numbers, one per"),
        (lambda c: c["gmlp_vision"].update(pixel_mean=[1.0, 2.0]), "pixel_mean and pixel_std must hold 1 values"),
        (lambda c: c["gmlp_vision"].update(pixel_mean="x"), "pixel_mean must be a list of finite numbers"),
        (lambda c: c["gmlp_vision"].update(pixel_mean=[10**400]), "pixel_mean must be a list of finite numbers"),
        (lambda c: c["gmlp_vision"].update(weights="gmlp"), "gmlp_vision.weights must be 'timm' in version 3"),
        (lambda c: c["model_args"].update(img_size=64), "architecture and model_args do not describe the model"),
        (lambda c: c.update(architecture="gmlp_s16_224"), "architecture and model_args do not describe the model"),
        (lambda c: c["pretrained_cfg"].update(mean=[0.5]), r"pretrained_cfg.mean must be gmlp_vision.pixel_mean/255"),
        (lambda c: c["pretrained_cfg"].update(std=[10**400]), r"pretrained_cfg.std must be gmlp_vision.pixel_std/255"),
    ],
)
def test_a_version_3_config_is_checked_value_by_value(paper_run, tmp_path, change, message):
    export_safetensors(paper_run, tmp_path / "st")
    path = tmp_path / "st" / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        read_export_config(tmp_path / "st")


def test_a_pipeline_built_from_pretrained_cfg_feeds_the_model_what_it_expects(run, tmp_path, data):
    """timm's eval pipeline scales pixels to 0..1, then subtracts ``mean`` and divides by ``std``: for version 2 that
    gives our model back its raw pixels (it normalises them itself)."""
    export_safetensors(run, tmp_path / "st")
    pretrained = json.loads((tmp_path / "st" / "config.json").read_text())["pretrained_cfg"]
    model = load_safetensors(tmp_path / "st")
    raw = data.test.images[:16].float()
    mean = torch.tensor(pretrained["mean"])[:, None, None]
    std = torch.tensor(pretrained["std"])[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(model((raw / 255 - mean) / std), model(raw), atol=1e-4, rtol=0)


def test_a_version_3_pipeline_normalises_as_the_model_does(paper_run, tmp_path):
    """For version 3 it gives timm's model what ours computes from raw pixels inside (`normalize`)."""
    export_safetensors(paper_run, tmp_path / "st")
    pretrained = json.loads((tmp_path / "st" / "config.json").read_text())["pretrained_cfg"]
    model = load_safetensors(tmp_path / "st")
    raw = torch.randint(0, 256, (4, 1, 32, 32), generator=torch.Generator().manual_seed(2)).float()
    mean = torch.tensor(pretrained["mean"])[:, None, None]
    std = torch.tensor(pretrained["std"])[:, None, None]
    ours = (raw - model.pixel_mean[:, None, None]) / model.pixel_std[:, None, None]
    torch.testing.assert_close((raw / 255 - mean) / std, ours, atol=1e-4, rtol=1e-5)


def test_exports_of_0_1_0_still_load(tmp_path):
    old_model, old_ckpt = load_model(OLD_RUN / "best.pt")
    config = read_export_config(OLD_EXPORT)
    assert config.model == old_model.cfg and (config.resize, config.crop_pct) == ("crop", 1.0)
    pixels = torch.randint(0, 256, (8, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        assert torch.equal(load_safetensors(OLD_EXPORT)(pixels), old_model(pixels))
    assert Classifier.load(OLD_EXPORT / "model.safetensors").classes == old_ckpt.classes
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed; CI installs it")
    graph = Classifier.load(OLD_EXPORT / "model.onnx")
    assert graph.classes == old_ckpt.classes
    torch.testing.assert_close(graph.model(pixels), old_model(pixels), atol=1e-4, rtol=0)


def test_cli_export_writes_a_model_card(run, tmp_path, capsys):
    out = tmp_path / "st"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert f"wrote {out / 'README.md'}: the model card" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    results = json.loads((run / "results.json").read_text())
    assert card.startswith("---\nlibrary_name: gmlp-vision\npipeline_tag: image-classification\n")
    for section in ("## Files", "## Data", "## Results", "## Training", "## Classes", "## How to use",
                    "## Intended use and limits"):  # fmt: skip
        assert f"\n{section}\n" in card
    assert f"{100 * results['test']['acc']:.2f} %" in card
    assert (
        results["command"] is None and "Produced by:" not in card
    )  # the data came from memory: no command rebuilds it
    assert "- Trained on a Dataset passed to train() in memory ('cifar10')." in card and "datasets:" not in card
    images = results["images"]
    assert f"{images['train']} for training, {images['validation']} held out" in card
    assert "`model.safetensors`" in card and "`config.json`" in card and "| `model.onnx` |" not in card
    assert "In label order: `class0`, `class1`, `class2`, `class3`." in card
    assert "squashed to 35 x 35 (crop_pct 0.9), then the centre 32 x 32 is cut out" in card
    assert card.rstrip().endswith(MARKER)
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0  # its own card: rewritten
    assert (out / "README.md").read_text() == card


def test_the_card_lists_the_onnx_files_beside_it(run, tmp_path, capsys):
    pytest.importorskip("onnx", reason="the onnx extra is not installed; CI installs it")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed; CI installs it")
    out = tmp_path / "ex"
    assert main(["export", str(run), "--out", str(out / "model.onnx"), "--quantize", "int8"]) == 0
    card = (out / "README.md").read_text()
    assert "`model.onnx`" in card and "`model.int8.onnx`" in card and "`model.safetensors`" not in card


def test_a_readme_gmlp_export_did_not_write_is_left_alone(run, tmp_path, capsys):
    out = tmp_path / "st"
    out.mkdir()
    (out / "README.md").write_text("# my project\n")
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert "kept" in capsys.readouterr().out and (out / "README.md").read_text() == "# my project\n"
    assert (out / "model.safetensors").is_file()
    edited = model_card(run / "best.pt", load_checkpoint(run / "best.pt"), []).replace(MARKER, "my notes")
    (out / "README.md").write_text(edited)  # a card whose marker the user deleted to keep their edits
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert (out / "README.md").read_text() == edited


def test_a_checkpoint_without_a_final_evaluation_says_so(run, tmp_path):
    final = json.loads((run / "results.json").read_text())["final_checkpoint"]
    other = "last.pt" if final == "best.pt" else "best.pt"
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run / final, lone / "model.pt")  # a checkpoint away from its run
    for path in (run / other, lone / "model.pt"):
        ckpt = load_checkpoint(path)
        card = model_card(path, ckpt, [])
        assert "No final evaluation is recorded" in card and f"{100 * ckpt.metrics['val_acc']:.2f} %" in card


def test_the_card_leaves_local_paths_out(run, tmp_path):
    ckpt = load_checkpoint(run / "best.pt")
    alone = tmp_path / "best.pt"  # without the run's results.json (which says its data came from memory)
    shutil.copy(run / "best.pt", alone)
    for kind, what in (("folder", "image folder"), ("csv", "label table")):
        cfg = ckpt.config.replace(dataset=kind, data="/home/someone/private/flowers")
        card = model_card(alone, dataclasses.replace(ckpt, config=cfg), [])
        assert "/home/someone" not in card and f"the {what} `flowers`" in card and str(run) not in card


def test_the_cards_metadata_block_is_yaml_with_a_model_index(run, paper_run, tmp_path):
    yaml = pytest.importorskip("yaml", reason="pyyaml comes with the hub extra")
    results = json.loads((run / "results.json").read_text())
    ckpt_path = resolve_checkpoint(run)
    card = model_card(ckpt_path, load_checkpoint(ckpt_path), ["model.safetensors", "config.json"])
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "gmlp-vision" and meta["license"] == "other" and "timm" not in meta["tags"]
    entry = meta["model-index"][0]
    assert entry["name"] == "run" and entry["results"][0]["task"]["type"] == "image-classification"
    metric = entry["results"][0]["metrics"][0]
    assert metric["type"] == "accuracy" and metric["value"] == round(100 * results["test"]["acc"], 2)
    paper = resolve_checkpoint(paper_run)
    tags = yaml.safe_load(model_card(paper, load_checkpoint(paper), ["model.safetensors"]).split("---\n")[1])["tags"]
    assert "timm" in tags  # timm builds it from the files


def test_a_timm_layout_export_starts_a_run_with_its_statistics_and_classes(paper_run, tmp_path):
    export_safetensors(paper_run, tmp_path / "st")
    model, ckpt = load_model(resolve_checkpoint(paper_run))
    fitted = read_pretrained(tmp_path / "st" / "model.safetensors", model.cfg, classes=ckpt.classes)
    assert (
        fitted.fresh == []
        and torch.allclose(fitted.mean, model.pixel_mean)
        and torch.allclose(fitted.std, model.pixel_std)
    )
    reordered = read_pretrained(tmp_path / "st" / "model.safetensors", model.cfg, classes=ckpt.classes[::-1])
    assert reordered.fresh == ["head.weight", "head.bias"]  # the export's own class names, read from config.json


def test_a_card_leaves_out_a_model_index_without_a_usable_accuracy(run):
    ckpt_path = resolve_checkpoint(run)
    ckpt = load_checkpoint(ckpt_path)
    for acc in (10**400, float("nan"), True, 1.5):
        results = {"final_checkpoint": ckpt_path.name, "test_checkpoint": ckpt_path.name, "test": {"acc": acc}}
        assert "model-index" not in _header(ckpt_path, ckpt, ["model.safetensors"], results)
