"""Timing helpers for the CPU benchmark: throughput as mean ± std over repeats, median latency, matmul peak.

On CPU every op finishes before the call returns, so wall-clock timing around the call is exact (no device sync).
Each measurement warms up first (absorbing compilation and allocator growth), then runs ``repeats`` windows of at
least ``seconds / repeats`` each and reports items per second per window, as airbench reports mean ± std over runs.
The CPU may be shared, so every throughput also records how many cores OTHER processes kept busy meanwhile (machine
busy time from ``/proc/stat`` minus this process's CPU time): a row measured beside a busy neighbour says so.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Budget:
    """How long to time each measurement."""

    seconds: float  # total timed seconds per measurement, split into `repeats` windows
    repeats: int
    warmup: int  # untimed calls first

    @property
    def window(self) -> float:
        return self.seconds / self.repeats


@dataclass(frozen=True)
class Rate:
    """Items per second over repeated timing windows."""

    mean: float
    std: float
    runs: tuple[float, ...]
    other_cores: float | None  # mean cores busy with other processes while timing (None without /proc/stat)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return platform.processor() or "?"


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """Result of ``fn()`` and the seconds it took."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _cpu_clock() -> tuple[float | None, float, float]:
    """Machine-wide busy CPU seconds (steal included), this process's CPU seconds, and wall time."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy: float | None = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError, IndexError):
        busy = None
    own = os.times()
    return busy, own.user + own.system, time.perf_counter()


def throughput(step: Callable[[], object], items: int, budget: Budget, warmup: int | None = None) -> Rate:
    """Items per second of ``step`` (which processes ``items`` items per call): mean ± std over repeat windows."""
    for _ in range(budget.warmup if warmup is None else warmup):
        step()
    runs = []
    busy0, own0, wall0 = _cpu_clock()
    for _ in range(budget.repeats):
        calls, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < budget.window or calls == 0:
            step()
            calls += 1
        runs.append(calls * items / elapsed)
    busy1, own1, wall1 = _cpu_clock()
    other = None
    if busy0 is not None and busy1 is not None:  # clock-tick rounding can dip below zero
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
    return Rate(statistics.fmean(runs), statistics.stdev(runs) if len(runs) > 1 else 0.0, tuple(runs), other)


def wait_for_quiet(max_seconds: float, threshold: float = 0.25, settle: float = 2.0) -> float:
    """Wait (up to ``max_seconds``) until other processes keep fewer than ``threshold`` cores busy for ``settle`` s.

    Returns:
        The seconds waited.
    """
    start = time.perf_counter()
    quiet_since = None
    while time.perf_counter() - start < max_seconds:
        busy0, own0, wall0 = _cpu_clock()
        time.sleep(0.5)
        busy1, own1, wall1 = _cpu_clock()
        if busy0 is None or busy1 is None:
            break
        if (busy1 - busy0 - (own1 - own0)) / (wall1 - wall0) < threshold:
            quiet_since = quiet_since or wall0
            if wall1 - quiet_since >= settle:
                break
        else:
            quiet_since = None
    return time.perf_counter() - start


def median_latency_ms(step: Callable[[], object], seconds: float, warmup: int = 5) -> float:
    """Median milliseconds per call of ``step`` over at least ``seconds`` (and at least 10 calls)."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 10:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def matmul_peak(sizes: tuple[int, ...], dtype: torch.dtype, runs: int) -> dict[str, float]:
    """Best ``torch.mm`` GFLOP/s for each square size (``2 n^3`` FLOP per product), best of ``runs`` timings."""
    result = {}
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        reps = max(1, int(2e9 // (2 * n**3)))  # about 2 GFLOP per timing, so small sizes are not all overhead
        torch.mm(a, b)
        best = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            best = min(best, (time.perf_counter() - t0) / reps)
        result[str(n)] = 2 * n**3 / best / 1e9
    return result
