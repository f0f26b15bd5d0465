"""``gmlp predict``: classify image files, as lines for people, JSON lines, or a table for the next tool."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gmlp_vision.cli.common import add_tta, cpu_threads_for, device_flag, positive_int
from gmlp_vision.errors import ImageError, printable


def _cmd_predict(args: argparse.Namespace) -> int:
    from gmlp_vision.images import expand_inputs
    from gmlp_vision.outputs import open_predictions, output_format
    from gmlp_vision.predict import Classifier
    from gmlp_vision.runtime import resolve_device

    if args.output is not None:
        output_format(args.output)  # an unknown suffix is refused before any model or image is read
    device = resolve_device(args.device)
    cpu_threads_for(device)
    classifier = Classifier.load(args.checkpoint, device, batch_size=args.batch_size, tta=args.tta)
    files = expand_inputs(args.images)
    top_k = min(args.top_k, len(classifier.classes))
    try:
        if args.output is None:
            for preds in _predicted(classifier, files, args):
                for pred in preds:  # an unreadable file is said on stderr (by _predicted); --json keeps its line
                    if pred.error is None or args.json:
                        print(_prediction_line(pred, args.json), flush=True)
            return 0
        with open_predictions(args.output, top_k) as out:
            for preds in _predicted(classifier, files, args):
                out.write(preds)
    except ImageError as e:
        raise ImageError(f"{e} (pass --skip-bad-images to predict the other files)") from None
    skipped = f", {out.errors} unreadable (see the error column)" if out.errors else ""
    print(f"{out.rows} predictions written to {printable(args.output)}{skipped}")
    return 0


def _predicted(classifier: Any, files: list[Path], args: argparse.Namespace) -> Iterator[list[Any]]:
    """The predictions a batch at a time, so that results appear while a large folder is still being read."""
    for start in range(0, len(files), args.batch_size):
        preds = classifier.predict(files[start : start + args.batch_size], args.top_k, args.skip_bad_images)
        for pred in preds:
            if pred.error is not None:
                print(f"gmlp: skipped: {printable(pred.error)}", file=sys.stderr, flush=True)
        yield preds


def _prediction_line(pred: Any, as_json: bool) -> str:
    """One image's line: JSON (json.dumps escapes every control and non-ASCII character), or text for people.

    File and class names are data: in text, their control characters are shown as escapes (`errors.printable`), so
    a name cannot add lines, move the cursor or recolour the terminal.
    """
    if as_json:
        return json.dumps(pred.to_dict())
    scores = ", ".join(f"{printable(s.name)} {100 * s.probability:.1f}%" for s in pred.top_k)
    return f"{printable(pred.source)}: {scores}"


def add_predict(sub: Any) -> None:
    """Add ``predict`` to the ``gmlp`` subparsers."""
    p = sub.add_parser("predict", help="classify image files with a trained model")
    p.add_argument(
        "checkpoint",
        metavar="MODEL",
        help="a checkpoint (best.pt, last.pt), a run directory, an export folder (model.safetensors + config.json, or "
        "model.onnx), an .onnx file (needs onnxruntime), or an export's Hugging Face Hub id ORG/NAME (needs the hub "
        "extra)",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (searched recursively), globs")
    p.add_argument("--top-k", type=positive_int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image and line")
    p.add_argument(
        "--output",
        metavar="FILE",
        help="write a table instead: .csv, .tsv, .jsonl or .parquet (needs pyarrow), one row per image: path, "
        "class_1, probability_1, ..., error",
    )
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="an unreadable image is reported (stderr, the error column) and the others are predicted",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: 64)")
    p.add_argument("--device", type=device_flag, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_tta(p)
    p.set_defaults(func=_cmd_predict)
