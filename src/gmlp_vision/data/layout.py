"""Which image files are which split, before any is decoded: image folders in three layouts, and CSV/TSV tables.

Every layout comes to one `Files`: the classes, and the labelled files of the training split, the evaluation split
(``test``) and, where the data has both a validation and a test part, the validation split.

- Folders: ``DIR/train/`` with ``DIR/val/`` or ``DIR/test/`` (with both, ``val/`` is the validation split and
  ``test/`` the final evaluation); ``DIR/train/`` alone; or ``DIR/<class>/`` directly.
- Tables (``--dataset csv``): a ``.csv`` or ``.tsv`` with a header naming a ``path`` and a ``label`` column and
  optionally a ``split`` column (``train``, ``val``, ``test``); paths are relative to the table's folder.

Data without an evaluation part (``train/`` alone, class folders, a table without ``val``/``test`` rows) gets a
stratified hold-out: `hold_out` sets aside ``holdout`` of each class's files, picked by a fixed seed, as the test
split. The files it picked are recorded (`Files.holdout`, relative paths) and a run stores them, so that a resumed
run and ``gmlp evaluate`` test on the same files (`LoadOptions.holdout_files`) even after files were added.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from gmlp_vision.errors import DataError, printable
from gmlp_vision.images import IMAGE_EXTENSIONS
from gmlp_vision.untrusted import read_json_file

Labelled = list[tuple[Path, int]]  # image files and their class indices
HOLDOUT_SEED = 0  # the hold-out depends on the files alone, not on a run's --seed: runs compare on the same images
MAX_TABLE_BYTES = 256 * 1024**2  # a label table larger than this is refused (a few million rows)
PATH_COLUMNS = ("path", "file", "filename", "image", "filepath")
LABEL_COLUMNS = ("label", "class", "category")
SPLITS = ("train", "val", "test")
HOLDOUT_FILE = "holdout.json"  # in a run directory: the files its data held out for testing
HOLDOUT_LIMIT = 256 * 1024**2


@dataclass(frozen=True)
class Files:
    """The labelled image files of each split, and how they were found."""

    root: Path  # where relative names (the hold-out's) start: the folder, or the table's folder
    classes: list[str]
    train: Labelled
    test: Labelled
    test_split: str  # what the evaluation split is called: val, test (folders, tables) or holdout
    layout: str  # one phrase for the log: "train/ and val/", "class folders, 20% of each class held out", ...
    val: Labelled | None = None  # a validation split of the data's own (train/ + val/ + test/, or val and test rows)
    holdout: tuple[str, ...] = ()  # the held-out files, relative to ``root``, when `hold_out` made the test split


def relative(path: Path, root: Path) -> str:
    """``path`` as the hold-out records it: relative to ``root`` where it lies under it, else as given."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def hold_out(files: Labelled, root: Path, fraction: float, chosen: tuple[str, ...] | None) -> tuple[Labelled, Labelled]:
    """Training and held-out files: ``fraction`` of each class (at least one of a class of two or more), or ``chosen``.

    Each class's files are put in an order drawn from `HOLDOUT_SEED` and the class's index; the first
    ``round(fraction * n)`` are held out. ``chosen`` (a run's recorded hold-out) names them instead.

    Raises:
        DataError: a ``chosen`` file that is no longer among ``files``; no file held out.
    """
    if chosen is not None:
        names = set(chosen)
        held = [(p, c) for p, c in files if relative(p, root) in names]
        if len(held) != len(names):
            found = {relative(p, root) for p, _ in held}
            missing = sorted(names - found)
            raise DataError(f"the run's held-out images are not all in {root} any more: {missing[0]} is gone")
        return [(p, c) for p, c in files if relative(p, root) not in names], held
    by_class: dict[int, Labelled] = {}
    for item in files:
        by_class.setdefault(item[1], []).append(item)
    train, held = [], []
    for label, items in sorted(by_class.items()):
        order = list(range(len(items)))
        random.Random(f"{HOLDOUT_SEED}/{label}").shuffle(order)
        k = min(max(round(fraction * len(items)), 1 if len(items) > 1 else 0), len(items) - 1)
        held += [items[i] for i in sorted(order[:k])]
        train += [items[i] for i in sorted(order[k:])]
    if not held:
        raise DataError(f"--holdout {fraction:g} holds out no image of {root}: give it a test split or more images")
    return train, held


