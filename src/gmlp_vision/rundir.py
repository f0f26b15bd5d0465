"""The run directory: its fixed set of files, the epoch log line, and resuming a run from it.

Layout: ``config.json`` (resolved config), ``history.csv`` + ``history.jsonl`` (one row per epoch), ``best.pt`` (lowest
validation loss), ``last.pt`` (everything needed to resume, rewritten after every epoch and, with
``--checkpoint-every``, every N steps), ``results.json`` (test metrics of the final weights), ``plots/``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

from torch import Tensor

from gmlp_vision.checkpoint import Checkpoint, load_checkpoint
from gmlp_vision.config import Config, load_config_file
from gmlp_vision.data.layout import HOLDOUT_FILE
from gmlp_vision.errors import CheckpointError, ConfigError, RunDirBusy
from gmlp_vision.files import write_text
from gmlp_vision.metrics import EMA_FIELDS, HISTORY_FIELDS, METRICS
from gmlp_vision.resume_check import ResumeTarget, check_resume_state

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked (RunLock says so once)
    fcntl = None  # type: ignore[assignment]

# What a resumed run may change: where and how fast it runs, and how long. Everything else is the run's identity.
RESUMABLE_OVERRIDES = frozenset(
    {
        "epochs",
        "device",
        "threads",
        "cuda_graphs",
        "progress",
        "checkpoint_every",
        "download",
        "data",
        "tensorboard",
        "accum_steps",
        "workers",
        "folder_mode",
    }
)


def default_run_dir(cfg: Config, data: str | None = None) -> Path:
    """A new folder ``runs/<data>-<preset>-<YYYYmmdd-HHMMSS>``, made here: ``-2``, ``-3``... when it exists.

    So a run without ``--out`` (``out=None`` from Python) always gets a fresh folder, however often it is repeated.
    ``data`` names the data (default: the config's dataset kind; a dataset passed in memory has its own name).
    """
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (data or cfg.data.dataset))[:40]
    base = Path("runs") / f"{name}-{cfg.preset or 'custom'}-{datetime.now():%Y%m%d-%H%M%S}"
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def prepare_run_dir(path: Path) -> Path:
    """Create a new run directory; refuse one that already holds a run (resume it instead)."""
    if (path / "config.json").exists() or (path / "last.pt").exists():
        raise ConfigError(f"--out {path} already holds a run; resume it with --resume {path} or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``, held for the run's lifetime.

    The operating system drops the lock when the process ends, however it ends (SIGKILL included), so a crashed run
    never blocks its own resume. The file holds the holder's pid and host, for the error a second writer gets. The
    lock is only as good as the file system's: local disks and NFSv4 honour it across processes; some network or
    FUSE mounts do not (README, "Long runs").
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)  # never a link's target
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(
                f"{self.path.parent} is in use by a gmlp run ({holder}); wait for it to end, or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as null: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Write strict JSON (non-finite numbers as null) atomically, so a crash never leaves half a file."""
    write_text(path, json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n")


def write_holdout(run_dir: Path, files: tuple[str, ...], fraction: float) -> None:
    """Record the test files the run's data held out (`data.layout.hold_out`): ``RUN_DIR/holdout.json``."""
    write_json(run_dir / HOLDOUT_FILE, {"holdout": fraction, "test": list(files)})


def write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    """Rewrite ``history.csv`` and ``history.jsonl`` with every epoch so far (atomically)."""
    ema = bool(history) and EMA_FIELDS[0] in history[0]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=HISTORY_FIELDS + (EMA_FIELDS if ema else ()), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text(run_dir / "history.csv", table.getvalue())
    rows = "".join(json.dumps(_json_safe(row), allow_nan=False) + "\n" for row in history)
    write_text(run_dir / "history.jsonl", rows)


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> Config:
    """The config of the run in ``run_dir`` with the allowed ``overrides`` (flat field values) applied.

    Raises:
        ConfigError: no run there, or an override that would change what the run is (architecture, data, recipe).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume {run_dir}: no run there (config.json is missing)")
    values = load_config_file(run_dir / "config.json")
    refused = sorted(k for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and values.get(k) != v)
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise ConfigError(f"--resume continues the run as it was configured; these flags would change it: {flags}")
    values.update(overrides, out=str(run_dir))
    return Config.from_dict(values)


def check_same_run(cfg: Config, other: Config, source: Path) -> None:
    """Refuse to resume from a checkpoint that another run wrote.

    Its config must equal the run's, but for what ``--resume`` may change (`RESUMABLE_OVERRIDES`) and where it lives.

    Raises:
        CheckpointError: the first differing value, named by its flag.
    """
    ours, theirs = cfg.to_flat(), other.to_flat()
    for name in ours:
        if name not in RESUMABLE_OVERRIDES and name != "out" and ours[name] != theirs.get(name):
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"{source} belongs to another run: its {flag} is {theirs.get(name)!r}, this run's config.json says "
                f"{ours[name]!r}; refusing to resume from it"
            )


def remove_stale_temps(run_dir: Path) -> None:
    """Delete temp files a killed process may have left while writing (``.last.pt.*.tmp`` and the like)."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def open_run_dir(
    cfg: Config, resume: bool, held: ExitStack | None, train_images: int | None = None, data: str | None = None
) -> tuple[Path, Checkpoint | None, dict[str, Tensor] | None]:
    """Rank 0's part of starting a run: the locked run directory with its config.json, and what to resume from.

    Args:
        held: where to keep the run directory's lock until training ends (None: the caller holds it already).
        train_images: how many images an epoch trains on (a resumed epoch's permutation is checked against it).
        data: the data's name, for a new run directory's (`default_run_dir`).
    """
    saved = best = None
    run_dir = Path(cfg.run.out) if cfg.run.out else default_run_dir(cfg, data)
    if held is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(RunLock(run_dir))  # before anything in it is read, deleted or written
    if resume:
        remove_stale_temps(run_dir)
        if (run_dir / "last.pt").exists():
            saved = load_checkpoint(run_dir / "last.pt")
            check_same_run(cfg, saved.config, run_dir / "last.pt")
            # Checked before anything here is rewritten (TrainState.load checks again, with the device's streams).
            check_resume_state(saved, ResumeTarget.described_by(saved.config, METRICS, train_images))
            if (run_dir / "best.pt").exists():
                best_ckpt = load_checkpoint(run_dir / "best.pt")
                check_same_run(cfg, best_ckpt.config, run_dir / "best.pt")
                best = best_ckpt.model_state
            # A kill between last.pt and history.csv left the CSV one epoch behind.
            write_history(run_dir, list(saved.train_state.get("history", [])))
    else:
        prepare_run_dir(run_dir)
    write_json(run_dir / "config.json", cfg.replace(out=str(run_dir)).to_dict())
    return run_dir, saved, best
