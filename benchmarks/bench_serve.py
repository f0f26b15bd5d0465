"""`gmlp serve` against direct batched inference of the same model on the same cores, then hostile traffic.

The model is the ``general`` preset's gMLP (6 blocks, 128 / 256, 32 px, 10 classes) with random weights (speed does
not depend on them), saved as a checkpoint. The server runs as ``gmlp serve CKPT --port 0`` on 127.0.0.1; clients
are asyncio connections in this process (HTTP/1.1 keep-alive, a 32 x 32 PNG body each), N of them sending requests
back to back for ``--seconds``. Direct: the same PNG bytes decoded and preprocessed by `Classifier.preprocess` and run
by `Classifier.probabilities`, in batches of ``--max-batch`` (throughput) and one at a time (latency), measured
before and after the server's load; the server's share is of the faster of the two (on a shared machine they differ).

Then ``--hostile`` requests (truncated images, a decompression-bomb header, wrong content types, bodies over the cap
by declared length and by chunks, slow senders of bodies and of headers cut off by the server's timeout, garbage
bytes), then a valid one: it
must succeed, and the server's resident memory (``/proc/PID/status``) must stay within 200 MB of what it was after
the load before them (the load itself grows it once: the batches' buffers at their largest).

    .venv/bin/python benchmarks/bench_serve.py                 # ~1.5 minutes
    .venv/bin/python benchmarks/bench_serve.py --seconds 2 --hostile 50   # smoke

Writes ``--json`` (default ``benchmarks/results/serve.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gmlp_vision.checkpoint import Checkpoint, save_checkpoint
from gmlp_vision.config import from_preset
from gmlp_vision.cpu import cpu_threads
from gmlp_vision.model import GMLP
from gmlp_vision.predict import Classifier

REPO = Path(__file__).resolve().parents[1]


def model_checkpoint(folder: Path) -> Path:
    """The ``general`` gMLP with random weights, 10 classes, as a checkpoint."""
    cfg = from_preset("general", num_classes=10)
    torch.manual_seed(0)
    path = folder / "model.pt"
    save_checkpoint(path, Checkpoint(cfg, GMLP(cfg.model).state_dict(), tuple(f"class{i}" for i in range(10))))
    return path


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def request(body: bytes, kind: str = "image/png", extra: str = "") -> bytes:
    head = (
        f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP response; returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    await reader.readexactly(length)
    return status


async def client(host: str, port: int, body: bytes, until: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    message = request(body)
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        writer.write(message)
        await writer.drain()
        if await read_answer(reader) != 200:
            raise SystemExit("bench_serve: a valid request failed")
        latencies.append(time.perf_counter() - t0)
    writer.close()


async def load(host: str, port: int, clients: int, seconds: float, body: bytes) -> dict[str, float]:
    latencies: list[float] = []
    await asyncio.gather(*(client(host, port, body, time.perf_counter() + 1.0, []) for _ in range(clients)))  # warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*(client(host, port, body, t0 + seconds, latencies) for _ in range(clients)))
    wall = time.perf_counter() - t0
    ms = sorted(1000 * x for x in latencies)
    return {"clients": clients, "images_per_s": len(ms) / wall, "p50_ms": ms[len(ms) // 2],
            "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "requests": len(ms)}  # fmt: skip


def direct(ckpt: Path, body: bytes, batch: int, seconds: float) -> dict[str, float]:
    """The same work without the server: decode and preprocess the PNG bytes, run the model; batched and alone."""
    clf = Classifier.load(ckpt, "cpu", batch_size=batch)
    images, t0, done = [body] * batch, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        clf.probabilities(clf.preprocess(images))
        done += batch
    throughput = done / (time.perf_counter() - t0)
    single = []
    for _ in range(200):
        t = time.perf_counter()
        clf.probabilities(clf.preprocess([body]))
        single.append(time.perf_counter() - t)
    return {"batched_images_per_s": throughput, "single_p50_ms": 1000 * statistics.median(single)}


def bomb() -> bytes:
    """A PNG header declaring 100,000 x 100,000 pixels and no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


