"""Where the time of one training step goes (issue #3): torch.profiler over the CLI's real `train_step`.

Runs a preset's step (default `seed`: batch 128, 32 px, dropout and augmentation on; a CIFAR-100 head) for a few
warm-up steps, then profiles ``--steps`` more and prints each kind of work's share of the step, then the top
operators by self time.

    .venv/bin/python benchmarks/profile_step.py                  # bf16, 2 threads
    .venv/bin/python benchmarks/profile_step.py --precision fp32 --no-dropout
    .venv/bin/python benchmarks/profile_step.py --preset cifar10-fast --precision fp32
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from bench_ours import new_model, random_uint8
from torch.profiler import ProfilerActivity, profile

from gmlp_vision.config import from_preset
from gmlp_vision.cpu import keep_freed_memory
from gmlp_vision.optim import build_optimizer
from gmlp_vision.step import train_step

# Operator name fragments -> kind of work (first match wins).
KINDS = (
    ("matrix products", ("mm", "addmm", "bmm", "linear", "matmul")),
    ("GELU", ("gelu",)),
    ("layer norm", ("layer_norm",)),
    ("dropout masks (random bits)", ("random_", "bernoulli", "randint", "bitwise", "rand")),
    ("casts and copies", ("copy_", "to_copy", "_to_copy", "clone", "contiguous", "cat")),
    ("elementwise multiply / add", ("mul", "add", "sub", "div", "where")),
    ("optimiser", ("adam", "lerp", "sqrt", "foreach")),
    ("augmentation sampling", ("grid_sampler", "affine_grid")),
)


def kind(name: str) -> str:
    low = name.lower()
    for label, fragments in KINDS:
        if any(f in low for f in fragments):
            return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-dropout", action="store_true")
    parser.add_argument("--preset", default="seed", help="the preset whose step is profiled (e.g. cifar10-fast)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `gmlp train` runs: freed activations are reused, not faulted in again
    overrides = dict(dropout=0.0, head_dropout=0.0) if args.no_dropout else {}
    cfg = from_preset(args.preset, num_classes=100, precision=args.precision, threads=args.threads, **overrides)
    model = new_model(cfg)
    optimizer = build_optimizer(cfg.optim, model)
    generator = torch.Generator().manual_seed(0)
    images, labels = random_uint8(128, generator), torch.randint(0, 100, (128,), generator=generator)
    for _ in range(5):
        train_step(model, optimizer, images, labels, cfg, generator)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, optimizer, images, labels, cfg, generator)
        wall = (time.perf_counter() - t0) / args.steps
    shares: dict[str, float] = defaultdict(float)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    for e in events:
        shares[kind(e.key)] += e.self_cpu_time_total / total
    dropout = "off" if args.no_dropout else "on"
    print(f"{args.preset} step, batch 128, {args.precision}, dropout {dropout}, {args.threads} threads: "
          f"{1000 * wall:.1f} ms per step under the profiler ({128 / wall:,.0f} img/s)")  # fmt: skip
    for label, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * share:5.1f} %  {label}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
