"""An exported paper-block model loads in timm by name, and by Hub id from a cache, and computes our logits.

timm is a test-time peer (`scripts/test.sh` installs it without its dependencies), never a package dependency; its
torchvision import is served by the stand-in in ``benchmarks/_stubs``, as `benchmarks/check_timm_transfer.py` does.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from gmlp_vision.artifacts import load_safetensors
from gmlp_vision.config import from_preset
from gmlp_vision.export import export_safetensors
from gmlp_vision.train import train
from synthetic import make_dataset

STUBS = Path(__file__).resolve().parents[1] / "benchmarks" / "_stubs"
try:
    import torchvision  # noqa: F401
except ImportError:
    sys.path.insert(0, str(STUBS))
timm = pytest.importorskip("timm", reason="timm is not installed (scripts/test.sh installs it)")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """gMLP-Ti's network at 32 px on one channel and 5 classes, trained an epoch, exported as safetensors."""
    out = tmp_path_factory.mktemp("timm")
    cfg = from_preset("gmlp-ti", image_size=32, epochs=1, batch_size=32, progress=False, out=str(out / "run"))
    result = train(cfg, make_dataset(n_train=64, n_test=16, num_classes=5, chans=1))
    export_safetensors(result.run_dir, out / "export")
    return out / "export"


def timm_logits(model, folder: Path, pixels: torch.Tensor) -> torch.Tensor:
    pretrained = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    mean, std = (torch.tensor(pretrained[k])[:, None, None] for k in ("mean", "std"))
    with torch.no_grad():
        return model.eval()((pixels / 255 - mean) / std)


def test_timm_builds_the_export_by_name_and_computes_our_logits(exported):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architecture"] == "gmlp_ti16_224" and cfg["model_args"] == {"img_size": 32, "in_chans": 1}
    model = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        num_classes=cfg["num_classes"],
        pretrained_cfg_overlay=dict(file=str(exported / "model.safetensors"), num_classes=cfg["num_classes"]),
        **cfg["model_args"],
    )
    pixels = torch.randint(0, 256, (6, 1, 32, 32), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        ours = load_safetensors(exported)(pixels)
    theirs = timm_logits(model, exported, pixels)
    assert (ours - theirs).abs().max().item() < 1e-3 and ours.abs().max() > 0.1  # the same, and not all zero


def test_timm_pulls_the_export_by_hub_id_from_the_cache(exported, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub", reason="the hub extra is not installed")
    from test_hub import offline_cache, put_in_cache  # noqa: F401 (the fixture's function, called below)

    cache = offline_cache.__wrapped__(tmp_path, monkeypatch)
    files = {name: exported / name for name in ("config.json", "model.safetensors")}
    put_in_cache(cache, "someone/tiny-gmlp", files)
    model = timm.create_model("hf-hub:someone/tiny-gmlp", pretrained=True)
    pixels = torch.randint(0, 256, (4, 1, 32, 32), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        ours = load_safetensors(exported)(pixels)
    assert (ours - timm_logits(model, exported, pixels)).abs().max().item() < 1e-3
