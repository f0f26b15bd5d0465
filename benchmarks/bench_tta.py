"""Time to accuracy on real CIFAR-10 on this CPU (issue #7): training seconds to reach 70 / 80 / 85 / 90 % test top-1.

Trains with the library's own `gmlp_vision.train.train` (the CLI's code, nothing copied) on all 50,000 training images
(``--val-split 0``) and, after every epoch, evaluates the 10,000 test images with the model and, with ``--ema``, with
its weight average. The clock starts before the dataset is loaded and runs through every epoch, data loading and
``--compile`` included; only these extra test evaluations are taken out of it. An accuracy counts when either the
model or its weight average reaches it (both are saved by the run: last.pt and ema.pt), or, with ``--tta flip`` or
``flip-shift``, the weight average under test-time augmentation (``gmlp evaluate --tta``; its evaluation time is
reported apart, not in the training seconds). Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_tta.py                          # the cifar10-fast preset, ~15 minutes
    .venv/bin/python benchmarks/bench_tta.py --tta flip-shift         # and its test-time augmented accuracy
    .venv/bin/python benchmarks/bench_tta.py --preset seed --epochs 12 --precision bf16
    .venv/bin/python benchmarks/bench_tta.py --preset cifar10-fast --epochs 4   # any training flag works

Any ``gmlp train`` flag may be added; ``--dataset``, ``--val-split`` and the test evaluation are fixed here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from gmlp_vision.callbacks import Callback
from gmlp_vision.cli.flags import add_config_arguments, config_from_args
from gmlp_vision.data import Dataset, load_dataset
from gmlp_vision.evaluate import TTA_MODES, evaluate
from gmlp_vision.train import train

THRESHOLDS = (0.70, 0.80, 0.85, 0.90)
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-python.tar.gz"


class TestEachEpoch(Callback):
    """After each epoch: the test accuracy of the weights (and of their average), and the training seconds so far.

    The time this benchmark spends on its own test evaluations is left out of the seconds. With ``tta``, the test
    accuracy of the better of the two (the weight average when there is one) under test-time augmentation too, and
    how long that evaluation took (``tta_eval_seconds``: not in ``seconds``, since it is not training; a user pays it
    once, at the end).
    """

    def __init__(self, ds: Dataset, tta: str, t0: float, rows: list[dict[str, float]]) -> None:
        self.ds, self.tta, self.t0, self.rows, self.excluded = ds, tta, t0, rows, 0.0

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        run, row = self.run, logs or {}
        precision = run.cfg.run.precision  # what auto chose
        t = time.perf_counter()
        seconds = t - self.t0 - self.excluded
        images, labels = self.ds.test.images, self.ds.test.labels
        test = evaluate(run.model, images, labels, precision=precision)
        entry = {"epoch": row["epoch"], "seconds": seconds, "train_loss": row["loss"], "test_acc": test["acc"]}
        if run.averaged is not None:
            entry["test_ema_acc"] = evaluate(run.averaged, images, labels, precision=precision)["acc"]
        text = f"test {100 * test['acc']:.2f} %"
        text += f"  ema {100 * entry['test_ema_acc']:.2f} %" if run.averaged is not None else ""
        if self.tta != "none":
            t_tta = time.perf_counter()
            model = run.averaged if run.averaged is not None else run.model
            entry["test_tta_acc"] = evaluate(model, images, labels, precision=precision, tta=self.tta)["acc"]
            entry["tta_eval_seconds"] = time.perf_counter() - t_tta
            text += f"  tta {100 * entry['test_tta_acc']:.2f} % ({entry['tta_eval_seconds']:.1f} s)"
        self.rows.append(entry)
        print(f"epoch {int(row['epoch']):3d}  {seconds:7.1f} s  train loss {row['loss']:.4f}  {text}", flush=True)
        self.excluded += time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--budget", type=float, default=900.0, help="seconds the record counts within (default 900)")
    parser.add_argument("--json", default="benchmarks/results/tta.json", help="where the JSON goes")
    parser.add_argument("--tta", choices=TTA_MODES, default="none", help="also test with test-time augmentation")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    args.preset = getattr(args, "preset", "cifar10-fast")
    args.data = getattr(args, "data", str(DEFAULT_DATA))
    if not Path(args.data).exists():
        print(f"bench_tta: no CIFAR-10 archive at {args.data} (pass --data)", file=sys.stderr)
        return 2
    args.out = getattr(args, "out", None) or tempfile.mkdtemp(prefix="tta-")
    args.dataset, args.val_split, args.progress, args.download = "cifar10", 0.0, False, False
    cfg = config_from_args(args)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    threads = torch.get_num_threads()
    print(f"preset {cfg.preset}, {cfg.optim.epochs} epochs, precision {cfg.run.precision}, threads {threads}, "
          f"run dir {cfg.run.out}", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    ds = load_dataset("cifar10", cfg.data.data, download=False, progress=False, image_size=cfg.model.image_size)

    rows: list[dict[str, float]] = []
    run = train(cfg, ds, callbacks=[TestEachEpoch(ds, args.tta, t0, rows)])
    used = json.loads((run.run_dir / "config.json").read_text())["run"]["precision"]  # what auto chose
    best = lambda r: max(r["test_acc"], r.get("test_ema_acc", 0.0), r.get("test_tta_acc", 0.0))  # noqa: E731
    reached = {f"{round(100 * a)}%": next((r["seconds"] for r in rows if best(r) >= a), None) for a in THRESHOLDS}
    within = [r for r in rows if r["seconds"] <= args.budget]
    result = {
        "preset": cfg.preset,
        "config": cfg.to_dict(),
        "precision": used,
        "tta": args.tta,
        "threads": torch.get_num_threads(),
        "epochs": rows,
        "seconds_to": reached,
        "final": {
            "seconds": rows[-1]["seconds"],
            "test_acc": rows[-1]["test_acc"],
            "test_ema_acc": rows[-1].get("test_ema_acc"),
            "test_tta_acc": rows[-1].get("test_tta_acc"),
        },  # fmt: skip
        "best_within_budget": max((best(r) for r in within), default=None),
        "budget_seconds": args.budget,
    }
    print("\n| test top-1 | seconds of training |\n|---|---|")
    for name, seconds in reached.items():
        print(f"| {name} | {'not reached' if seconds is None else f'{seconds:.0f}'} |")
    final = result["final"]
    ema_text = f", weight average {100 * final['test_ema_acc']:.2f} %" if final["test_ema_acc"] is not None else ""
    tta_text = f", {args.tta} {100 * final['test_tta_acc']:.2f} %" if final["test_tta_acc"] is not None else ""
    print(f"final after {final['seconds']:.0f} s: test top-1 {100 * final['test_acc']:.2f} %{ema_text}{tta_text}")
    if result["best_within_budget"] is not None:
        print(f"best within {args.budget:.0f} s: {100 * result['best_within_budget']:.2f} %")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
