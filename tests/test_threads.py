"""CPU threads: usable cores from affinity and cgroups, the busy rule, warnings, torchrun, train()."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from gmlp_vision import cpu
from gmlp_vision.callbacks import Callback
from gmlp_vision.cli.common import cpu_threads_for
from gmlp_vision.config import from_preset
from gmlp_vision.cpu import busy_between, cgroup_cores, choose_threads, cpu_threads, cpu_times, idle_cores, usable_cores
from gmlp_vision.train import train
from synthetic import make_dataset

STAT = """cpu  300 0 100 900 0 0 0 0 0 0
cpu0 100 0 50 400 50 0 0 0 0 0
cpu1 200 0 50 450 0 0 0 0 0 0
intr 12345
"""


@pytest.fixture(autouse=True)
def torch_threads(monkeypatch):
    """Torch's thread count as it was, after each test; no launcher or OpenMP variables from the caller."""
    for name in ("LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def eight_cpus(monkeypatch):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(8)))


def test_cgroup_v2_takes_the_smallest_quota_on_the_path(tmp_path, monkeypatch):
    eight_cpus(monkeypatch)
    root = tmp_path / "cgroup"
    membership = write(tmp_path / "self-cgroup", "0::/user.slice/job\n")
    write(root / "user.slice" / "cpu.max", "150000 100000\n")  # 1.5 cores for the slice
    write(root / "user.slice" / "job" / "cpu.max", "max 100000\n")  # no limit of its own
    assert cgroup_cores(root, membership) == 1.5
    assert usable_cores(root, membership) == 2  # rounded up: 1.5 cores keep 2 threads partly busy


def test_cgroup_v1_quota_of_a_container_whose_path_is_the_hosts(tmp_path, monkeypatch):
    eight_cpus(monkeypatch)
    root = tmp_path / "cgroup"
    membership = write(tmp_path / "self-cgroup", "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "300000\n")  # the container's own cgroup is the mount's root
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cores(root, membership) == 3.0
    assert usable_cores(root, membership) == 3


def test_no_quota_leaves_the_affinity(tmp_path, monkeypatch):
    eight_cpus(monkeypatch)
    root = tmp_path / "cgroup"
    membership = write(tmp_path / "self-cgroup", "1:cpu:/\n0::/\n")
    write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cores(root, membership) is None
    assert usable_cores(root, membership) == 8
    assert usable_cores(root, tmp_path / "missing") == 8  # not Linux, or no cgroups: the affinity alone
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {3})  # taskset -c 3
    assert usable_cores(root, membership) == 1


def test_load_sample_counts_the_idle_share_of_each_cpu(tmp_path, monkeypatch):
    before = cpu_times(write(tmp_path / "stat", STAT))
    assert before == {0: (600, 450), 1: (700, 450)}
    # 100 jiffies per CPU later: cpu0 stayed idle, cpu1 ran another process all the time (iowait counts as idle).
    after = {0: (700, 550), 1: (800, 450)}
    assert busy_between(before, after, {0, 1}) == pytest.approx(1.0)
    assert busy_between(before, after, {0}) == pytest.approx(0.0)  # only the CPUs this process may use count

    stat = tmp_path / "stat"
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpu.time, "sleep", lambda s: write(stat, STAT.replace("cpu1 200", "cpu1 300")))
    monkeypatch.setattr(cpu.time, "monotonic", itertools.count(0.0, 0.2).__next__)  # 0.2 s per call
    monkeypatch.setattr(cpu.time, "process_time", iter([1.0, 1.0, 1.0, 1.1]).__next__)
    assert idle_cores(0.2, stat) == pytest.approx(1.0)
    write(stat, STAT)
    assert idle_cores(0.2, stat) == pytest.approx(1.5)  # half a core of the busy one was this process's own threads
    assert idle_cores(0.2, tmp_path / "no-stat") is None


@pytest.mark.parametrize(
    ("usable", "idle", "threads", "busy"),
    [
        (2, 2.0, 2, 0.0),  # idle machine: every usable core
        (2, 1.8, 2, 0.2),  # a little noise from other processes: still both
        (2, 1.0, 1, 1.0),  # a `yes` neighbour holds a core: one thread
        (2, 0.0, 1, 2.0),  # everything busy: at least one thread
        (2, None, 2, None),  # no load sample (not Linux): the usable cores
        (2, 54.0, 2, 0.0),  # a 2-core quota on a large, mostly idle host
    ],
)
def test_auto_leaves_out_the_busy_cores(usable, idle, threads, busy):
    choice = choose_threads(0, usable, idle)
    assert (choice.threads, choice.source, choice.warning) == (threads, "auto", None)
    assert choice.busy == (None if busy is None else pytest.approx(busy))
    hint = "--threads 2 to use them all"
    assert (hint in choice.describe()) == (threads < usable)


