"""Which recipe to start from on your own images (issue 14): presets raced on CIFAR-10 written out as PNG class folders.

Writes a class-balanced subset of real CIFAR-10 as ``train/<class>/*.png`` (from the training batches) and
``val/<class>/*.png`` (from the test batch), then runs ``gmlp train --dataset folder`` on it once per ``--run``, as a
user would: each run is its own process, timed from start to exit (decoding, training, the final evaluation of
``val/`` and the report included). Prints the wall time and the ``val/`` top-1 of each run, and writes JSON.

    .venv/bin/python benchmarks/bench_folder.py                                   # the default races, ~15 minutes
    .venv/bin/python benchmarks/bench_folder.py --run "seed --epochs 12" --run "general --precision bf16"
    .venv/bin/python benchmarks/bench_folder.py --train-per-class 5000 --val-per-class 1000   # all of CIFAR-10

Each ``--run`` is a preset name followed by any ``gmlp train`` flags. The first run of a folder decodes it into the
data cache; ``--cache-dir`` (default: a temporary one, shared by the runs) keeps that cost the same for every run, so
one warm-up decode is done before the races.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_timing import cpu_model
from PIL import Image

from gmlp_vision.data import load_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-python.tar.gz"
DEFAULT_RUNS = ("general", "seed --epochs 28")  # seed gets at least as much time as general


def write_folder(root: Path, archive: Path, train_per_class: int, val_per_class: int) -> Path:
    """CIFAR-10's first ``train_per_class`` training and ``val_per_class`` test images of each class, as PNGs."""
    ds = load_dataset("cifar10", archive, download=False, progress=False)
    for split, data, per_class in (("train", ds.train, train_per_class), ("val", ds.test, val_per_class)):
        labels = data.labels.numpy()
        for c, name in enumerate(ds.classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
                Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(folder / f"{j:05d}.png")
    return root


def run_one(spec: str, folder: Path, out: Path, cache: Path, threads: int) -> dict[str, object]:
    """One ``gmlp train`` process on the folder: its wall time and final ``val/`` metrics."""
    preset, *flags = shlex.split(spec)
    argv = [sys.executable, "-m", "gmlp_vision", "train", "--dataset", "folder", "--data", str(folder),
            "--preset", preset, "--out", str(out), "--no-progress", "--threads", str(threads), *flags]  # fmt: skip
    env = {**os.environ, "GMLP_DATA": str(cache)}
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    row: dict[str, object] = {"run": spec, "seconds": round(seconds, 1), "epochs": results["epochs_run"]}
    row["val_top1"] = results["test"]["acc"]
    if results.get("test_ema"):
        row["val_top1_ema"] = results["test_ema"]["acc"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--run", action="append", help=f"PRESET [FLAGS]; repeatable (default: {list(DEFAULT_RUNS)})")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CIFAR-10 archive")
    parser.add_argument("--train-per-class", type=int, default=1000, help="training PNGs per class (default 1000)")
    parser.add_argument("--val-per-class", type=int, default=1000, help="val/ PNGs per class (default 1000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (default 2)")
    parser.add_argument("--work", type=Path, help="where the folder and the runs go (default: a temporary dir)")
    parser.add_argument("--json", default="benchmarks/results/folder.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        folder = work / "cifar10-png"
        if not (folder / "val").is_dir():
            write_folder(folder, args.data, args.train_per_class, args.val_per_class)
        cache = work / "cache"
        load_dataset("folder", folder, cache_dir=cache, progress=False)  # the one decode, untimed
        rows = []
        runs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))  # a fresh place each time the folder is reused
        for i, spec in enumerate(args.run or DEFAULT_RUNS):
            row = run_one(spec, folder, runs / f"run{i}", cache, args.threads)
            rows.append(row)
            ema = f"  (weight average {100 * row['val_top1_ema']:.2f} %)" if "val_top1_ema" in row else ""
            print(f"{spec:40s} {row['seconds']:7.1f} s  {row['epochs']:3d} epochs  val/ top-1 "
                  f"{100 * row['val_top1']:.2f} %{ema}", flush=True)  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    cpu = cpu_model()
    setup = {"train_per_class": args.train_per_class, "val_per_class": args.val_per_class, "threads": args.threads}
    Path(args.json).write_text(json.dumps({"cpu": cpu, **setup, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