def class_files(split_dir: Path) -> dict[str, list[Path]]:
    """``split_dir``'s class folders (sorted, hidden ones skipped) and each one's image files (sorted, recursive)."""
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} holds no class folders (expected {split_dir}/<class>/<images>)")
    files = {}
    for folder in classes:
        images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DataError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files[folder.name] = images
    return files


def labelled(files: dict[str, list[Path]], classes: list[str]) -> Labelled:
    """Every file of ``files`` with its class's index in ``classes``, class by class."""
    return [(p, classes.index(c)) for c in classes for p in files[c]]


def _same_classes(train: dict[str, list[Path]], other: dict[str, list[Path]], name: str) -> None:
    if set(train) != set(other):
        only_train, only_other = sorted(set(train) - set(other)), sorted(set(other) - set(train))
        raise DataError(
            f"class folders differ between train/ and {name}/: only in train: {only_train or 'none'}; "
            f"only in {name}: {only_other or 'none'}"
        )


def folder_files(root: Path, fraction: float, chosen: tuple[str, ...] | None = None) -> Files:
    """The files of an image folder in any of its three layouts (the module doc).

    Raises:
        DataError: a missing folder, no class folders, an empty class, class sets that differ between splits.
    """
    if not root.is_dir():
        raise DataError(f"{root} is not a folder (expected class folders, with or without train/ and val/ or test/)")
    if not (root / "train").is_dir():
        files = class_files(root)
        classes = sorted(files)
        train, test = hold_out(labelled(files, classes), root, fraction, chosen)
        layout = f"class folders, {fraction:.0%} of each class held out for testing"
        return Files(root, classes, train, test, "holdout", layout, holdout=_names(test, root))
    train_files = class_files(root / "train")
    classes = sorted(train_files)
    present = [n for n in ("val", "test") if (root / n).is_dir()]
    if not present:
        train, test = hold_out(labelled(train_files, classes), root, fraction, chosen)
        layout = f"train/ alone, {fraction:.0%} of each class held out for testing"
        return Files(root, classes, train, test, "holdout", layout, holdout=_names(test, root))
    splits = {}
    for name in present:
        splits[name] = class_files(root / name)
        _same_classes(train_files, splits[name], name)
    train = labelled(train_files, classes)
    if len(present) == 2:
        val, test = labelled(splits["val"], classes), labelled(splits["test"], classes)
        return Files(root, classes, train, test, "test", "train/, val/ (validation) and test/", val=val)
    return Files(root, classes, train, labelled(splits[present[0]], classes), present[0], f"train/ and {present[0]}/")


def _names(files: Labelled, root: Path) -> tuple[str, ...]:
    return tuple(relative(p, root) for p, _ in files)


