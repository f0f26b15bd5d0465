"""The GPU benchmark (issue 15): our training step, captured as CUDA graphs, beside timm and g-mlp-pytorch in one run.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json [--cifar PATH] [--budget SECONDS]
    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json --report   # issue 15's targets in a results file

Sections, in priority order so that a short call on a lent GPU gets the important ones first (a section is skipped
once the budget is spent; a mode that fails records its error and the run goes on):

- ``epoch``: whole `seed` epochs through `train()` on 50,000 generated CIFAR-sized images (45,000 train, 5,000
  validation), timed from one epoch's end to the next (epochs 2 and 3): eager fp32 against the captured modes.
- ``steps-128``, ``steps-1024``: train img/s on random data resident on the GPU at batch 128 and 1024. Ours runs
  each mode's step (eager, or captured) with the CLI's flip + zoom + dropout, and without augmentation (dropout kept);
  timm and g-mlp-pytorch a plain AdamW loop without augmentation, in fp32, bf16 (autocast) and bf16 compiled.
- ``accuracy``: `seed` for 5 epochs on a real CIFAR-10 subset (``--cifar``, e.g. 10,000 training images): eager fp32
  against the fastest mode.
- ``gmlp-s``: the paper's gMLP-S at 224 px, bf16, batch 128, no augmentation, against timm's ``gmlp_s16_224``
  compiled, with the fraction of the bf16 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_peers import PEERS
from torch import Tensor, nn

from gmlp_vision.batches import Batch, BatchSource
from gmlp_vision.callbacks import Callback
from gmlp_vision.config import from_preset
from gmlp_vision.data import Dataset, Split
from gmlp_vision.distributed import maybe_compile
from gmlp_vision.graphs import GraphStep
from gmlp_vision.model import GMLP, flops_per_image
from gmlp_vision.optim import build_optimizer
from gmlp_vision.reporting import default_callbacks
from gmlp_vision.step import train_step
from gmlp_vision.train import train


@dataclass(frozen=True)
class Scale:
    """How big each section is: the real run, or a smoke run that checks the script on a CPU in seconds."""

    epoch_images: int  # generated training + validation images for the epoch timings
    batches: tuple[int, ...]  # the step section's batch sizes
    s_batch: int  # gMLP-S batch
    s_size: int  # gMLP-S input size
    compile: bool = True  # also the compiled modes (the smoke run leaves them out: they take a minute on a CPU)


MODES = {  # name -> (precision, compile, CUDA graphs)
    "fp32 eager": ("fp32", False, False),
    "fp32 graphs": ("fp32", False, True),
    "bf16 graphs": ("bf16", False, True),
    "bf16 compile+graphs": ("bf16", True, True),
}
PEER_MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16 compile": ("bf16", True)}
FULL = Scale(50_000, (128, 1024), 128, 224)
SMOKE = Scale(600, (32,), 2, 32, compile=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def attempt(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or the error it raised (first line, plus the traceback's last lines in the log)."""
    try:
        return fn()
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}


def rate(step: Callable[[], object], items: int, seconds: float, device: torch.device, warmup: int = 3) -> float:
    """Items per second of ``step`` over at least ``seconds`` (after ``warmup`` untimed calls), device synced."""
    for _ in range(warmup):
        step()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        step()
        calls += 1
        if calls % 10 == 0:
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return calls * items / elapsed


def matmul_tflops(dtype: torch.dtype, device: torch.device, runs: int = 10) -> float:
    """The device's matrix-product rate on random data (the ceiling the fractions below are taken of)."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(runs):
        a @ b
    sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - t0) / 1e12


def generated(n_train: int, n_test: int, classes: int, size: int = 32) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        return Split(images, torch.randint(0, classes, (n,), generator=g))

    return Dataset("cifar100", split(n_train), split(n_test), tuple(f"c{k}" for k in range(classes)))


@dataclass
class Run:
    """One benchmark run: where, how big, how long each throughput is timed, and the time left."""

    device: torch.device
    scale: Scale
    seconds: float
    end: float
    out_dir: Path

    def left(self) -> float:
        return self.end - time.perf_counter()

    def modes(self, table: dict[str, tuple] = MODES) -> list[str]:
        """The modes of ``table`` this run measures (the compiled ones only at full scale)."""
        return [name for name, mode in table.items() if self.scale.compile or not mode[1]]

    def rate(self, step: Callable[[], object], items: int) -> float:
        return rate(step, items, self.seconds, self.device)


class EpochClock(Callback):
    """The time at the end of each epoch (a `callbacks.Callback`)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.ends.append(time.perf_counter())


