"""Prove that a refactor left behaviour unchanged: the same runs with the code before and after, compared bit for bit.

The base side is a git worktree of ``--base`` (default 3808bad: issue 22's house and issue 23's shipping, where a
run with ``--ema`` names the file it ships in ``final_checkpoint``; against 8dff523, the commit before issue 22, every
weight and history row is identical and ``final_checkpoint`` differs for the EMA cases, by design); the
new side is this repository's working tree, or ``--new`` (a revision, checked out as a second worktree, or a checkout
folder). Both sides run with this interpreter, each with its own ``src/`` first on ``PYTHONPATH`` (checked before
anything runs), one after the other, on the CPU with one thread, writing only under ``--out``. Compared per case:
the SHA-256 of every weight tensor in ``last.pt``/``best.pt``/``ema.pt`` (not of the files, which hold the config),
the history rows without ``seconds``, ``results.json`` without timings, ``gmlp predict --json`` lines without the
image path, and onnxruntime outputs of the exported ONNX graphs on fixed inputs. Everything must be identical.

Cases: digits (3 of the preset's 40 epochs), seed and cifar10-fast (real CIFAR-10, 3,000 images, 2 epochs), recipe
(mixup, TrivialAugment, random erasing, EMA), resume (SIGTERM mid-epoch, then ``--resume``; must also equal a
straight run), torchrun (2 processes, gloo), predict (6 PNGs), onnx (``gmlp export --check``).

    .venv/bin/python tools/compare_versions.py                  # 3808bad vs the working tree (~4 min on 2 cores)
    .venv/bin/python tools/compare_versions.py --quick          # every case shrunk: a ~2 minute smoke run
    .venv/bin/python tools/compare_versions.py --new 3808bad    # the base against itself: must be all identical

Exit status: 0 when every case is identical; 1 for a difference, a failed or skipped case; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CIFAR10 = REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz"
COMMON = ("--threads", "1", "--device", "cpu", "--no-progress")  # every train command: one thread, CPU, quiet
TORCHRUN = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone")
RECIPE = ("--mixup", "0.8", "--policy", "trivial", "--erase", "0.25", "--ema", "0.99")
TIMEOUT = 1800  # seconds per command: a hung torchrun fails its case, not the whole comparison


class CaseError(Exception):
    """One side could not run a case: a command failed, or a check within the side did not hold."""


@dataclass
class Side:
    """One version of the code: the checkout whose ``src/`` is imported, and the folder its runs go to."""

    name: str
    root: Path
    label: str
    out: Path

    @property
    def env(self) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(self.root / "src"), os.environ.get("PYTHONPATH")]))
        caches = {"GMLP_DATA": str(self.out / "cache"), "MPLCONFIGDIR": str(self.out / "matplotlib")}
        return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **caches}


@dataclass
class Options:
    """What the cases need besides the side: the run sizes, the CIFAR-10 archive, the PNGs to predict."""

    quick: bool
    cifar10: Path
    images: list[Path]


def gmlp(side: Side, work: Path, *args: str, launcher: tuple[str, ...] = ()) -> str:
    """Run ``python [launcher] -m gmlp_vision ARGS`` in ``work`` with ``side``'s code; returns its stdout."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *launcher, "-m", "gmlp_vision", *args]
    try:
        proc = subprocess.run(cmd, cwd=work, env=side.env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CaseError(f"gmlp {args[0]} timed out after {TIMEOUT} s") from None
    with open(work / "commands.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise CaseError(f"gmlp {args[0]} exited {proc.returncode}: {last[:160]}")
    return proc.stdout


def train(side: Side, work: Path, *flags: str, run: str = "run", launcher: tuple[str, ...] = ()) -> Path:
    """``gmlp train FLAGS`` into ``work/run`` (one thread, CPU, no progress bar); returns the run directory."""
    gmlp(side, work, "train", *flags, *COMMON, "--out", str(work / run), launcher=launcher)
    return work / run


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw).hexdigest()


# Keys results.json gained after 0.1 that say nothing about the run's numbers: the command that reruns it, the held-out
# split's name, the image counts, the file ``test`` was measured on. Left out so that a comparison with an older commit
# compares what both sides record.
ADDED_RESULTS = ("command", "test_split", "images", "test_checkpoint")


def without_timings(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` without the keys that name a duration (seconds, time), in nested dicts too."""
    timed = [k for k in row if "second" in k or "time" in k]
    return {k: without_timings(v) if isinstance(v, dict) else v for k, v in row.items() if k not in timed}


def run_fingerprint(run: Path) -> dict[str, Any]:
    """Weight tensor hashes of each checkpoint, history rows without seconds, results without timings."""
    found: dict[str, Any] = {}
    for name in ("last.pt", "best.pt", "ema.pt"):
        if (run / name).exists():
            model = torch.load(run / name, map_location="cpu", weights_only=True)["model"]
            found[name] = {k: tensor_sha256(v) for k, v in model.items()}
    found["history"] = [without_timings(json.loads(row)) for row in (run / "history.jsonl").read_text().splitlines()]
    results = json.loads((run / "results.json").read_text())
    found["results"] = without_timings({k: v for k, v in results.items() if k not in ADDED_RESULTS})
    return found


def size(opt: Options, epochs: int, limit: int = 0) -> tuple[str, ...]:
    """``--epochs``/``--train-limit`` flags, shrunk to one epoch on 300 images by ``--quick``."""
    epochs, limit = (1, 300) if opt.quick else (epochs, limit)
    return ("--epochs", str(epochs), *(("--train-limit", str(limit)) if limit else ()))


def cifar(opt: Options) -> tuple[str, ...]:
    return ("--dataset", "cifar10", "--data", str(opt.cifar10))


def digits_run(side: Side, opt: Options) -> Path:
    """The digits preset's run, trained once per side: the digits, predict and onnx cases share it."""
    run = side.out / "digits" / "run"
    return run if (run / "results.json").exists() else train(side, run.parent, "--dataset", "digits", *size(opt, 3))


Fingerprint = tuple[dict[str, Any], str]  # what is compared, and a note on this side's run


def case_digits(side: Side, work: Path, opt: Options) -> Fingerprint:
    return run_fingerprint(digits_run(side, opt)), f"{1 if opt.quick else 3} of the preset's 40 epochs"


def case_seed(side: Side, work: Path, opt: Options) -> Fingerprint:
    return run_fingerprint(train(side, work, "--preset", "seed", *cifar(opt), *size(opt, 2, 3000))), ""


def case_fast(side: Side, work: Path, opt: Options) -> Fingerprint:
    return run_fingerprint(train(side, work, "--preset", "cifar10-fast", *cifar(opt), *size(opt, 2, 3000))), ""


def case_recipe(side: Side, work: Path, opt: Options) -> Fingerprint:
    return run_fingerprint(train(side, work, "--preset", "tiny", *cifar(opt), *size(opt, 2, 1000), *RECIPE)), ""


def case_torchrun(side: Side, work: Path, opt: Options) -> Fingerprint:
    return run_fingerprint(train(side, work, "--dataset", "digits", *size(opt, 2), launcher=TORCHRUN)), ""


def case_resume(side: Side, work: Path, opt: Options) -> Fingerprint:
    """SIGTERM once the first mid-epoch checkpoint exists, then ``--resume``; the result must equal a straight run."""
    flags = ("--preset", "tiny", "--dataset", "digits", "--epochs", "2", "--checkpoint-every", "3")  # 41 steps/epoch
    straight = run_fingerprint(train(side, work, *flags, run="straight"))
    cut = work / "cut"
    with open(work / "cut.log", "w") as log:
        cmd = [sys.executable, "-m", "gmlp_vision", "train", *flags, *COMMON, "--out", str(cut)]
        proc = subprocess.Popen(cmd, cwd=work, env=side.env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None and not (cut / "last.pt").exists():  # written after step 3
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)  # the CLI finishes its step, saves last.pt and exits 143
        code = proc.wait(timeout=TIMEOUT)
    if code != 128 + signal.SIGTERM:
        raise CaseError(f"the run to interrupt exited {code}, not 143 (see {work / 'cut.log'})")
    stopped = torch.load(cut / "last.pt", map_location="cpu", weights_only=True)
    where = "mid-epoch" if stopped["train_state"].get("epoch_progress") else "at an epoch end"
    gmlp(side, work, "train", "--resume", str(cut))
    resumed = run_fingerprint(cut)
    if difference := first_difference(straight, resumed):
        raise CaseError(f"the resumed run differs from the straight run: {difference}")
    return resumed, f"SIGTERM after step {stopped['step']} ({where}); resumed == straight"


def case_predict(side: Side, work: Path, opt: Options) -> Fingerprint:
    out = gmlp(side, work, "predict", str(digits_run(side, opt)), *map(str, opt.images), "--json", "--device", "cpu")
    rows = [{k: v for k, v in json.loads(line).items() if k != "image"} for line in out.splitlines()]
    return {"predictions": rows}, f"{len(rows)} images"


def case_onnx(side: Side, work: Path, opt: Options) -> Fingerprint:
    import onnxruntime as ort

    model = work / "model.onnx"
    gmlp(side, work, "export", str(digits_run(side, opt)), "--check", "--out", str(model))
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    _, chans, px, _ = session.get_inputs()[0].shape  # (B, C, S, S), B dynamic
    pixels = np.random.default_rng(0).integers(0, 256, (16, chans, px, px)).astype(np.float32)  # raw 0..255
    return {"logits": session.run(None, {"pixels": pixels})[0]}, f"{len(pixels)} fixed inputs"


RUN = "weight SHA-256s, history, results"
CASES: dict[str, tuple[Callable[[Side, Path, Options], Fingerprint], str, bool]] = {  # function, compared, CIFAR?
    "digits": (case_digits, RUN, False),
    "seed": (case_seed, RUN, True),
    "cifar10-fast": (case_fast, RUN, True),
    "recipe": (case_recipe, RUN, True),
    "resume": (case_resume, f"resumed run: {RUN}", False),
    "torchrun": (case_torchrun, RUN, False),
    "predict": (case_predict, "JSON lines without the path", False),
    "onnx": (case_onnx, "onnxruntime logits", False),
}


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where ``a`` and ``b`` first differ (a path like ``/last.pt/head.weight``), or None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys(), key=str):
            if key not in a or key not in b:
                return f"{where}/{key}: only in {'base' if key in a else 'new'}"
            if found := first_difference(a[key], b[key], f"{where}/{key}"):
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return next(filter(None, (first_difference(x, y, f"{where}[{i}]") for i, (x, y) in pairs)), None)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape:
        return None if np.array_equal(a, b) else f"{where}: max abs difference {max_gap(a, b):.3g}"
    return None if type(a) is type(b) and a == b else f"{where}: {str(a)[:60]} vs {str(b)[:60]}"


def max_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def checkout(name: str, spec: str | None, worktrees: Path, out: Path) -> Side:
    """This repository's working tree (None), a checkout folder, or a revision checked out as a detached worktree.

    Raises:
        ValueError: ``spec`` is neither a checkout folder (with ``src/gmlp_vision``) nor a revision of this repository.
    """
    if spec is None:
        return Side(name, REPO, f"working tree {git('describe', '--always', '--dirty').stdout.strip()}", out / name)
    if (Path(spec) / "src" / "gmlp_vision").is_dir():
        return Side(name, Path(spec).resolve(), spec, out / name)
    rev = git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    if rev.returncode:
        raise ValueError(f"{spec!r} is neither a checkout folder nor a revision of {REPO}")
    sha = rev.stdout.strip()
    git("worktree", "add", "--detach", str(worktrees / name), sha).check_returncode()
    return Side(name, worktrees / name, f"{spec} ({sha[:10]})", out / name)


def check_imports(side: Side) -> None:
    """Fail unless ``side``'s commands import its own ``src/`` (not the venv's editable install)."""
    side.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", "import gmlp_vision; print(gmlp_vision.__file__)"]
    path = Path(subprocess.run(cmd, cwd=side.out, env=side.env, capture_output=True, text=True).stdout.strip() or "?")
    if not path.resolve().is_relative_to((side.root / "src").resolve()):
        raise RuntimeError(f"the {side.name} side imports {path}, not {side.root / 'src'}")
    print(f"{side.name}: {side.label}, imports {path}", file=sys.stderr)


def write_images(folder: Path) -> list[Path]:
    """Six fixed PNGs: four 8x8 gray (the digits size), a larger gray one and an RGB one (resize, channels)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng, shapes = np.random.default_rng(1234), [(8, 8)] * 4 + [(20, 16), (12, 12, 3)]
    for i, shape in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"img{i}.png")
    return [folder / f"img{i}.png" for i in range(len(shapes))]


def compare(name: str, sides: list[Side], opt: Options) -> dict[str, Any]:
    """Run case ``name`` with each side in turn and compare the two; its row of the table."""
    function, compared, needs_cifar = CASES[name]
    row: dict[str, Any] = {"case": name, "compared": compared, "identical": False, "difference": "a side failed"}
    if needs_cifar and not opt.cifar10.is_file():
        print(f"[{name}] skipped: no CIFAR-10 archive at {opt.cifar10} (--cifar10)", file=sys.stderr)
        return {**row, "identical": None, "difference": f"no {opt.cifar10}"}
    prints: dict[str, dict[str, Any]] = {}
    for side in sides:
        start = time.perf_counter()
        try:
            prints[side.name], note = function(side, side.out / name, opt)
            note = "ok" + f"; {note}" * bool(note)
        except Exception as e:  # a side that fails is a result of the comparison, not the end of it
            note = f"FAILED: {type(e).__name__}: {e}"
        row[side.name] = f"{note} ({time.perf_counter() - start:.0f} s)"
        print(f"[{name}] {side.name}: {row[side.name]}", file=sys.stderr)
    if len(prints) == len(sides):
        base, new = prints["base"], prints["new"]
        row["difference"] = first_difference(base, new)
        row["identical"] = row["difference"] is None
        if "logits" in base and "logits" in new and base["logits"].shape == new["logits"].shape:
            row["max_abs_difference"] = max_gap(base["logits"], new["logits"])
    return row


def table(rows: list[dict[str, Any]], sides: list[Side]) -> str:
    """The Markdown table: case | base | new | compared | identical."""
    lines = [f"| case | base: {sides[0].label} | new: {sides[1].label} | compared | identical |", "|---" * 5 + "|"]
    for r in rows:
        verdict = {True: "yes", False: "NO", None: "skipped"}[r["identical"]]
        verdict += f": {r['difference']}" * (r["difference"] is not None)
        if "max_abs_difference" in r:
            verdict += f" (max abs difference {r['max_abs_difference']:.3g})"
        cells = [r["case"], r.get("base", "-"), r.get("new", "-"), r["compared"], verdict]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="3808bad", help="revision or checkout folder before the change (%(default)s)")
    p.add_argument("--new", help="revision or checkout folder after it (default: this repository's working tree)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: %(default)s")
    p.add_argument("--quick", action="store_true", help="every case on 300 images for one epoch (a smoke run)")
    p.add_argument("--cifar10", type=Path, default=DEFAULT_CIFAR10, help="CIFAR-10 archive (%(default)s)")
    p.add_argument("--out", type=Path, help="folder for the runs and the summary (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the git worktrees made for --base/--new")
    args = p.parse_args(argv)
    names = args.cases.split(",")
    if set(names) - set(CASES):
        p.error(f"--cases: choose from {','.join(CASES)}, got {args.cases!r}")
    out = (args.out or Path(tempfile.mkdtemp(prefix="compare-versions-"))).resolve()
    worktrees, start = Path(tempfile.mkdtemp(prefix="compare-worktrees-")), time.perf_counter()
    try:
        sides = [checkout("base", args.base, worktrees, out), checkout("new", args.new, worktrees, out)]
        for side in sides:
            check_imports(side)
        opt = Options(args.quick, args.cifar10.resolve(), write_images(out / "images"))
        rows = [compare(name, sides, opt) for name in names]
    except (ValueError, RuntimeError) as e:
        print(f"compare_versions: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    finally:
        for path in [] if args.keep else list(worktrees.iterdir()):
            git("worktree", "remove", "--force", str(path))
        if args.keep:
            print(f"worktrees kept under {worktrees}", file=sys.stderr)
        else:
            shutil.rmtree(worktrees, ignore_errors=True)
    wall = time.perf_counter() - start
    md = table(rows, sides) + f"\n\n{'quick' if args.quick else 'full'} run, wall time {wall:.0f} s\n"
    (out / "summary.md").write_text(md)
    summary = {"base": sides[0].label, "new": sides[1].label, "quick": args.quick, "wall_seconds": round(wall, 1)}
    (out / "summary.json").write_text(json.dumps({**summary, "cases": rows}, indent=2) + "\n")
    print(md + f"runs and summary in {out}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
