"""Check `gmlp_vision.pretrained` against timm (issue #7): timm's ``gmlp_s16_224`` and our ``gmlp-s`` compute the same.

Not a test (timm is a benchmark peer, installed by ``benchmarks/setup_peers.sh``, never by the package): builds timm's
model with random weights (every tensor moved off its init: norms, biases, head, spatial projections), saves them
as a .safetensors file as the Hub ships them, loads that file with ``--init``'s code into the ``gmlp-s`` preset, and
compares the logits of both on the same random images (timm gets ``(x / 255 - 0.5) / 0.5``, ours raw pixels).

    .venv/bin/python benchmarks/check_timm_transfer.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "_stubs"))  # torchvision stand-in, see README.md

import timm  # noqa: E402

from gmlp_vision.config import from_preset  # noqa: E402
from gmlp_vision.model import GMLP  # noqa: E402
from gmlp_vision.pretrained import load_pretrained  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    peer = timm.create_model("gmlp_s16_224", pretrained=False).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # every tensor off its init: norms, biases, head, spatial weights
    path = Path(tempfile.mkdtemp()) / "model.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, path)
    ours = GMLP(from_preset("gmlp-s").model).eval()
    load_pretrained(ours, path)
    pixels = torch.randint(0, 256, (4, 3, 224, 224)).float()
    with torch.no_grad():
        expected = peer((pixels / 255.0 - 0.5) / 0.5)
        got = ours(pixels)
    diff = (got - expected).abs().max().item()
    same_top = bool((got.argmax(1) == expected.argmax(1)).all())
    print(
        f"timm {timm.__version__} gmlp_s16_224 vs gmlp-s: {sum(p.numel() for p in peer.parameters()):,} parameters, "
        f"max |logit difference| {diff:.2e} (logits up to {expected.abs().max().item():.2f}), same top-1: {same_top}"
    )
    return 0 if diff < 1e-3 and same_top else 1


if __name__ == "__main__":
    sys.exit(main())