def timed_epochs(run: Run, ds: Dataset, name: str) -> dict[str, Any]:
    precision, compiled, graphs = MODES[name]
    cfg = from_preset(
        "seed",
        precision=precision,
        compile=compiled,
        cuda_graphs=graphs,
        epochs=3,
        progress=False,
        device=run.device.type,
        out=str(run.out_dir / name.replace(" ", "-")),
    )
    clock = EpochClock()
    history = train(cfg, ds, callbacks=[clock]).history
    epoch_s = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    return {"epoch_s": epoch_s, "row_s": [r["seconds"] for r in history]}


def bench_epochs(run: Run) -> dict[str, Any]:
    """`seed` epochs 2 and 3 through `train()` per mode, from one epoch's end to the next, and the row's seconds."""
    ds = generated(run.scale.epoch_images, 1_000, 100)
    results = {}
    for name in run.modes():
        torch._dynamo.reset()
        results[name] = attempt(partial(timed_epochs, run, ds, name))
        log(f"epoch {name}: {results[name]}")
    return results


def seed_step(run: Run, batch: int, mode: str, augment: bool) -> Callable[[], object]:
    """One of our training steps on random resident data (the CLI's step, captured or eager)."""
    precision, compiled, graphs = MODES[mode]
    aug = {} if augment else dict(flip=False, zoom=0.0)
    cfg = from_preset("seed", num_classes=100, precision=precision, compile=compiled, batch_size=batch, **aug)
    torch.manual_seed(0)
    net = GMLP(cfg.model).to(run.device)
    net.set_normalization(torch.full((3,), 127.5), torch.full((3,), 255.0**2 / 12))
    optimizer = build_optimizer(cfg.optim, net)
    model = maybe_compile(net, compiled)
    n = 8 * batch
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=run.device)
    labels = torch.randint(0, 100, (n,), device=run.device)
    generator = torch.Generator(run.device).manual_seed(0)
    return _stepper(run, model, net, optimizer, cfg, generator, images, labels, graphs)


