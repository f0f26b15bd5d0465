"""Models by Hugging Face Hub id, from a real huggingface_hub cache with ``HF_HUB_OFFLINE=1``: nothing is fetched."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gmlp_vision.cli import main
from gmlp_vision.config import ModelConfig, from_preset, resolve_config
from gmlp_vision.errors import CheckpointError
from gmlp_vision.export import export_safetensors
from gmlp_vision.fetch import HUB_EXTRA, hub_id
from gmlp_vision.model import GMLP
from gmlp_vision.predict import Classifier
from gmlp_vision.pretrained import read_pretrained, weights_fit
from gmlp_vision.train import train
from synthetic import make_dataset
from test_transfer import SMALL, timm_state

hub = pytest.importorskip("huggingface_hub", reason="the hub extra is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """Lay ``files`` out as huggingface_hub caches a model repository: blobs by hash, a snapshot, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache, offline, for this process (its constants) and for the ones it starts (env)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_value_is_a_hub_id_only_where_it_names_no_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id("timm/gmlp_s16_224.ra3_in1k") == "timm/gmlp_s16_224.ra3_in1k"
    assert hub_id("hf-hub:me/tiny") == "me/tiny"
    for path in ("runs/last.pt", "model.safetensors", "a/b/c", "../x/y", "/abs/path", "plain", "me/tiny.onnx"):
        assert hub_id(path) is None, path
    (tmp_path / "me").mkdir()
    (tmp_path / "me" / "tiny").mkdir()
    assert hub_id("me/tiny") is None  # an existing folder wins
    with pytest.raises(CheckpointError, match="a Hub id reads hf-hub:ORG/NAME"):
        hub_id("hf-hub:not an id")


def test_init_takes_timm_weights_by_hub_id_from_the_cache_offline(offline_cache, tmp_path, caplog):
    cfg = ModelConfig(**SMALL)
    state = timm_state(cfg)
    save_file(state, tmp_path / "model.safetensors")
    put_in_cache(offline_cache, "timm/gmlp_small.test", {"model.safetensors": tmp_path / "model.safetensors"})
    assert [r.repo_id for r in hub.scan_cache_dir(offline_cache).repos] == ["timm/gmlp_small.test"]  # its own layout
    fitted = read_pretrained("timm/gmlp_small.test", cfg)
    assert torch.equal(fitted.state["blocks.1.fc1.weight"], state["blocks.1.mlp_channels.fc1.weight"])
    run = from_preset("tiny", **SMALL, init="hf-hub:timm/gmlp_small.test", epochs=1, progress=False,
                      out=str(tmp_path / "run"))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="gmlp_vision"):
        train(run.replace(num_classes=4), make_dataset())
    assert "initialised from hf-hub:timm/gmlp_small.test (" in caplog.text
    assert "models--timm--gmlp_small.test" in caplog.text  # where it was read from


