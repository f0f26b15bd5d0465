"""Peak resident memory of a real training run, measured in its own process (``bench.py`` starts it).

The process holds a generated CIFAR-100-sized dataset (50,000 train + 10,000 test uint8 images, 100 classes) in a
`gmlp_vision.data.Dataset`, then by default runs what one epoch of ``gmlp_vision.train.train`` runs, cut short:
``channel_stats`` (when present), ``train_step`` over shuffled batches of the full-size tensors for ``--steps`` steps
(or until ``--max-seconds``, after at least 3 steps), then ``evaluate`` on the 5,000 validation images. ``--full``
calls ``gmlp_vision.train.train`` itself for one whole epoch instead (checkpoints, history and the 10,000-image test
included; two minutes or more). It prints one JSON line: ``ru_maxrss`` (Linux: KiB) in MB (10^6 bytes), and the time.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from gmlp_vision.config import from_preset
from gmlp_vision.data import Dataset, Split
from gmlp_vision.data.base import channel_stats
from gmlp_vision.distributed import maybe_compile
from gmlp_vision.evaluate import evaluate
from gmlp_vision.model import GMLP
from gmlp_vision.optim import build_optimizer
from gmlp_vision.reporting import default_callbacks
from gmlp_vision.step import train_step
from gmlp_vision.train import train

TRAIN, TEST, NUM_CLASSES, VAL = 50_000, 10_000, 100, 5_000


def cifar100_sized(seed: int = 0) -> Dataset:
    """Random uint8 images and labels with CIFAR-100's shapes and class count."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        return Split(images, torch.randint(0, NUM_CLASSES, (n,), generator=g))

    return Dataset(name="cifar100", train=split(TRAIN), test=split(TEST), classes=tuple(f"c{i}" for i in range(100)))


def run(steps: int, max_seconds: float, threads: int, precision: str, full: bool) -> dict[str, object]:
    """Train as described in the module docstring; returns the peak RSS and what ran."""
    torch.set_num_threads(threads)
    ds = cifar100_sized()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_preset("seed", epochs=1, train_limit=0, progress=False, out=str(Path(tmp) / "run"),
                          threads=threads, precision=precision, num_classes=NUM_CLASSES)  # fmt: skip
        if full:
            train(cfg, ds, callbacks=default_callbacks(cfg))  # as `gmlp train`: the plots' memory counts too
            ran = "gmlp_vision.train.train, 1 epoch (45,000 train + 5,000 val + 10,000 test images)"
        else:
            model = GMLP(cfg.model)
            # train() first takes per-channel statistics over the training images; its float64 chunks are part of
            # the peak, so do the same.
            model.set_normalization(*channel_stats(ds.train.images))
            optimizer = build_optimizer(cfg.optim, model)
            model = maybe_compile(model, cfg.run.compile)
            model.train()
            generator = torch.Generator().manual_seed(0)
            x, y = ds.train.images[:-VAL], ds.train.labels[:-VAL]
            done = 0
            for idx in torch.randperm(len(y), generator=generator).split(cfg.optim.batch_size)[:steps]:
                train_step(model, optimizer, x[idx], y[idx], cfg, generator)
                done += 1
                if done >= 3 and time.perf_counter() - t0 > max_seconds:
                    break
            evaluate(model, ds.train.images[-VAL:], ds.train.labels[-VAL:], batch_size=cfg.run.eval_batch_size,
                     precision=precision)  # fmt: skip
            ran = f"channel_stats + train_step x{done} + evaluate({VAL:,} images) on full-size tensors"
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    return {"maxrss_mb": maxrss_mb, "seconds": time.perf_counter() - t0, "ran": ran, "precision": precision}


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="stop the steps after this long")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--full", action="store_true", help="run gmlp_vision.train.train for one whole epoch")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.steps, args.max_seconds, args.threads, args.precision, args.full)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
