"""Throughput of the streamed image-folder path (issue #6): files decoded by worker processes, no model.

Generates (once, then reused) a folder of JPEG photos-like images in the image-folder layout: ``--images`` training
files over 10 classes, each ``--width`` x ``--height`` (smooth colour fields with noise and shapes, quality 90, so they
compress like photos), plus a small ``val/``. Then it times what an epoch of ``gmlp train --folder-mode stream`` reads:
`gmlp_vision.data.stream.ImageFiles.batches` over the shuffled training files in batches of ``--batch-size``, for each
requested worker count and each mode: ``whole`` (decode the whole file, resize as prediction does) and ``crop`` (the
random-resized crop taken from the file, JPEGs decoded at a reduced DCT scale). Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_stream.py                 # 20,000 JPEGs of 400x300, 32 px, workers 1,2
    .venv/bin/python benchmarks/bench_stream.py --size 224 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from gmlp_vision.data.base import LoadOptions
from gmlp_vision.data.folders import load_image_folder


def make_folder(root: Path, n: int, width: int, height: int, classes: int = 10) -> Path:
    """``root/train/c<k>/<i>.jpg`` (n files) and ``root/val`` (a tenth as many); skipped if already complete."""
    marker = root / f".complete-{n}-{width}x{height}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for split, count in (("train", n), ("val", max(n // 10, classes))):
        for i in range(count):
            k = i % classes
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            a, b, c = rng.uniform(0, 2 * np.pi, 3)
            base = np.stack([128 + 100 * np.sin(x / (20 + 7 * k) + a), 128 + 100 * np.cos(y / (25 + 3 * k) + b),
                             128 + 90 * np.sin((x + y) / 40 + c)], axis=-1)  # fmt: skip
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            draw = ImageDraw.Draw(image)
            for _ in range(3):
                x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
                draw.ellipse((x0, y0, x0 + 40, y0 + 30), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            image.save(folder / f"{i}.jpg", quality=90)
    marker.touch()
    return root


def time_epoch(root: Path, size: int, workers: int, batch_size: int, crop: bool, limit: int) -> dict[str, float]:
    ds = load_image_folder(root, LoadOptions(image_size=size, folder_mode="stream", workers=workers, progress=False))
    files = ds.train.images
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:limit]
    batches = [b.tolist() for b in order.split(batch_size)]
    keys = [[(step << 32) | i for i in b] for step, b in enumerate(batches)] if crop else None
    t0 = time.perf_counter()
    seen = 0
    for images, readable in files.batches(batches, keys):
        seen += int(readable.sum())
        assert images.shape[1:] == (3, size, size)
    seconds = time.perf_counter() - t0
    return {"images": seen, "seconds": seconds, "images_per_s": seen / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("benchmarks/results/jpeg-folder"))
    parser.add_argument("--images", type=int, default=20_000, help="training JPEGs to generate")
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--size", type=int, default=32, help="model input size the images are decoded to")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=0, help="time only the first N files of the epoch (0: all)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/stream.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    make_folder(args.root, args.images, args.width, args.height)
    print(f"folder: {args.root} ({args.images:,d} JPEGs of {args.width}x{args.height}; ready in "
          f"{time.perf_counter() - t0:.0f} s); {os.cpu_count()} CPUs; decoded to {args.size} px")  # fmt: skip
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        for crop in (False, True):
            r = time_epoch(args.root, args.size, workers, args.batch_size, crop, args.limit or args.images)
            rows.append({"workers": workers, "mode": "crop" if crop else "whole", "size": args.size, **r})
            print(f"workers {workers}  {rows[-1]['mode']:5s}  {r['images']:>7,d} images in {r['seconds']:6.1f} s  "
                  f"{r['images_per_s']:>8,.0f} img/s")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"images": args.images, "width": args.width, "height": args.height,
                                     "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
