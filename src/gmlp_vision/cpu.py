"""The CPU set-up: torch's thread count (the cores this process may use, how busy they are) and malloc's reuse.

Torch starts one thread per core of the machine. Its threads wait for each other at the end of every parallel op, so one
that shares its core with another process stalls all of them. With a ``yes > /dev/null`` neighbour on one of 2 cores,
2 threads took 35.7 s for the digits quickstart and 1.14 s per ``seed`` step, 1 thread 8.2 s and 0.32 s. Too
few threads costs less: on the idle machine 1 thread made a step 0.30 s instead of 0.16-0.18 s, so a core is left out
when in doubt (one less than 75 % idle). So ``--threads 0`` counts the cores this process may use (its affinity, then
the cgroup v2 ``cpu.max`` or v1 CFS quota, rounded up), shares them among the machine's processes under ``torchrun``
(``LOCAL_WORLD_SIZE``), and leaves out the cores other processes keep busy at start, measured from ``/proc/stat`` over
0.2 s. The 1-minute load average is no substitute: it rose from 0.7 to only 1.35 in the minute after a ``yes`` started
(``/proc/stat`` showed the busy core within 0.1 s), still read 1.3 after it ended, and counts threads: one run's 1,000
pushed it past 500.

An explicit ``--threads`` (or ``OMP_NUM_THREADS`` outside torchrun) is kept, with a warning when it exceeds the usable
cores (4 threads on 2 cores made a ``seed`` step 1.3x slower, 1,000 threads 190x): a refusal would make a config or a
test that names a count fail on a smaller machine, and could block a run where the count is wrong (nested containers).

Freed memory is kept for reuse (`keep_freed_memory`): glibc's malloc otherwise maps blocks of 128 kB or more afresh
and unmaps them when freed (the threshold grows as larger blocks are freed, up to 32 MB) and trims the heap's free
top, so a step's activations can come back as new pages that fault on their first write: 10,000-15,000 faults per
`seed` step in a fresh process, none once kept. How much that costs depends on what the process freed before (a run
that loaded a dataset has raised the threshold already): on 2 cores of an Intel Xeon, 2026-11-26, a `seed` epoch of
12,800 CIFAR-10 images through `train` took 10.1-10.7 s kept against 10.8-12.0 s without in fp32, and the same
7.0-7.4 s in bf16; an isolated step in a fresh process was 1.09x faster in fp32 and 1.33x in bf16.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
PROC_STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.2  # 40 jiffies on 2 cores: a busy core reads 1.0 +- 0.05, an idle machine 0.0-0.2
FREE_SHARE = 0.75  # a core counts as free when at least this much of it was idle during the sample
# glibc's mallopt parameters (malloc.h) and the values `keep_freed_memory` sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit systems: smaller blocks come from the reused heap
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top is kept up to 2 GB


@dataclass(frozen=True)
class ThreadChoice:
    """How many threads torch runs, and why."""

    threads: int
    usable: int  # cores this process may use (affinity, cgroup quota)
    source: str  # "--threads", "OMP_NUM_THREADS" or "auto" (the cores, their load, the local processes)
    busy: float | None = None  # usable cores other processes kept busy at start (measured for "auto" only)
    processes: int = 1  # training processes on this machine (torchrun's LOCAL_WORLD_SIZE)
    warning: str | None = None  # more threads than usable cores

    def describe(self) -> str:
        """One line for the log, e.g. ``CPU threads: 1 (2 usable cores, 1.0 busy with other work at start; ...)``."""
        parts = [_cores(self.usable, "usable ")]
        if self.processes > 1:
            parts.append(f"shared by {self.processes} processes")
        if self.busy is not None:
            parts.append(f"{self.busy:.1f} busy with other work at start")
        text = f"CPU threads: {self.threads} ({', '.join(parts)}"
        if self.source != "auto":
            return f"{text}; from {self.source})"
        share = max(1, self.usable // self.processes)
        if self.threads < share:
            text += f"; --threads {share} to use them all"
        return text + ")"


@functools.cache
def cpu_flags_line() -> str:
    """The line of ``/proc/cpuinfo`` that lists the CPU's features (x86 ``flags``, Arm ``Features``); "" elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (avx2, avx512_bf16, amx_bf16, ...).

    Empty where they cannot be read (another system): nothing is assumed then.
    """
    return frozenset(cpu_flags_line().partition(":")[2].split())


def _cores(count: int, kind: str = "") -> str:
    return f"{count} {kind}core{'s' if count != 1 else ''}"


def affinity_cores() -> int:
    """The CPUs this process may run on (``taskset``, cpusets), else all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _quota_file(path: Path) -> float | None:
    """Cores allowed by one cgroup directory: v2 ``cpu.max`` ("max 100000", "150000 100000") or v1 CFS files."""
    try:
        if (path / "cpu.max").is_file():
            quota, period = (path / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (path / "cpu.cfs_quota_us").is_file():
            quota = int((path / "cpu.cfs_quota_us").read_text())
            return None if quota < 0 else quota / int((path / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return None


def cgroup_cores(root: Path = CGROUP_ROOT, membership: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in cores: the smallest along its path up to the root; None when none.

    Reads v2 (``0::/path`` -> ``root/path/cpu.max``) and v1 (``N:cpu,cpuacct:/path`` -> ``root/cpu,cpuacct/path``).
    In a container the path may be the host's and missing here: then the directories that exist count, the root
    (the container's own cgroup) always.
    """
    try:
        entries = [line.split(":", 2) for line in membership.read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        return None
    dirs: dict[Path, None] = {}  # ordered and without repeats
    for _, controllers, path in entries:
        if controllers == "":
            dirs[root / path.lstrip("/")] = None
        elif "cpu" in controllers.split(","):
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                dirs[root / mount / path.lstrip("/")] = None
    quotas = []
    for start in dirs:
        for path in (start, *start.parents):
            if path == root.parent:
                break
            quota = _quota_file(path)
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def usable_cores(root: Path = CGROUP_ROOT, membership: Path = PROC_CGROUP) -> int:
    """The cores this process may use: its affinity, capped by its cgroup's quota rounded up (1.5 cores: 2)."""
    quota = cgroup_cores(root, membership)
    cores = affinity_cores()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cpu_times(stat: Path = PROC_STAT) -> dict[int, tuple[int, int]]:
    """Per CPU from ``/proc/stat``: (all time, idle time) in jiffies; idle includes iowait, steal counts as busy."""
    times = {}
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
            times[int(name[3:])] = (sum(values), values[3] + values[4])
    return times


def busy_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: set[int]) -> float:
    """Cores kept busy between two `cpu_times` samples, summed over ``cpus``."""
    busy = 0.0
    for cpu in cpus & before.keys() & after.keys():
        total = after[cpu][0] - before[cpu][0]
        idle = after[cpu][1] - before[cpu][1]
        busy += 1.0 - idle / total if total > 0 else 0.0
    return busy


def idle_cores(seconds: float = SAMPLE_SECONDS, stat: Path = PROC_STAT) -> float | None:
    """Cores of this process's affinity left idle by other processes over ``seconds``, while this one sleeps.

    What this process itself ran meanwhile (torch's threads still spinning after earlier work) does not count as busy.
    None where ``/proc/stat`` cannot be read (not Linux).
    """
    try:
        cpus = os.sched_getaffinity(0)
        before, own, start = cpu_times(stat), time.process_time(), time.monotonic()
        time.sleep(seconds)
        busy = busy_between(before, cpu_times(stat), cpus)
        own = (time.process_time() - own) / max(time.monotonic() - start, 1e-3)
    except (AttributeError, OSError, ValueError):
        return None
    return min(float(len(cpus)), len(cpus) - busy + own)


def choose_threads(
    requested: int, usable: int, idle: float | None, *, processes: int = 1, source: str = "--threads"
) -> ThreadChoice:
    """The thread count for ``requested`` (0: auto) given the usable cores, how many are idle, the local processes.

    Auto: the usable cores that are idle (one at least 75 % idle counts), shared among ``processes``, at least 1.
    Explicit: ``requested``, with a warning when the processes' threads exceed the usable cores.

    Args:
        requested: ``--threads``; 0 for auto.
        usable: `usable_cores`.
        idle: `idle_cores` (auto only); None: unknown, all usable cores count as free.
        processes: training processes on this machine, sharing its cores.
        source: what asked for ``requested``, for the messages.
    """
    processes = max(1, processes)
    if requested == 0:
        if idle is None:
            return ThreadChoice(max(1, usable // processes), usable, "auto", None, processes)
        free = min(usable, math.floor(idle + 1.0 - FREE_SHARE))
        busy = max(0.0, usable - idle)
        return ThreadChoice(max(1, free // processes), usable, "auto", busy, processes)
    warning = None
    if requested * processes > usable:
        asked = f"{source} {requested}" + (f" in each of {processes} processes" if processes > 1 else "")
        remedy = "--threads 0" if source == "--threads" else "unset it"
        warning = (
            f"{asked} is more than the {_cores(usable, 'CPU ')} this process may use: threads beyond them wait for "
            f"each other and can make every step many times slower ({remedy} to have the count picked)"
        )
    return ThreadChoice(requested, usable, source, None, processes, warning)


def local_processes() -> int:
    """The training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def cpu_threads(requested: int) -> ThreadChoice:
    """Decide the thread count for ``--threads requested`` (0: auto) on this machine, now.

    Outside torchrun a set ``OMP_NUM_THREADS`` counts as an explicit request; under torchrun (which sets it to 1
    itself) the usable cores are shared among the local processes instead.
    """
    processes, source = local_processes(), "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if requested == 0 and processes == 1 and env.isdigit() and int(env) > 0:
        requested, source = int(env), "OMP_NUM_THREADS"
    idle = idle_cores() if requested == 0 else None
    return choose_threads(requested, usable_cores(), idle, processes=processes, source=source)


def use_cpu_threads(requested: int) -> ThreadChoice:
    """`cpu_threads`, then ``torch.set_num_threads`` with its count, and `keep_freed_memory`; the caller logs it."""
    import torch

    choice = cpu_threads(requested)
    torch.set_num_threads(choice.threads)
    keep_freed_memory()
    return choice


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks up to 32 MB for the next tensors (the module docstring says why).

    Process-wide and kept until the process ends; a process's resident memory then stays near its peak. Returns
    whether it took effect: False where the C library is not glibc (musl, macOS, Windows).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt, _ = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
