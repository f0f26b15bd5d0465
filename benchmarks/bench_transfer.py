"""Transfer on 2 CPU cores: does starting from pretrained weights beat training from scratch on 500 images?

CIFAR-10 (``../shared/data``) is cut in two. The ``general`` preset's gMLP is pretrained on the first five classes
(airplane, automobile, bird, cat, deer: 25,000 images), once: the run is cached under ``--cache`` and reused while
its settings stay the same. Then three arms train on 500 images of the other five classes (dog, frog, horse, ship,
truck: the first 100 of each in the training set), each with the same number of epochs, and are measured on those
classes' 5,000 test images:

- ``finetune``: ``--init`` the pretrained weights (the finetune recipe: cosine after a warm-up epoch, layer-wise lr
  decay; a new head, since the class names differ);
- ``scratch``: the same model and images from random weights, with the preset's own recipe;
- ``gray``: the finetune arm on the same images written as grayscale PNG class folders, trained by one command,
  ``gmlp train --dataset folder --in-chans 1 --init ...`` (the patch kernel is summed over RGB).

``--diagnose`` asks why the gain is what it is, with three more measurements on the same images:

- ``probe``: a linear classifier (L-BFGS, weight decay) on the frozen pooled features of the pretrained model, and the
  same on a randomly initialised one: what the pretrained features carry before any fine-tuning;
- ``ceiling``: the model trained from scratch on all 25,000 training images of the target classes, as long as the
  pretraining (cached likewise): the accuracy that 500 images cannot exceed however good the start;
- ``source``: the pretrained model's own test accuracy on its five classes (from its run).

The gain that 500 images could show at most is ``ceiling - scratch``; the fraction of it reached says whether the
transfer or the headroom is short.

Each arm's training seconds are reported (the test evaluation at the end is not counted, except in the gray arm, a
whole command that also decodes its PNGs); every arm must finish within
``--budget`` seconds, the same for all. The shipped weights are measured (with ``--ema``, the run picks the better of
the final weights and their average on nothing: these runs hold no validation images, so the average ships).

    .venv/bin/python benchmarks/bench_transfer.py                    # ~10 minutes on 2 cores, pretraining included
    .venv/bin/python benchmarks/bench_transfer.py --pretrain-epochs 1 --epochs 2 --images-per-class 10   # smoke

Writes ``--json`` (default ``benchmarks/results/transfer.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gmlp_vision.checkpoint import load_model, resolve_checkpoint
from gmlp_vision.config import resolve_config
from gmlp_vision.cpu import cpu_threads
from gmlp_vision.data import Dataset, Split, load_dataset
from gmlp_vision.evaluate import evaluate
from gmlp_vision.model import GMLP
from gmlp_vision.train import train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz"
FIRST, SECOND = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)  # pretraining classes, target classes


def classes_of(split: Split, keep: tuple[int, ...], per_class: int | None = None) -> Split:
    """The images of classes ``keep`` (the first ``per_class`` of each), labels renumbered 0.. in that order."""
    picked = []
    for new, old in enumerate(keep):
        where = (split.labels == old).nonzero().flatten()
        picked += [(int(i), new) for i in where[:per_class]]
    picked.sort()
    index = torch.tensor([i for i, _ in picked])
    return Split(split.images[index], torch.tensor([label for _, label in picked]))


def part(ds: Dataset, keep: tuple[int, ...], per_class: int | None) -> Dataset:
    """``ds`` cut to classes ``keep``: ``per_class`` training images of each, every test image of each."""
    names = tuple(ds.classes[k] for k in keep)
    return Dataset("cifar10", classes_of(ds.train, keep, per_class), classes_of(ds.test, keep), names)


def pretrained(ds: Dataset, args: argparse.Namespace, name: str = "pretrain") -> tuple[Path, float, bool]:
    """The pretraining run's shipped checkpoint (cached), its training seconds, and whether it came from the cache.

    ``name="ceiling"`` is the same run on every training image of the target classes instead.
    """
    given = {"epochs": args.pretrain_epochs, "progress": False, "threads": args.threads, "val_split": 0.1}
    code = _git("rev-parse", "HEAD:src")  # the package's source as committed: another one pretrains anew
    key = hashlib.sha256(json.dumps([given, args.preset, str(args.data), code], sort_keys=True).encode()).hexdigest()
    key = key[:12]
    run = Path(args.cache) / f"{name}-{key}"
    if (run / "results.json").is_file():
        return resolve_checkpoint(run), json.loads((run / "bench.json").read_text())["seconds"], True
    t0 = time.perf_counter()
    data = part(ds, FIRST, None) if name == "pretrain" else part(ds, SECOND, None)
    train(resolve_config({**given, "out": str(run)}, preset=args.preset), data)
    seconds = time.perf_counter() - t0
    (run / "bench.json").write_text(json.dumps({"seconds": seconds}))
    return resolve_checkpoint(run), seconds, False


def arm(name: str, target: Dataset, args: argparse.Namespace, init: Path | None) -> dict[str, Any]:
    """One arm trained in the library: its training seconds and the shipped weights' test accuracy."""
    given = {"epochs": args.epochs, "progress": False, "threads": args.threads, "val_split": 0.0}
    given["out"] = str(Path(args.cache) / f"{name}-{int(time.time())}")
    if init is not None:
        given["init"] = str(init)
    cfg = resolve_config(given, preset=args.preset)
    t0 = time.perf_counter()
    result = train(cfg, target)
    seconds = time.perf_counter() - t0
    model, ckpt = load_model(result.run_dir / result.final_checkpoint)
    test = evaluate(model, target.test.images, target.test.labels, precision=ckpt.config.run.precision)  # auto's
    return {"arm": name, "seconds": seconds, "acc": test["acc"], "shipped": result.final_checkpoint,
            "lr": cfg.optim.lr, "schedule": cfg.optim.schedule, "layer_decay": cfg.optim.layer_decay}  # fmt: skip


