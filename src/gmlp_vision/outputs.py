"""Prediction files for the next tool: CSV, TSV, JSON lines or parquet, one row per image, chosen by the suffix.

Every format holds the same table: ``path``, then ``class_1``, ``probability_1`` ... ``class_K``, ``probability_K``
(most probable first), then ``error`` (empty, or why the image could not be read). The file is written beside its
final name and renamed there when the last row is in, so a run that stops leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from gmlp_vision.errors import ConfigError
from gmlp_vision.files import replacing, why_not_written


class Ranked(Protocol):
    """What a row is made of: `predict.Prediction` (this module writes tables and needs nothing of the model)."""

    source: str
    top_k: tuple[Any, ...]  # `predict.ClassScore`s: .name, .probability
    error: str | None


FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


def output_format(path: str | Path) -> str:
    """The format ``path``'s suffix names; checked before any image is read.

    Raises:
        ConfigError: another suffix, ``.parquet`` without pyarrow, a folder, or a folder that does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder: name a file in it, such as {path / 'predictions.csv'}")
    if not path.parent.is_dir():
        raise ConfigError(f"--output {path}: there is no folder {path.parent}; make it first, or write elsewhere")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"--output {path}: the file name must end in {', '.join(FORMATS)} (it picks the format)")
    if kind == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--output .parquet needs pyarrow: pip install pyarrow (or write .csv or .jsonl)"
            ) from None
    return kind


def columns(top_k: int) -> list[str]:
    """The table's columns for ``top_k`` classes per image."""
    ranked = [name for k in range(1, top_k + 1) for name in (f"class_{k}", f"probability_{k}")]
    return ["path", *ranked, "error"]


def row(pred: Ranked, top_k: int) -> dict[str, Any]:
    """One image's row: its path, its ``top_k`` classes and probabilities (None where it has fewer), its error."""
    out: dict[str, Any] = {"path": pred.source}
    for k in range(top_k):
        score = pred.top_k[k] if k < len(pred.top_k) else None
        out[f"class_{k + 1}"] = score.name if score else None
        out[f"probability_{k + 1}"] = score.probability if score else None
    out["error"] = pred.error
    return out


class _Text:
    """CSV, TSV or JSON lines, written row by row."""

    def __init__(self, f: TextIO, kind: str, top_k: int) -> None:
        self.f, self.kind, self.top_k = f, kind, top_k
        if kind != "jsonl":
            self.csv = csv.DictWriter(f, columns(top_k), delimiter="\t" if kind == "tsv" else ",", lineterminator="\n")
            self.csv.writeheader()

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.kind == "jsonl":
            self.f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            self.csv.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])


class _Parquet:
    """Parquet through pyarrow, a row group per batch."""

    def __init__(self, path: Path, top_k: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields = [pa.field("path", pa.string())]
        for k in range(1, top_k + 1):
            fields += [pa.field(f"class_{k}", pa.string()), pa.field(f"probability_{k}", pa.float64())]
        self.schema = pa.schema([*fields, pa.field("error", pa.string())])
        self.table = pa.Table
        self.writer = pq.ParquetWriter(str(path), self.schema)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.writer.write_table(self.table.from_pylist(rows, schema=self.schema))


class PredictionWriter:
    """Rows of predictions into ``path`` (its format from the suffix, `output_format`), through `open_predictions`."""

    def __init__(self, sink: _Text | _Parquet, top_k: int) -> None:
        self.sink, self.top_k, self.rows, self.errors = sink, top_k, 0, 0

    def write(self, predictions: Sequence[Ranked]) -> None:
        """Append one row per prediction."""
        self.sink.write([row(p, self.top_k) for p in predictions])
        self.rows += len(predictions)
        self.errors += sum(p.error is not None for p in predictions)


@contextlib.contextmanager
def open_predictions(path: str | Path, top_k: int) -> Iterator[PredictionWriter]:
    """A `PredictionWriter` on a temp file beside ``path``, renamed over ``path`` when the block succeeds.

    Raises:
        ConfigError: an unknown suffix, parquet without pyarrow, a folder, or a missing folder.
        OSError: the folder cannot be written (why, in one line that names it: `files.why_not_written`).
    """
    path = Path(path)
    kind = output_format(path)
    try:
        with replacing(path) as tmp:
            yield from _written(tmp, kind, top_k)
    except OSError as e:
        raise OSError(e.errno, why_not_written(path, e, "write elsewhere with --output")) from None


def _written(tmp: Path, kind: str, top_k: int) -> Iterator[PredictionWriter]:
    """The writer of ``kind`` on ``tmp``, closed when the block ends."""
    if kind == "parquet":
        sink = _Parquet(tmp, top_k)
        try:
            yield PredictionWriter(sink, top_k)
        finally:
            sink.writer.close()
    else:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            yield PredictionWriter(_Text(f, kind, top_k), top_k)


__all__ = ["FORMATS", "PredictionWriter", "columns", "open_predictions", "output_format", "row"]