def _stepper(
    run: Run,
    model: nn.Module,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Any,
    generator: torch.Generator,
    images: Tensor,
    labels: Tensor,
    graphs: bool,
) -> Callable[[], object]:
    """Steps over the resident ``images`` in batches of the config's size, captured (``graphs``) or eager."""
    batch = cfg.optim.batch_size
    batches = torch.randperm(len(labels), device=run.device).split(batch)[: len(labels) // batch]
    counter = iter(range(1 << 62))
    if graphs:
        source = BatchSource(images, labels, cfg.optim.batch_size)
        step = GraphStep(model, net, optimizer, cfg, generator, source, capture=run.device.type == "cuda")
        return lambda: step.step(Batch(0, batches[next(counter) % len(batches)], 1.0 / batch))

    def eager() -> object:
        idx = batches[next(counter) % len(batches)]
        return train_step(model, optimizer, images[idx], labels[idx], cfg, generator)

    return eager


def peer_step(run: Run, name: str, batch: int, mode: str) -> Callable[[], object]:
    """A peer's plain training step (AdamW, no augmentation) on random resident data."""
    precision, compiled = PEER_MODES[mode]
    torch.manual_seed(0)
    model = PEERS[name][0]().to(run.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    return _plain_step(run, torch.compile(model) if compiled else model, optimizer, batch, 32, 100, precision)


def _plain_step(
    run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, batch: int, size: int, classes: int, precision: str
) -> Callable[[], object]:
    """A plain training step (AdamW, cross-entropy, bf16 autocast or fp32) on one random resident batch."""
    x = torch.randn(batch, 3, size, size, device=run.device)
    y = torch.randint(0, classes, (batch,), device=run.device)

    def step() -> None:
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _measure(run: Run, make: Callable[[], Callable[[], object]], items: int) -> dict[str, Any]:
    torch._dynamo.reset()
    return {"img_s": run.rate(make(), items)}


def bench_steps(run: Run, batch: int) -> dict[str, Any]:
    """Train img/s at one batch size: ours per mode with and without augmentation, then the peers per mode."""
    rows: dict[str, Any] = {}
    # The peers and our eager modes first: a capture that fails can leave CUDA's random state unusable for the rest.
    jobs = [(f"{peer} {m}", partial(peer_step, run, peer, batch, m)) for peer in PEERS for m in run.modes(PEER_MODES)]
    jobs += [
        (f"ours {'CLI step' if aug else 'no aug'} {mode}", partial(seed_step, run, batch, mode, aug))
        for mode in run.modes()
        for aug in (False, True)
    ]
    for label, make in jobs:
        if run.left() < 30:
            rows.setdefault("skipped", []).append(label)
            continue
        rows[label] = attempt(partial(_measure, run, make, batch))
        log(f"batch {batch} {label}: {rows[label]}")
    return rows


def bench_accuracy(run: Run, cifar: Path, seeds: tuple[int, ...]) -> dict[str, Any]:
    """`seed`, 5 epochs on the CIFAR-10 subset, per seed: test top-1 of eager fp32 and of the captured modes."""
    results: dict[str, Any] = {}
    for name in ("fp32 eager", "bf16 compile+graphs", "bf16 graphs", "fp32 graphs"):
        precision, compiled, graphs = MODES[name]
        rows = {}
        for seed in seeds:
            if run.left() < 30:
                break
            cfg = from_preset("seed", dataset="cifar10", data=str(cifar), precision=precision, compile=compiled,
                              cuda_graphs=graphs, epochs=5, progress=False, device=run.device.type, seed=seed,
                              out=str(run.out_dir / f"acc-{name.replace(' ', '-')}-{seed}"))  # fmt: skip
            torch._dynamo.reset()
            rows[str(seed)] = attempt(partial(_accuracy, cfg, time.perf_counter()))
            log(f"accuracy {name} seed {seed}: {rows[str(seed)]}")
        tops = [r["test"]["acc"] for r in rows.values() if "test" in r]
        results[name] = {"runs": rows, "mean_top1": sum(tops) / len(tops) if tops else None}
    return results


def _accuracy(cfg: Any, t0: float) -> dict[str, Any]:
    result = train(cfg, callbacks=default_callbacks(cfg))  # as `gmlp train`: the plots are part of its time
    return {"test": result.test, "val_acc": [r["val_acc"] for r in result.history], "seconds": time.perf_counter() - t0}


def _gmlp_s_config(run: Run, compiled: bool) -> Any:
    no_aug = dict(crop="none", flip=False, mixup=0.0, cutmix=0.0, policy="none", erase=0.0)
    return from_preset(
        "gmlp-s",
        num_classes=1000,
        precision="bf16",
        batch_size=run.scale.s_batch,
        image_size=run.scale.s_size,
        compile=compiled,
        **no_aug,
    )


def ours_gmlp_s(run: Run, compiled: bool, graphs: bool) -> Callable[[], object]:
    cfg = _gmlp_s_config(run, compiled)
    torch.manual_seed(0)
    net = GMLP(cfg.model).to(run.device)
    optimizer = build_optimizer(cfg.optim, net)
    n, size = 4 * cfg.optim.batch_size, cfg.model.image_size
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=run.device)
    labels = torch.randint(0, 1000, (n,), device=run.device)
    generator = torch.Generator(run.device).manual_seed(0)
    return _stepper(run, maybe_compile(net, compiled), net, optimizer, cfg, generator, images, labels, graphs)


def timm_gmlp_s(run: Run) -> Callable[[], object]:
    import timm

    torch.manual_seed(0)
    size = run.scale.s_size
    model = timm.create_model("gmlp_s16_224", num_classes=1000, img_size=size).to(run.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    return _plain_step(run, torch.compile(model), optimizer, run.scale.s_batch, size, 1000, "bf16")


def bench_gmlp_s(run: Run, bf16_tflops: float) -> dict[str, Any]:
    """gMLP-S, 224 px, bf16, batch 128, no augmentation: ours (compiled, captured or not) against timm compiled."""
    per_image = 3 * flops_per_image(_gmlp_s_config(run, False).model)
    results: dict[str, Any] = {"train_gflop_per_image": per_image / 1e9}
    jobs = {
        "ours compile+graphs": partial(ours_gmlp_s, run, True, True),
        "timm gmlp_s16_224 compile": partial(timm_gmlp_s, run),
        "ours compile": partial(ours_gmlp_s, run, True, False),
        "ours eager": partial(ours_gmlp_s, run, False, False),
    }
    for label, make in jobs.items():
        if run.left() < 60:
            results.setdefault("skipped", []).append(label)
            continue
        row = attempt(partial(_measure, run, make, run.scale.s_batch))
        if "img_s" in row:
            row["fraction_of_bf16_matmul"] = row["img_s"] * per_image / (bf16_tflops * 1e12)
        results[label] = row
        log(f"gmlp-s {label}: {row}")
    return results


def targets(results: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """Issue 15's GPU targets in ``results``: (what, value, goal, met) for each that was measured."""

    def best(rows: dict[str, Any], prefix: str) -> float:
        return max((r["img_s"] for k, r in rows.items() if k.startswith(prefix) and "img_s" in r), default=0.0)

    out = []
    epochs = {k: min(v["epoch_s"]) for k, v in results.get("epoch", {}).items() if v.get("epoch_s")}
    if epochs:
        mode = min(epochs, key=epochs.__getitem__)
        out.append((f"seed epoch through train(), s ({mode})", epochs[mode], "<= 0.6", epochs[mode] <= 0.6))
    for key in (k for k in results if k.startswith("steps-")):
        rows = results[key]
        peers = max(best(rows, peer) for peer in PEERS)
        if peers:
            ratio = best(rows, "ours") / peers
            out.append((f"batch {key[6:]}: our best mode / the best peer's", ratio, ">= 1.3", ratio >= 1.3))
    s = results.get("gmlp-s", {})
    if "img_s" in s.get("ours compile+graphs", {}) and "img_s" in s.get("timm gmlp_s16_224 compile", {}):
        ratio = s["ours compile+graphs"]["img_s"] / s["timm gmlp_s16_224 compile"]["img_s"]
        out.append(("gMLP-S 224 px bf16: ours / timm compiled", ratio, ">= 1.5", ratio >= 1.5))
    acc = results.get("accuracy", {})
    base, fast = (acc.get(k, {}).get("mean_top1") for k in ("fp32 eager", "bf16 compile+graphs"))
    if base is not None and fast is not None:
        gap = 100 * abs(fast - base)
        out.append(("seed 5 epochs: |fastest - fp32| top-1, points", gap, "<= 1", gap <= 1.0))
    return out


def report(results: dict[str, Any]) -> None:
    for what, value, goal, met in targets(results):
        print(f"{what:55s} {value:8.3f}  goal {goal:7s} {'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where the JSON results go")
    p.add_argument("--cifar", type=Path, help="a CIFAR-10 archive for the accuracy section (skipped without)")
    p.add_argument("--budget", type=float, default=900.0, help="seconds for the whole run (default: 900)")
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per throughput (default: 1.5)")
    p.add_argument(
        "--sections",
        default="epoch,steps-128,accuracy,steps-1024,gmlp-s",
        help="comma-separated, run in this order (smoke: steps-32)",
    )
    p.add_argument("--seeds", default="0,1,2", help="the accuracy section's seeds (default: 0,1,2)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks that the script runs")
    p.add_argument("--report", action="store_true", help="print the targets of an existing --out file and exit")
    args = p.parse_args(argv)
    if args.report:
        report(json.loads(args.out.read_text()))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        p.error("needs a CUDA device (or --smoke)")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "bf16_matmul_tflops": matmul_tflops(torch.bfloat16, device),
    }
    log(f"{results['device']}, torch {results['torch']}, bf16 matmul {results['bf16_matmul_tflops']:.1f} TFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(device, SMOKE if args.smoke else FULL, args.seconds, time.perf_counter() + args.budget, Path(tmp))
        sections = {
            "epoch": partial(bench_epochs, run),
            **{f"steps-{b}": partial(bench_steps, run, b) for b in run.scale.batches},
            "accuracy": partial(bench_accuracy, run, args.cifar, tuple(map(int, args.seeds.split(",")))),
            "gmlp-s": partial(bench_gmlp_s, run, results["bf16_matmul_tflops"]),
        }
        for section in args.sections.split(","):
            if section not in sections:
                p.error(f"no section {section!r}; there are {', '.join(sections)}")
            if run.left() < 45 or (section == "accuracy" and args.cifar is None):
                results.setdefault("skipped", []).append(section)
                continue
            log(f"section {section} ({run.left():.0f} s left)")
            results[section] = sections[section]()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    log(f"wrote {args.out}")
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