async def hostile_one(host: str, port: int, i: int, valid: bytes) -> int:
    """One hostile request of kind ``i % 8``; returns the status (0: the server closed without one)."""
    reader, writer = await asyncio.open_connection(host, port)
    kind = i % 8
    try:
        if kind == 0:
            writer.write(request(valid[: len(valid) // 2]))  # truncated
        elif kind == 1:
            writer.write(request(bomb()))
        elif kind == 2:
            writer.write(request(b"hello", "text/plain"))
        elif kind == 3:
            writer.write(request(b"", extra="").replace(b"Content-Length: 0", f"Content-Length: {50 << 20}".encode()))
        elif kind == 4:
            writer.write(request(os.urandom(2000)))
        elif kind == 5:  # chunked, far over the cap
            writer.write(
                b"POST /predict HTTP/1.1\r\nHost: b\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(400):
                writer.write(b"10000\r\n" + b"z" * 65536 + b"\r\n")
                await writer.drain()
        elif kind == 6:  # a slow sender: half the body, then silence until the server's timeout
            writer.write(request(valid)[: len(valid) // 2])
        else:  # a slow sender of headers: half of them, then silence until the server closes the connection
            writer.write(request(valid)[:40])
        await writer.drain()
        return await asyncio.wait_for(read_answer(reader), 30)
    except (ConnectionError, asyncio.IncompleteReadError):
        return 0
    finally:
        writer.close()


async def hostile(host: str, port: int, count: int, valid: bytes) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for start in range(0, count, 50):  # 50 at a time
        got = await asyncio.gather(*(hostile_one(host, port, i, valid) for i in range(start, min(count, start + 50))))
        for s in got:
            statuses[str(s)] = statuses.get(str(s), 0) + 1
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request(valid))
    ok = await read_answer(reader) == 200
    writer.close()
    return {"count": count, "statuses": statuses, "valid_after": ok}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load per client count")
    parser.add_argument("--clients", default="1,8,64", help="client counts (default 1,8,64)")
    parser.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch and the direct batch")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's --max-wait-ms")
    parser.add_argument("--hostile", type=int, default=1000, help="hostile requests after the load")
    parser.add_argument("--json", default="benchmarks/results/serve.json")
    args = parser.parse_args(argv)
    body = png(0)
    with tempfile.TemporaryDirectory() as folder:
        ckpt = model_checkpoint(Path(folder))
        base = direct(ckpt, body, args.max_batch, args.seconds)
        command = [sys.executable, "-m", "gmlp_vision", "serve", str(ckpt), "--port", "0", "--max-batch",
                   str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--timeout", "3"]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            address = server.stdout.readline().split(" at http://", 1)[1].split("/", 1)[0]
            host, port = address.rsplit(":", 1)
            asyncio.run(load(host, int(port), 1, 0.5, body))
            rss_start = rss_mb(server.pid)
            rows = [asyncio.run(load(host, int(port), int(n), args.seconds, body)) for n in args.clients.split(",")]
            rss_loaded = rss_mb(server.pid)
            attack = asyncio.run(hostile(host, int(port), args.hostile, body)) if args.hostile else {}
            rss_after = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
        again = direct(ckpt, body, args.max_batch, args.seconds)  # after as before: the share is of the faster one
    base = {"before": base, "after": again, **max(base, again, key=lambda d: d["batched_images_per_s"])}
    rss = {"after_start": rss_start, "after_load": rss_loaded, "after_hostile": rss_after}
    result = {"direct": base, "served": rows, "hostile": attack, "rss_mb": rss, "threads": cpu_threads(0).threads,
              "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "cpu": _cpu(),
              "commit": _git()}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"direct: {base['before']['batched_images_per_s']:.0f} img/s before the server ran and "
          f"{base['after']['batched_images_per_s']:.0f} after, in batches of {args.max_batch} (shares below: of the "
          f"faster); {base['single_p50_ms']:.2f} ms for one image (decode, preprocess, model)")  # fmt: skip
    for r in rows:
        share = r["images_per_s"] / base["batched_images_per_s"]
        print(f"{r['clients']:3d} clients: {r['images_per_s']:7.0f} img/s ({share:.0%} of direct), "
              f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")  # fmt: skip
    if attack:
        print(f"hostile: {attack['count']} requests, statuses {attack['statuses']}, valid one after: "
              f"{attack['valid_after']}; RSS after start {rss_start:.0f} MB, after the load {rss_loaded:.0f} MB, "
              f"after the hostile requests {rss_after:.0f} MB")  # fmt: skip
    return 0 if not attack or (attack["valid_after"] and rss_after - rss_loaded < 200) else 1


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return f"{model} ({' '.join(f for f in flags if f.startswith(('avx512', 'amx')) or f in ('avx2', 'fma'))})"


if __name__ == "__main__":
    raise SystemExit(main())