def test_an_export_pulled_by_hub_id_predicts_as_the_local_one(offline_cache, tmp_path, capsys):
    result = train(from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run")), make_dataset())
    weights = export_safetensors(result.run_dir, tmp_path / "export")
    files = {"model.safetensors": weights, "config.json": tmp_path / "export" / "config.json"}
    put_in_cache(offline_cache, "someone/tiny-gmlp", files)
    images = make_dataset().test.images[:4]
    local, pulled = Classifier.load(tmp_path / "export"), Classifier.load("hf-hub:someone/tiny-gmlp")
    assert torch.equal(local.logits(images), pulled.logits(images)) and pulled.classes == local.classes
    from PIL import Image

    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "one.png")
    assert main(["predict", "someone/tiny-gmlp", str(tmp_path / "one.png"), "--json", "--device", "cpu"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["top_k"][0]["name"] in local.classes


def test_offline_without_the_cache_and_without_the_extra_are_one_line_each(
    offline_cache, tmp_path, monkeypatch, capsys
):
    png = tmp_path / "one.png"
    png.write_bytes(b"")
    assert main(["predict", "someone/not-cached", str(png)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "gmlp: error: MODEL someone/not-cached: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
        "fetch it once online"
    )
    with pytest.raises(CheckpointError, match=r"no such file"):  # a path, even a missing one, is never a Hub id
        read_pretrained(tmp_path / "typo.safetensors", ModelConfig(**SMALL))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as when the extra is not installed
    with pytest.raises(CheckpointError) as info:
        read_pretrained("timm/gmlp_s16_224.ra3_in1k", ModelConfig(**SMALL))
    assert str(info.value) == (
        f"--init timm/gmlp_s16_224.ra3_in1k: fetching from the Hugging Face Hub needs huggingface_hub: {HUB_EXTRA}"
    )


def test_a_new_process_reads_the_cache_its_environment_names(offline_cache, tmp_path):
    # As a user runs it: HF_HOME and HF_HUB_OFFLINE in the environment, nothing patched.
    save_file(timm_state(ModelConfig(**SMALL)), tmp_path / "model.safetensors")
    put_in_cache(offline_cache, "timm/gmlp_small.test", {"model.safetensors": tmp_path / "model.safetensors"})
    code = (
        "from gmlp_vision.config import ModelConfig\nfrom gmlp_vision.pretrained import read_pretrained\n"
        f"print(len(read_pretrained('timm/gmlp_small.test', ModelConfig(**{SMALL!r})).state))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(GMLP(ModelConfig(**SMALL)).state_dict()) - 2  # all but the pixel statistics


def test_push_to_hub_uploads_the_export_folder_and_refuses_early_without_a_token(tmp_path, monkeypatch, capsys):
    # The upload itself needs the network: huggingface_hub's two calls are replaced by recorders, nothing leaves.
    from huggingface_hub import HfApi, constants

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test_token")
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo, **kw: calls.append((repo, kw)) or f"https://hf.co/{repo}"
    )
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(kw))
    run = train(from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run")), make_dataset()).run_dir
    assert main(["export", str(run), "--format", "safetensors", "--push-to-hub", "me/tiny-gmlp"]) == 0
    assert calls[0] == ("me/tiny-gmlp", {"repo_type": "model", "exist_ok": True})
    assert calls[1]["repo_id"] == "me/tiny-gmlp" and Path(calls[1]["folder_path"]) == run / "export"
    assert calls[1]["allow_patterns"] == ["model.safetensors", "config.json", "README.md"]  # nothing else there
    out = capsys.readouterr().out.strip()
    assert out.endswith("uploaded model.safetensors, config.json, README.md to https://hf.co/me/tiny-gmlp")
    monkeypatch.setattr(hub, "get_token", lambda: None)
    for repo, message in [
        ("me/tiny-gmlp", "--push-to-hub needs a Hugging Face token: run `hf auth login`, or set HF_TOKEN"),
        ("not a repo", "--push-to-hub not a repo: a Hub repository reads ORG/NAME"),
    ]:
        assert main(["export", str(run), "--out", str(tmp_path / "other"), "--push-to-hub", repo]) == 1
        assert capsys.readouterr().err.strip() == f"gmlp: error: {message}"
        assert not (tmp_path / "other").exists() and len(calls) == 2  # refused before any work


def test_evaluate_takes_an_export_by_folder_or_hub_id_with_its_data(offline_cache, tmp_path, capsys):
    argv = ["--dataset", "digits", "--json", "--device", "cpu"]
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--threads", "1", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    assert main(["export", str(tmp_path / "run"), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    put_in_cache(
        offline_cache, "me/digits-gmlp", {n: tmp_path / "st" / n for n in ("config.json", "model.safetensors")}
    )
    capsys.readouterr()
    lines = []
    for model in (str(tmp_path / "run"), str(tmp_path / "st"), "me/digits-gmlp"):
        assert main(["evaluate", model, *argv]) == 0
        lines.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert lines[0]["acc"] == lines[1]["acc"] == lines[2]["acc"] and lines[0]["images"] == lines[2]["images"] == 355
    assert lines[0]["loss"] == pytest.approx(lines[2]["loss"], rel=1e-6)
    assert main(["evaluate", "me/digits-gmlp", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gmlp: error: an export does not record the data it was trained on: pass --dataset (and --data)"


def test_fine_tuning_takes_the_pretrained_models_own_resize_unless_set(offline_cache, tmp_path, capsys):
    cfg = ModelConfig(**SMALL)
    save_file(timm_state(cfg), tmp_path / "model.safetensors")
    assert weights_fit(tmp_path / "model.safetensors") == {"resize": "crop", "crop_pct": 0.875}  # timm's gmlp_s16_224
    timm_config = {"architecture": "gmlp_s16_224", "pretrained_cfg": {"crop_pct": 0.95, "crop_mode": "squash"}}
    (tmp_path / "config.json").write_text(json.dumps(timm_config))
    files = {"model.safetensors": tmp_path / "model.safetensors", "config.json": tmp_path / "config.json"}
    put_in_cache(offline_cache, "timm/gmlp_small.fit", files)
    assert weights_fit("timm/gmlp_small.fit") == {"resize": "squash", "crop_pct": 0.95}  # what its config.json says
    squashed = from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run"), resize="squash", crop_pct=0.8)
    result = train(squashed, make_dataset())
    own = weights_fit(result.run_dir / "last.pt")
    assert own == {"resize": "squash", "crop_pct": 0.8}
    assert weights_fit(export_safetensors(result.run_dir, tmp_path / "export")) == own
    init = str(result.run_dir / "last.pt")
    tuned = resolve_config({"dataset": "digits", "init": init}, fit_of=weights_fit)
    assert (tuned.data.resize, tuned.data.crop_pct, tuned.optim.recipe) == ("squash", 0.8, "finetune")
    mine = resolve_config({"dataset": "digits", "init": init, "crop_pct": 1.0}, fit_of=weights_fit)
    assert (mine.data.resize, mine.data.crop_pct) == ("squash", 1.0)  # a flag wins
    scratch = resolve_config({"dataset": "digits", "init": init, "recipe": "scratch"}, fit_of=weights_fit)
    assert (scratch.data.resize, scratch.data.crop_pct) == ("crop", 1.0)  # the preset's
    argv = ["train", "--dataset", "digits", "--init", "timm/gmlp_small.fit", "--print-config"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "resize: squash" in printed and "crop_pct: 0.95" in printed
    assert main(["train", "--dataset", "digits", "--init", str(tmp_path / "missing.pt"), "--print-config"]) == 1
    assert "missing.pt: no such file" in capsys.readouterr().err
