"""The run directory: its fixed set of files, the epoch log line, and resuming a run from it.

Layout: ``config.json`` (resolved config), ``history.csv`` + ``history.jsonl`` (one row per epoch), ``best.pt`` (lowest
validation loss), ``last.pt`` (everything needed to resume, rewritten after every epoch and, with
``--checkpoint-every``, every N steps), ``results.json`` (test metrics of the final weights), ``plots/``.
"""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from gmlp_vision.config import Config, load_config_file
from gmlp_vision.errors import ConfigError

HISTORY_FIELDS = ("epoch", "loss", "acc", "top5", "val_loss", "val_acc", "val_top5", "lr", "seconds")
EMA_FIELDS = ("val_ema_loss", "val_ema_acc", "val_ema_top5")  # with --ema: the averaged weights on validation
# What a resumed run may change: where and how fast it runs, and how long. Everything else is the run's identity.
RESUMABLE_OVERRIDES = frozenset(
    {
        "epochs",
        "device",
        "threads",
        "progress",
        "checkpoint_every",
        "download",
        "data",
        "tensorboard",
        "accum_steps",
        "workers",
        "folder_mode",
    }  # fmt: skip
)


def default_run_dir(cfg: Config) -> Path:
    """``runs/<dataset>-<preset>-<YYYYmmdd-HHMMSS>``."""
    return Path("runs") / f"{cfg.dataset}-{cfg.preset or 'custom'}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(path: Path) -> Path:
    """Create a new run directory; refuse one that already holds a run (resume it instead)."""
    if (path / "config.json").exists() or (path / "last.pt").exists():
        raise ConfigError(f"--out {path} already holds a run; resume it with --resume {path} or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    """Rewrite ``history.csv`` and ``history.jsonl`` with every epoch so far (atomically)."""
    tmp = run_dir / ".history.csv.tmp"
    with open(tmp, "w", newline="") as f:
        ema = bool(history) and EMA_FIELDS[0] in history[0]
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS + (EMA_FIELDS if ema else ()), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, run_dir / "history.csv")
    tmp = run_dir / ".history.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, run_dir / "history.jsonl")


def format_epoch(row: dict[str, float], epochs: int, steps: int) -> str:
    """A Keras-like epoch line: ``Epoch 3/100 - 352/352 - 15s - loss: ... - val_top5-acc: ... - lr: 0.003``."""
    names = (("loss", "loss"), ("acc", "acc"), ("top5", "top5-acc"))
    parts = [f"Epoch {int(row['epoch'])}/{epochs}", f"{steps}/{steps}", f"{row['seconds']:.0f}s"]
    parts += [f"{prefix}{name}: {row[prefix + key]:.4f}" for prefix in ("", "val_", "val_ema_") for key, name in names
              if prefix + key in row]  # fmt: skip
    parts.append(f"lr: {row['lr']:.4g}")
    return " - ".join(parts)


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


def remove_stale_temps(run_dir: Path) -> None:
    """Delete temp files a killed process may have left while writing (``.last.pt.*.tmp`` and the like)."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