@torch.no_grad()
def features(model: GMLP, images: torch.Tensor) -> torch.Tensor:
    """The pooled features (before the head) of ``images``, in fp32, 500 at a time."""
    model.eval()
    return torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x in images.split(500)])


def probe(model: GMLP, target: Dataset, weight_decay: float = 1e-3) -> float:
    """Test accuracy of a linear classifier trained on ``model``'s frozen features of ``target``'s training images."""
    train_x, test_x = features(model, target.train.images), features(model, target.test.images)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    head = torch.nn.Linear(train_x.shape[1], len(target.classes))
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(train_x), target.train.labels)
        loss = loss + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (head(test_x).argmax(1) == target.test.labels).float().mean().item()


def diagnose(ds: Dataset, target: Dataset, args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    """Why the gain is what it is: linear probes, the full-data ceiling and the source model's own accuracy."""
    model, ckpt = load_model(checkpoint)
    torch.manual_seed(0)
    random = GMLP(ckpt.config.model)
    random.load_state_dict({**random.state_dict(), "pixel_mean": model.pixel_mean, "pixel_std": model.pixel_std})
    ceiling_checkpoint, ceiling_seconds, cached = pretrained(ds, args, "ceiling")
    ceiling_model, _ = load_model(ceiling_checkpoint)
    ceiling = evaluate(ceiling_model, target.test.images, target.test.labels)["acc"]
    source = part(ds, FIRST, None).test
    return {"probe_pretrained": probe(model, target), "probe_random": probe(random, target),
            "ceiling": ceiling, "ceiling_seconds": ceiling_seconds, "ceiling_cached": cached,
            "ceiling_images": 5 * 5000, "source": evaluate(model, source.images, source.labels)["acc"]}  # fmt: skip


def write_gray(target: Dataset, root: Path) -> None:
    """``target`` as grayscale PNG class folders: ``train/CLASS/*.png`` and ``test/CLASS/*.png``."""
    for split_name, split in (("train", target.train), ("test", target.test)):
        for i, (image, label) in enumerate(zip(split.images, split.labels, strict=True)):
            folder = root / split_name / target.classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).convert("L").save(folder / f"{i:05d}.png")


