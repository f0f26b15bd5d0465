"""CPU inference of an exported model: PyTorch vs ONNX Runtime fp32 vs ONNX Runtime int8, on real test images.

For one checkpoint (or run directory) it exports ONNX and the int8 copy (`gmlp_vision.export`) into a temporary
folder, then measures on the dataset's test split, all on the same CPU threads:

- accuracy: top-1 of each engine, the int8 model's top-1 agreement with PyTorch, and the largest logit difference;
- latency: one image per call (median and p90 of per-call times after a warm-up);
- throughput: images per second at batch 256.

int8 results depend on the CPU's integer instructions (see `gmlp_vision.export`'s docstring), so the report names
the CPU, its int8-relevant flags, and the instruction set torch detects through cpuid. Under an emulator such as
QEMU's user mode (``qemu-x86_64 -cpu EPYC-Rome``: AVX2 without VNNI), cpuid is the emulated CPU's while
/proc/cpuinfo stays the host's; there the accuracy columns are what that CPU computes, the timings mean nothing, and
``--limit`` keeps the run short (the timing loops still take many minutes).

Usage (needs the onnx extra; never run in CI)::

    gmlp train --dataset cifar10 --data cifar-10-python.tar.gz --train-limit 10000 --epochs 2 --out /tmp/q
    .venv/bin/python benchmarks/bench_export.py /tmp/q --data cifar-10-python.tar.gz [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_timing import cpu_model

import gmlp_vision
from gmlp_vision import export
from gmlp_vision.checkpoint import load_checkpoint, resolve_checkpoint
from gmlp_vision.data import load_dataset

HERE = Path(__file__).resolve().parent


def per_call_ms(fn: Callable[[], Any], seconds: float) -> list[float]:
    """Per-call wall times (ms) of ``fn`` over about ``seconds``, after a short warm-up."""
    for _ in range(20):
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 20:
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def cpu_flags() -> list[str]:
    """The int8-relevant x86 flags /proc/cpuinfo lists (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return []
    return sorted(flags & {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint file or run directory")
    parser.add_argument("--data", help="dataset archive (default: the run's)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and onnxruntime (default 1)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per latency number")
    parser.add_argument("--limit", type=int, help="only the first N test images (default: all)")
    parser.add_argument("--json", default=str(HERE / "results" / "export.json"), help="where the JSON goes")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(path)
    model = ckpt.build_model("cpu")
    ds = load_dataset(ckpt.config.data.dataset, args.data or ckpt.config.data.data, download=False, progress=False)
    images, labels = ds.test.images[: args.limit].float(), ds.test.labels[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export.export_onnx(path, Path(tmp) / "model.onnx")
        int8 = export.quantize_onnx(fp32, Path(tmp) / "model.int8.onnx")
        sizes = {"onnx_fp32_mb": fp32.stat().st_size / 1e6, "onnx_int8_mb": int8.stat().st_size / 1e6}
        sessions = {"onnxruntime fp32": export.onnx_session(fp32, args.threads),
                    "onnxruntime int8": export.onnx_session(int8, args.threads)}  # fmt: skip

    with torch.inference_mode():
        engines: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"pytorch fp32": lambda x: model(x)}
        for name, session in sessions.items():
            engines[name] = lambda x, s=session: export.onnx_logits(s, x)
        logits = {name: torch.cat([fn(x) for x in images.split(500)]) for name, fn in engines.items()}
        ref = logits["pytorch fp32"]
        rows = []
        one, batch = images[:1].contiguous(), images[:256].contiguous()
        for name, fn in engines.items():
            lat = per_call_ms(lambda fn=fn: fn(one), args.seconds)
            bat = per_call_ms(lambda fn=fn: fn(batch), args.seconds)
            rows.append({
                "engine": name,
                "top1": (logits[name].argmax(1) == labels).float().mean().item(),
                "agree_with_pytorch": (logits[name].argmax(1) == ref.argmax(1)).float().mean().item(),
                "max_abs_logit_diff": (logits[name] - ref).abs().max().item(),
                "latency_ms_median": statistics.median(lat),
                "latency_ms_p90": statistics.quantiles(lat, n=10)[-1],
                "batch256_images_per_s": 256e3 / statistics.median(bat),
            })  # fmt: skip

    isa = torch.backends.cpu.get_cpu_capability()
    cpu = {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "torch_cpu_capability": isa}
    print(f"{ckpt.config.data.dataset} test split ({len(labels)} images), model {path}, {args.threads} thread(s)")
    print(f"CPU {cpu['cpu_model']}, flags {' '.join(cpu['cpu_flags']) or '?'}, torch detects {isa}")
    print(f"{'engine':18s} {'top-1':>7s} {'agree':>7s} {'max |dlogit|':>13s} {'1-image ms':>11s} {'p90':>6s} "
          f"{'img/s @256':>11s}")  # fmt: skip
    for r in rows:
        print(f"{r['engine']:18s} {100 * r['top1']:6.2f}% {100 * r['agree_with_pytorch']:6.2f}% "
              f"{r['max_abs_logit_diff']:13.3g} {r['latency_ms_median']:11.3f} {r['latency_ms_p90']:6.3f} "
              f"{r['batch256_images_per_s']:11.0f}")  # fmt: skip
    fp, q = rows[1], rows[2]
    print(f"int8 vs fp32 onnxruntime: latency x{fp['latency_ms_median'] / q['latency_ms_median']:.2f}, "
          f"throughput x{q['batch256_images_per_s'] / fp['batch256_images_per_s']:.2f}, "
          f"top-1 {100 * (q['top1'] - fp['top1']):+.2f} points; files {sizes['onnx_fp32_mb']:.2f} MB -> "
          f"{sizes['onnx_int8_mb']:.2f} MB")  # fmt: skip
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "gmlp_vision": gmlp_vision.__version__, "threads": args.threads,
            "checkpoint": str(path), "images": len(labels), **cpu, **sizes}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