def table_files(table: Path, fraction: float, chosen: tuple[str, ...] | None = None) -> Files:
    """The files a CSV or TSV of ``path,label[,split]`` rows names (the module doc); classes sorted by name.

    Raises:
        DataError: a missing or unreadable table, no header with a path and a label column, a bad row (an empty
            field, an unknown split, a file that does not exist), named by its line.
    """
    rows = _table_rows(table)
    root = table.parent
    by_split: dict[str, list[tuple[Path, str]]] = {name: [] for name in SPLITS}
    first: dict[Path, tuple[int, str]] = {}  # each file's first row: a file in two splits would leak into the test
    for line, (path_text, label, split) in rows:
        path = Path(path_text)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise DataError(f"{table} line {line}: no image file {path_text}")
        seen, other = first.setdefault(path.resolve(), (line, split))
        if other != split:
            raise DataError(f"{table} line {line}: {path_text} is in the {split} split and (line {seen}) in {other}")
        by_split[split].append((path, label))
    classes = sorted({label for items in by_split.values() for _, label in items})
    if not by_split["train"]:
        raise DataError(f"{table} has no training rows (rows with no split column, or split train)")
    index = {c: i for i, c in enumerate(classes)}
    train, val, test = ([(p, index[c]) for p, c in by_split[name]] for name in SPLITS)
    missing = sorted(set(classes) - {c for _, c in by_split["train"]})
    if missing:
        raise DataError(f"{table}: class {missing[0]} has val or test rows but no training rows")
    if test and val:
        return Files(root, classes, train, test, "test", f"{table.name}: train, val and test rows", val=val)
    if test or val:
        name = "test" if test else "val"
        return Files(root, classes, train, test or val, name, f"{table.name}: train and {name} rows")
    train, test = hold_out(train, root, fraction, chosen)
    layout = f"{table.name} without a split column, {fraction:.0%} of each class held out for testing"
    return Files(root, classes, train, test, "holdout", layout, holdout=_names(test, root))


def _table_rows(table: Path) -> list[tuple[int, tuple[str, str, str]]]:
    """The table's rows as (line number, (path, label, split)); the split is ``train`` where the table has none."""
    try:
        if table.stat().st_size > MAX_TABLE_BYTES:
            raise DataError(f"{table} is larger than {MAX_TABLE_BYTES // 1024**2} MB: not a label table")
        text = table.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{table} is not UTF-8 text: not a label table") from None
    except OSError as e:
        raise DataError(f"cannot read {table}: {e.strerror or e}") from None
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader, [])]
    path_col = next((header.index(n) for n in PATH_COLUMNS if n in header), None)
    label_col = next((header.index(n) for n in LABEL_COLUMNS if n in header), None)
    if path_col is None or label_col is None:
        raise DataError(f"{table}'s first line must name its columns: path and label (and optionally split)")
    split_col = header.index("split") if "split" in header else None
    rows = []
    for line, fields in enumerate(reader, start=2):
        if not any(f.strip() for f in fields):
            continue  # blank lines
        if len(fields) != len(header):
            raise DataError(f"{table} line {line}: {len(fields)} fields, the header has {len(header)}")
        path, label = fields[path_col].strip(), fields[label_col].strip()
        split = fields[split_col].strip().lower() if split_col is not None else "train"
        if not path or not label:
            raise DataError(f"{table} line {line}: an empty {'path' if not path else 'label'}")
        if split not in SPLITS:
            raise DataError(f"{table} line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
        rows.append((line, (path, label, split)))
    if not rows:
        raise DataError(f"{table} has no rows under its header")
    return rows


def read_holdout(run_dir: Path) -> tuple[str, ...] | None:
    """The hold-out a run recorded (``RUN_DIR/holdout.json``), or None where it has none.

    Raises:
        CheckpointError: an unreadable file, or not JSON.
        DataError: JSON of another shape.
    """
    path = run_dir / HOLDOUT_FILE
    if not path.exists():
        return None
    value = read_json_file(path, HOLDOUT_LIMIT)
    files = value.get("test") if isinstance(value, dict) else None
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise DataError(f"{printable(path)} is no hold-out record: it needs a non-empty list of paths under 'test'")
    return tuple(files)


def describe_counts(files: Files) -> str:
    """The split sizes in one phrase: ``"900 train / 100 holdout images"``."""
    parts = [f"{len(files.train)} train"]
    if files.val is not None:
        parts.append(f"{len(files.val)} val")
    parts.append(f"{len(files.test)} {files.test_split}")
    return " / ".join(parts) + " images"


__all__ = [
    "HOLDOUT_FILE",
    "Files",
    "describe_counts",
    "read_holdout",
    "folder_files",
    "hold_out",
    "relative",
    "table_files",
]
