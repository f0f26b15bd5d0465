"""Is the finetune recipe what holds the transfer gain back? Fine-tune one pretrained checkpoint with recipe variants.

`bench_transfer.py --diagnose` measures the pretrained features (linear probes) and the full-data ceiling; this script
varies the fine-tuning itself on the same 500 images of CIFAR-10's last five classes and the same 5,000 test images:
the lr, the layer-wise decay and the length, each variant one run of the ``general`` preset with ``--init``.

    .venv/bin/python benchmarks/sweep_transfer.py --checkpoint benchmarks/results/transfer-cache/pretrain-KEY/last.pt

Prints one JSON line per variant (its overrides and the shipped weights' test accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_transfer import DEFAULT_DATA, SECOND, part

from gmlp_vision.checkpoint import load_model
from gmlp_vision.config import resolve_config
from gmlp_vision.data import load_dataset
from gmlp_vision.evaluate import evaluate
from gmlp_vision.train import train

VARIANTS = (
    {},
    {"lr": 0.0005},
    {"lr": 0.001, "layer_decay": 1.0},
    {"layer_decay": 0.5},
    {"epochs": 10},
    {"epochs": 60},
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the pretrained checkpoint (bench_transfer's cache)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 python archive")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: gmlp's choice)")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file() or not Path(args.data).is_file():
        print("sweep_transfer: --checkpoint and --data must be files", file=sys.stderr)
        return 2
    target = part(load_dataset("cifar10", args.data, download=False, progress=False), SECOND, 100)
    with tempfile.TemporaryDirectory() as runs:
        for variant in VARIANTS:
            given = {"epochs": 30, "progress": False, "threads": args.threads, "val_split": 0.0, **variant}
            given.update(init=args.checkpoint, out=str(Path(runs) / f"run-{len(variant)}-{time.time()}"))
            result = train(resolve_config(given, preset="general"), target, verbose=0)
            model, _ = load_model(result.run_dir / result.final_checkpoint)
            acc = evaluate(model, target.test.images, target.test.labels)["acc"]
            print(json.dumps({**variant, "acc": acc, "shipped": result.final_checkpoint}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