def gray_arm(target: Dataset, args: argparse.Namespace, init: Path) -> dict[str, Any]:
    """The finetune arm on grayscale PNG folders, by one ``gmlp train`` command; its seconds and test accuracy."""
    root = Path(args.cache) / "gray-folder"
    if not (root / "test").is_dir():
        write_gray(target, root)
    out = Path(args.cache) / f"gray-{int(time.time())}"
    command = [sys.executable, "-m", "gmlp_vision", "train", "--preset", args.preset, "--dataset", "folder",
               "--data", str(root), "--in-chans", "1", "--init", str(init), "--epochs", str(args.epochs),
               "--val-split", "0", "--threads", str(args.threads), "--no-progress", "--out", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0  # the whole command: decoding the PNGs and the test evaluation included
    if proc.returncode:
        raise SystemExit(f"bench_transfer: the gray arm failed:\n{proc.stderr}")
    results = json.loads((out / "results.json").read_text())
    key = "test_ema" if results["final_checkpoint"] == "ema.pt" else "test"
    adapted = next((line for line in proc.stdout.splitlines() if line.startswith("initialised from")), "")
    return {"arm": "gray", "seconds": seconds, "acc": results[key]["acc"], "shipped": results["final_checkpoint"],
            "log": adapted}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 python archive")
    parser.add_argument("--preset", default="general", help="the model and recipe of every run (default: general)")
    parser.add_argument("--pretrain-epochs", type=int, default=6, help="epochs on the first five classes (default 6)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each arm on the 500 images (default 30)")
    parser.add_argument("--images-per-class", type=int, default=100, help="target training images per class")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds each arm must finish within")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: gmlp's choice)")
    parser.add_argument("--cache", default="benchmarks/results/transfer-cache", help="runs and the cached pretraining")
    parser.add_argument("--json", default="benchmarks/results/transfer.json", help="where the JSON goes")
    parser.add_argument("--no-gray", action="store_true", help="skip the grayscale folder arm")
    parser.add_argument("--diagnose", action="store_true", help="add linear probes and the full-data ceiling")
    args = parser.parse_args(argv)
    if not Path(args.data).is_file():
        print(f"bench_transfer: no CIFAR-10 archive at {args.data} (pass --data)", file=sys.stderr)
        return 2
    ds = load_dataset("cifar10", args.data, download=False, progress=False)
    checkpoint, pretrain_seconds, cached = pretrained(ds, args)
    target = part(ds, SECOND, args.images_per_class)
    rows = [arm("finetune", target, args, checkpoint), arm("scratch", target, args, None)]
    if not args.no_gray:
        rows.append(gray_arm(target, args, checkpoint))
    why = diagnose(ds, target, args, checkpoint) if args.diagnose else None
    over = [r["arm"] for r in rows if r["seconds"] > args.budget]
    threads = cpu_threads(args.threads).threads
    result = {"pretrain": {"checkpoint": str(checkpoint), "seconds": pretrain_seconds, "cached": cached,
                           "epochs": args.pretrain_epochs, "images": len(ds.train.labels) // 2},
              "arms": rows, "budget": args.budget, "epochs": args.epochs, "threads": threads,
              "train_images": len(target.train.labels), "test_images": len(target.test.labels),
              "cpu": _cpu(), "preset": args.preset, "commit": _git("rev-parse", "--short", "HEAD"),
              "src_dirty": bool(_git("status", "--porcelain", "--", "src"))}  # fmt: skip
    if why is not None:
        result["diagnosis"] = why
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    note = " (cached)" if cached else ""
    print(f"pretrained {args.pretrain_epochs} epochs on 25,000 images in {pretrain_seconds:.0f} s{note}")
    print(f"{len(target.train.labels)} training / {len(target.test.labels)} test images of 5 other classes, "
          f"{args.epochs} epochs per arm, budget {args.budget:.0f} s, {threads} threads")  # fmt: skip
    for r in rows:
        print(f"{r['arm']:9s} {100 * r['acc']:6.2f} %  {r['seconds']:6.1f} s  shipped {r['shipped']}")
    gain = 100 * (rows[0]["acc"] - rows[1]["acc"])
    print(f"finetune - scratch: {gain:+.2f} points (the issue's bar: +15)")
    if why is not None:
        headroom = 100 * (why["ceiling"] - rows[1]["acc"])
        print(f"source model on its own 5 classes: {100 * why['source']:.2f} %")
        print(f"linear probe on frozen features: pretrained {100 * why['probe_pretrained']:.2f} %, "
              f"random {100 * why['probe_random']:.2f} %")  # fmt: skip
        print(f"ceiling (scratch on all 25,000 target images, {args.pretrain_epochs} epochs): "
              f"{100 * why['ceiling']:.2f} %; headroom over scratch {headroom:+.2f} points, "
              f"of which fine-tuning reached {gain / headroom:.0%}" if headroom > 0 else "")  # fmt: skip
    if over:
        print(f"over the budget: {', '.join(over)}", file=sys.stderr)
        return 1
    return 0


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    return f"{model} ({' '.join(wanted)})"


if __name__ == "__main__":
    raise SystemExit(main())
