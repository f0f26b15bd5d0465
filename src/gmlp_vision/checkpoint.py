"""Checkpoints: atomic, versioned, self-describing, and loaded without unpickling arbitrary objects.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers: the model's ``state_dict`` (always
of the unwrapped module), the resolved config as a JSON string, class names, progress counters, metrics, for
``last.pt`` the optimiser, schedule and RNG states needed to resume, and a SHA-256 digest of all of it. It is read
with ``torch.load(weights_only=True)``, so a file crafted to run code on load is refused; a file whose content does not
match its digest is refused as corrupt; and the model is rebuilt from the embedded config alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gmlp_vision.config.core import Config
from gmlp_vision.errors import CheckpointError, ConfigError, NonFiniteLossError, first_line
from gmlp_vision.model import GMLP, check_weights_fit, nonfinite_names

FORMAT = "gmlp-vision-checkpoint"
ZIP_MAGIC = b"PK\x03\x04"
VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Checkpoint:
    """What a checkpoint file holds, decoded."""

    config: Config
    model_state: dict[str, torch.Tensor]
    classes: tuple[str, ...]
    epoch: int = 0
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    train_state: dict[str, Any] = field(default_factory=dict)  # optimiser, schedule, RNG, history: resume only

    def build_model(self, device: str | torch.device = "cpu") -> GMLP:
        """The model with these weights, in eval mode (the weights are checked against the config first)."""
        check_weights_fit(self.config.model, self.model_state, "checkpoint")
        model = GMLP(self.config.model)
        model.load_state_dict(self.model_state)
        return model.to(device).eval()


def after_nonfinite(run_dir: Path | None) -> str:
    """What a run stopped for NaN or inf leaves behind in ``run_dir``, and what to try: the end of its error line."""
    last = run_dir / "last.pt" if run_dir is not None else None
    if last is None or not last.exists():
        return "no checkpoint was written; a lower --lr or --clip-grad may help"
    return f"{last} keeps the last finite weights; go on from them with --init {last} and a lower --lr or --clip-grad"


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``) from state-dict keys."""
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def content_digest(obj: Any, h: Any = None) -> str:
    """SHA-256 over a checkpoint payload's content: tensors by dtype, shape and bytes; plain values by repr.

    ``torch.load`` checks no checksum (a flipped bit in a weight loads silently), so every checkpoint carries this
    digest and `load_checkpoint` refuses a file whose content does not match it.
    """
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            content_digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            content_digest(item, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically: temp file in the same folder, flush, fsync, rename.

    A failure (e.g. a full disk) leaves any previous file at ``path`` intact and no temp file behind.
    """
    path = Path(path)
    bad = nonfinite_names(ckpt.model_state)
    if bad:  # the last line of defence: training checks its weights before it saves (train.py)
        raise NonFiniteLossError(f"refusing to write {path.name}: {len(bad)} weight tensors hold NaN or inf ({bad[0]})")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(ckpt.config.to_dict()),
        "classes": list(ckpt.classes),
        "model": {k: v.detach().cpu() for k, v in clean_state_dict(ckpt.model_state).items()},
        "epoch": ckpt.epoch,
        "step": ckpt.step,
        "metrics": dict(ckpt.metrics),
        "train_state": ckpt.train_state,
    }
    payload["sha256"] = content_digest(payload)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, usual_file_mode())  # mkstemp creates 0600; a checkpoint gets the usual file permissions
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(payload, f)
            except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as a RuntimeError
                raise OSError(_write_failure(e, path)) from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_failure(error: RuntimeError, path: Path) -> str:
    """One line for torch.save's multi-line "enforce fail at inline_container.cc" error, with the space left."""
    text = str(error)
    reason = "file write failed" if "write failed" in text else text.strip().splitlines()[-1][:120]
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return reason
    return f"{reason} ({free / 1e6:.1f} MB free on that file system{'; it is full' if free < 1 << 20 else ''})"


def usual_file_mode() -> int:
    """The permissions a new file gets from ``open`` under this process's umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or for a run directory the checkpoint its results.json names (else best.pt).

    results.json is read as `untrusted.read_json_file` reads (a regular file of at most 16 MiB), and the name it
    gives must be a file name in the run directory.

    Raises:
        CheckpointError: the run directory's results.json cannot be read, or names no file of the run.
    """
    from gmlp_vision.errors import printable, shown  # imported here: hoist beside the module's imports
    from gmlp_vision.untrusted import JSON_LIMIT, read_json_file

    p = Path(path)
    if not p.is_dir():
        return p
    results = p / "results.json"
    if not os.path.lexists(results):
        return p / "best.pt"
    raw = read_json_file(results, JSON_LIMIT)
    name = raw.get("final_checkpoint", "best.pt") if isinstance(raw, dict) else None
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise CheckpointError(
            f"{printable(results)} names no checkpoint file of the run: final_checkpoint {shown(name)}"
        )
    return p / name


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint safely (``weights_only``) and validate what it holds.

    Raises:
        CheckpointError: missing, unreadable, unsafe, of another format or version, or with an invalid config.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file such as {path / 'best.pt'}")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():  # a FIFO would block the read below, a device would feed it forever
        raise CheckpointError(f"{path} is not a regular file; pass a checkpoint file such as best.pt")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if magic != ZIP_MAGIC:  # torch.save has written zip archives since 1.6; so does every gmlp-vision version
        raise CheckpointError(f"{path} is not a gmlp-vision checkpoint (not a PyTorch zip archive)")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols in damaged files; our error says it
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():  # torch's weights-only unpickler met a global it does not allow
            raise CheckpointError(
                f"{path} was refused: it holds Python objects other than tensors and plain values, which could run "
                "code when loaded; gmlp-vision checkpoints never do, so this file was not written by it"
            ) from None
        raise CheckpointError(f"{path} is damaged: its pickled content cannot be read") from None
    except Exception as e:  # torch raises many types for corrupt files; all mean "not a usable checkpoint"
        raise CheckpointError(f"{path} is damaged: cannot read it as a PyTorch archive ({type(e).__name__})") from None
    return checkpoint_from_payload(raw, path)


def _check_history_size(raw: dict[str, Any], path: str | Path) -> None:
    """Refuse a history longer than the epochs done before hashing it: a million rows took the digest 18 s."""
    state, epoch = raw.get("train_state"), raw.get("epoch")
    history = state.get("history") if isinstance(state, dict) else None
    if isinstance(history, list) and isinstance(epoch, int) and len(history) > max(epoch, 0) + 1:  # the rest: resume
        raise CheckpointError(
            f"{path} is damaged: its history has {len(history):,} rows for {epoch:,} epochs (one row per epoch)"
        )


def checkpoint_from_payload(raw: Any, path: str | Path) -> Checkpoint:
    """Validate what ``torch.load`` read from the checkpoint at ``path`` (format, version, digest, config).

    Raises:
        CheckpointError: of another format or version, corrupt, or with an invalid config.
    """
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gmlp-vision checkpoint")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {raw.get('version')}; this gmlp-vision reads {VERSION}")
    digest = raw.pop("sha256", None)
    if digest is None:
        raise CheckpointError(f"{path} carries no content digest (written by an older gmlp-vision?); cannot trust it")
    _check_history_size(raw, path)
    if digest != content_digest(raw):
        raise CheckpointError(f"{path} is corrupt: its content does not match its SHA-256 digest")
    try:
        config = Config.from_dict(json.loads(raw["config"]))
        state = clean_state_dict(raw["model"])
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TypeError("model weights are not all tensors")
        check_weights_fit(config.model, state, str(path))
        return Checkpoint(
            config=config,
            model_state=state,
            classes=tuple(str(c) for c in raw["classes"]),
            epoch=int(raw["epoch"]),
            step=int(raw["step"]),
            metrics={str(k): float(v) for k, v in raw["metrics"].items()},
            train_state=raw.get("train_state") or {},
        )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, ConfigError) as e:
        raise CheckpointError(f"{path} is damaged or incomplete: {first_line(e)}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GMLP, Checkpoint]:
    """Load a checkpoint and rebuild its model in eval mode on ``device``."""
    ckpt = load_checkpoint(path)
    return ckpt.build_model(device), ckpt