def test_the_decision_is_one_log_line():
    assert choose_threads(0, 2, 1.0).describe() == (
        "CPU threads: 1 (2 usable cores, 1.0 busy with other work at start; --threads 2 to use them all)"
    )
    assert choose_threads(1, 2, None).describe() == "CPU threads: 1 (2 usable cores; from --threads)"


def test_more_threads_than_usable_cores_warns_and_keeps_the_request():
    choice = choose_threads(1000, 2, None)
    assert choice.threads == 1000
    assert "--threads 1000 is more than the 2 CPU cores" in (choice.warning or "")
    assert choose_threads(2, 2, None).warning is None
    assert "in each of 2 processes" in (choose_threads(2, 2, None, processes=2).warning or "")


def test_torchrun_shares_the_cores_among_the_local_processes(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 8)
    monkeypatch.setattr(cpu, "idle_cores", lambda: 8.0)
    assert cpu_threads(0).threads == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets when it is unset: the cores are shared instead
    choice = cpu_threads(0)
    assert (choice.threads, choice.processes) == (4, 2)
    assert "shared by 2 processes" in choice.describe()
    monkeypatch.setattr(cpu, "idle_cores", lambda: 5.0)  # 3 busy: 5 free cores for 2 processes
    assert cpu_threads(0).threads == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more processes than cores: one thread each
    assert cpu_threads(0).threads == 1


def test_omp_num_threads_is_an_explicit_request_outside_torchrun(monkeypatch, capsys):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu, "idle_cores", lambda: pytest.fail("an explicit count takes no load sample"))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    choice = cpu_threads(0)
    assert (choice.threads, choice.source) == (3, "OMP_NUM_THREADS")
    assert "OMP_NUM_THREADS 3 is more than the 2 CPU cores" in (choice.warning or "")
    assert cpu_threads(1).threads == 1  # --threads wins

    cpu_threads_for(torch.device("cpu"))  # what evaluate, predict, report and export --check run
    assert torch.get_num_threads() == 3
    assert "gmlp: warning: OMP_NUM_THREADS 3" in capsys.readouterr().err
    torch.set_num_threads(1)
    cpu_threads_for(torch.device("meta"))  # not the CPU: left alone
    assert torch.get_num_threads() == 1


class Seen(Exception):
    """Raised from the epoch callback: the test has what it needs, and the run's plots are skipped."""


class StopAfterEpoch(Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise Seen(torch.get_num_threads())


def test_train_runs_with_the_decided_thread_count_and_restores_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu, "idle_cores", lambda: 1.0)  # a busy neighbour: one thread
    torch.set_num_threads(2)

    cfg = from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run"), val_split=0.2, threads=0)
    with caplog.at_level(logging.INFO, logger="gmlp_vision"), pytest.raises(Seen) as seen:
        train(cfg, make_dataset(32, 8), callbacks=[StopAfterEpoch()])
    assert seen.value.args == (1,)
    assert "CPU threads: 1 (2 usable cores, 1.0 busy with other work at start" in caplog.text
    assert torch.get_num_threads() == 2  # the caller's count again


def test_train_warns_about_more_threads_than_cores(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 1)

    cfg = from_preset("tiny", epochs=1, progress=False, out=str(tmp_path / "run"), val_split=0.2, threads=2)
    with caplog.at_level(logging.INFO, logger="gmlp_vision"), pytest.raises(Seen) as seen:
        train(cfg, make_dataset(32, 8), callbacks=[StopAfterEpoch()])
    assert seen.value.args == (2,)  # kept, as asked
    assert "--threads 2 is more than the 1 CPU core this process may use" in caplog.text


# Blocks of growing size (1 MB and up), each written and freed at once: glibc's default maps every one afresh, since
# each is larger than the last one freed (its dynamic threshold), so every page of it faults on the first write.
PAGE_FAULTS = """
import resource, statistics, sys, torch
from gmlp_vision.cpu import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for i in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty((1 << 20) + i * 65536, dtype=torch.uint8).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[2:]))
"""


@pytest.mark.skipif(not cpu.keep_freed_memory(), reason="glibc's malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    import subprocess
    import sys

    faults = {
        how: float(subprocess.run([sys.executable, "-c", PAGE_FAULTS, how], capture_output=True, text=True,
                                  check=True).stdout)
        for how in ("default", "keep")
    }  # fmt: skip
    # By default every page of each block faults (~400 a block); kept, only the heap's growth (16-64 pages).
    assert faults["default"] > 200 and faults["keep"] * 4 < faults["default"], faults
