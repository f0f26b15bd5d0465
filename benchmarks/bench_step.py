"""One preset's training step and inference on random images, timed in-process: for comparing two checkouts.

Prints one line: the fastest of ``--rounds`` rounds of ``--steps`` training steps (ms per step) and of batch-512
inference calls, after warm-up steps, as the CLI runs them (`step.train_step`, freed memory kept). The minimum is the
figure least moved by a busy neighbour; to compare two checkouts, alternate them run by run on one machine, e.g.

    for i in 1 2 3 4 5 6; do for tree in /path/to/a /path/to/b; do
        PYTHONPATH=$tree/src .venv/bin/python benchmarks/bench_step.py --precision fp32; done; done
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from bench_ours import new_model, random_uint8

import gmlp_vision
from gmlp_vision.config import from_preset
from gmlp_vision.cpu import keep_freed_memory
from gmlp_vision.optim import build_optimizer
from gmlp_vision.step import train_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10-fast")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `gmlp train` runs: freed activations are reused, not faulted in again
    cfg = from_preset(args.preset, num_classes=10, precision=args.precision, threads=args.threads)
    model = new_model(cfg)
    optimizer = build_optimizer(cfg.optim, model)
    generator = torch.Generator().manual_seed(0)
    batch = cfg.optim.batch_size
    images = [random_uint8(batch, generator) for _ in range(4)]
    labels = torch.randint(0, 10, (batch,), generator=generator)
    for i in range(5):
        train_step(model, optimizer, images[i % 4], labels, cfg, generator)
    train = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for i in range(args.steps):
            train_step(model, optimizer, images[i % 4], labels, cfg, generator)
        train.append((time.perf_counter() - start) / args.steps)
    model.eval()
    x, infer = random_uint8(512, generator), []
    with torch.no_grad():
        model(x)
        for _ in range(args.rounds):
            start = time.perf_counter()
            model(x)
            infer.append(time.perf_counter() - start)
    where = f"{gmlp_vision.__file__}: {args.preset} {args.precision}, batch {batch}"
    print(f"{where}: train step {1000 * min(train):.1f} ms, inference of 512 images {1000 * min(infer):.1f} ms "
          f"(in fp32; fastest of {args.rounds} rounds)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
