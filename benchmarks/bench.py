"""CPU benchmark of the `seed` gMLP: our real training step and inference against the machine's matmul peak and peers.

One run measures, on the same threads, batch and precision: ``torch.mm`` GFLOP/s (fp32, bf16); our training step
(`gmlp_vision.step.train_step`, the CLI's) with and without augmentation and our inference (`infer`) in fp32/bf16,
eager and compiled; the augmentation alone; peak RSS of a training run (in a subprocess); timm's and lucidrains'
gMLP as the same model. It prints a table and writes JSON. See ``benchmarks/README.md``. Never run in CI.

Usage: ``.venv/bin/python benchmarks/bench.py [--quick] [--no-peers] [--threads 2] [--modes fp32,bf16]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from bench_ours import BATCH, INFER_BATCH, bench_augment, bench_mode, new_model, seed_config
from bench_peers import PEER_MODES, PEERS, bench_peer_mode, probe
from bench_report import render, summarize
from bench_timing import Budget, cpu_model, matmul_peak, wait_for_quiet

import gmlp_vision
from gmlp_vision.cpu import keep_freed_memory

HERE = Path(__file__).resolve().parent
MODES = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "fp32-compile": ("fp32", True),
    "bf16-compile": ("bf16", True),
}


@dataclass(frozen=True)
class Plan:
    """How long each part runs."""

    budget: Budget
    latency_s: float  # timed seconds of the batch-1 latency
    mm_sizes: tuple[int, ...]
    mm_runs: int
    memory_steps: int
    memory_seconds: float  # the memory run's steps stop after this long (when the step is slow)


FULL = Plan(Budget(seconds=3.0, repeats=3, warmup=3), 1.0, (512, 1024, 2048), 5, 100, 30.0)
QUICK = Plan(Budget(seconds=0.6, repeats=3, warmup=2), 0.3, (1024,), 2, 20, 8.0)


def log(message: str) -> None:
    """Progress on stderr, so a long run is not silent and stdout stays the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def section(message: str, wait_quiet: float) -> None:
    """Log the next part; first wait for a quiet machine if asked to."""
    waited = wait_for_quiet(wait_quiet) if wait_quiet > 0 else 0.0
    log(message + (f" (waited {waited:.0f} s for other processes to go idle)" if waited >= 3 else ""))


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def environment(threads: int) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU model and features, commit, load."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    flags = set(lines.get("flags\t\t", "").split())
    return {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "gmlp_vision": getattr(gmlp_vision, "__version__", "?"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "requested_threads": threads,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "src_dirty": bool(_git("status", "--porcelain", "--", "../src")),
        "load_avg_start": os.getloadavg()[0],
    }


def measure_memory(plan: Plan, threads: int, full: bool) -> dict[str, Any]:
    """Run ``bench_memory.py`` in a fresh process and parse its JSON line."""
    cmd = [sys.executable, str(HERE / "bench_memory.py"), "--steps", str(plan.memory_steps), "--max-seconds",
           str(plan.memory_seconds), "--threads", str(threads)]  # fmt: skip
    proc = subprocess.run(cmd + (["--full"] if full else []), capture_output=True, text=True, timeout=900)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quick_help = "short timings, eager modes only unless --modes says otherwise: a smoke run of a minute or two"
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--no-peers", action="store_true", help="skip timm and g-mlp-pytorch")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it starts (default: keep freed memory, as gmlp train does)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for everything (default 2)")
    parser.add_argument("--modes", default=None,
                        help=f"comma list of {','.join(MODES)} (default: all; --quick: fp32,bf16)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement (default 3)")
    full_help = "peak RSS from one whole epoch of gmlp_vision.train.train (adds two minutes or more)"
    parser.add_argument("--memory-full", action="store_true", help=full_help)
    quiet_help = "before each measured part, wait up to this many seconds for other processes to go idle (default 0)"
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS", help=quiet_help)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "latest.json", help="where to write results")
    args = parser.parse_args(argv)
    modes = args.modes.split(",") if args.modes else (["fp32", "bf16"] if args.quick else list(MODES))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    args.modes = modes
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every measurement, print the report, write the JSON."""
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seconds:
        plan = replace(plan, budget=replace(plan.budget, seconds=args.seconds))
    budget = plan.budget
    torch.set_num_threads(args.threads)
    # As `gmlp train` runs (`cpu.use_cpu_threads`); process-wide, so the peers' rows get it too.
    malloc_reuse = keep_freed_memory() if not args.default_malloc else False
    started = time.perf_counter()
    results: dict[str, Any] = {"env": environment(args.threads), "args": {**vars(args), "json": str(args.json)}}
    results["env"]["malloc_keeps_freed_memory"] = malloc_reuse
    results["budget"] = {"seconds": budget.seconds, "repeats": budget.repeats, "warmup": budget.warmup,
                         "batch": BATCH, "infer_batch": INFER_BATCH}  # fmt: skip

    section("matmul peak", args.wait_quiet)
    results["matmul_gflops"] = {name: matmul_peak(plan.mm_sizes, dtype, plan.mm_runs)
                                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}  # fmt: skip
    results["ours_params"] = sum(p.numel() for p in new_model(seed_config("fp32", False, args.threads)).parameters())

    results["peers"] = {} if args.no_peers else {name: probe(name) for name in PEERS}
    for name, info in results["peers"].items():
        log(f"peer {name}: " + (f"skipped: {info['error']}" if "error" in info else f"{info['params']:,} parameters"))
    results["ours"] = {}
    # Ours and the peers one mode at a time, so each ratio compares numbers taken minutes apart at most.
    for mode in args.modes:
        section(f"ours {mode}", args.wait_quiet)
        r = results["ours"][mode] = bench_mode(*MODES[mode], args.threads, budget, plan.latency_s)
        log(f"  -> {r['error']}" if "error" in r else f"  -> train {r['train']['mean']:,.0f} img/s")
        for name, info in results["peers"].items():
            if "error" in info or mode not in PEER_MODES:
                continue
            section(f"peer {name} {mode}", args.wait_quiet)
            r = info.setdefault("modes", {})[mode] = bench_peer_mode(name, *MODES[mode], budget)
            log(f"  -> {r['error']}" if "error" in r else f"  -> train {r['train']['mean']:,.0f} img/s")

    section("augmentation + gathering alone", args.wait_quiet)
    results["augment"] = bench_augment(budget)
    length = "one epoch" if args.memory_full else "short"
    section(f"peak RSS of a training run ({length}, in a subprocess)", args.wait_quiet)
    results["memory"] = measure_memory(plan, args.threads, args.memory_full)

    results["env"]["load_avg_end"] = os.getloadavg()[0]
    results["env"]["wall_s"] = time.perf_counter() - started
    results["summary"] = summarize(results)
    print(render(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
