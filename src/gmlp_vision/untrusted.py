"""Reading files that may come from anyone: regular files only, of a bounded size, and JSON of a bounded depth.

An export folder or a run directory can be a download. Any name in it can be a symlink to ``/dev/zero`` (read
forever), a FIFO (an open that blocks forever), a folder, or a file of gigabytes where kilobytes belong.
`read_regular_file` checks the path (``os.stat``, symlinks followed) before opening it, opens it with ``O_NONBLOCK``
(so a FIFO swapped in after that check cannot block the open), checks the opened descriptor again (``fstat``: a
regular file no larger than the cap) and reads the size it states, refusing a file that grows meanwhile.
`read_json_file` also refuses JSON nested deeper than `MAX_JSON_DEPTH`. Every refusal is a one-line
`CheckpointError` naming the file (terminal-safe) and, for a file too large, the cap.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from gmlp_vision.errors import CheckpointError, first_line, printable

MAX_JSON_DEPTH = 32  # an export's config.json nests 3 levels, results.json 2
JSON_LIMIT = 16 << 20  # a config.json or results.json: the names of 22,000 classes take ~1 MB
_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


def size_text(size: int) -> str:
    """A byte count as the cap is stated: ``1 MiB``, ``2 GiB``, ``512 KiB``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size:,} bytes"


def _check_mode(mode: int, shown_path: str) -> None:
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "a special file")
        raise CheckpointError(f"{shown_path} is not a regular file ({kind}); refusing to read it")


def read_regular_file(path: str | Path, limit: int, missing: str = "") -> bytes:
    """The bytes of ``path``, a regular file (symlinks followed) of at most ``limit`` bytes.

    Args:
        path: the file.
        limit: the largest size accepted, in bytes (the message states it).
        missing: appended to the "not found" message, e.g. what to pass instead.

    Raises:
        CheckpointError: missing, not a regular file, larger than ``limit``, or unreadable.
    """
    shown_path = printable(path)
    try:
        _check_mode(os.stat(path).st_mode, shown_path)  # before opening: opening a device can act on it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{shown_path} not found{missing}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise CheckpointError(f"cannot read {shown_path}: {_why(e)}") from None
    with open(fd, "rb") as f:  # owns fd: closed on every path
        try:
            info = os.fstat(fd)
            _check_mode(info.st_mode, shown_path)  # what was opened, not what the name pointed to before
            if info.st_size > limit:
                raise CheckpointError(
                    f"{shown_path} is larger than {size_text(limit)} ({info.st_size:,} bytes); refusing to read it"
                )
            data = f.read(info.st_size + 1)  # read() allocates what it is asked for: the size, not the cap
        except OSError as e:
            raise CheckpointError(f"cannot read {shown_path}: {_why(e)}") from None
    if len(data) > info.st_size:
        raise CheckpointError(f"{shown_path} grew while it was read; refusing it")
    return data


def _why(error: Exception) -> str:
    return printable(getattr(error, "strerror", None) or first_line(error))


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar: 0), counted without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


def read_json_file(path: str | Path, limit: int, missing: str = "") -> Any:
    """The JSON value in ``path``, read by `read_regular_file`, nested at most `MAX_JSON_DEPTH` levels.

    Raises:
        CheckpointError: as `read_regular_file`, or not JSON, or nested too deeply.
    """
    data = read_regular_file(path, limit, missing)
    too_deep = f"{printable(path)} nests JSON deeper than {MAX_JSON_DEPTH} levels; refusing it"
    try:
        value = json.loads(data)
    except RecursionError:  # json's own recursion, for input nested thousands of levels deep
        raise CheckpointError(too_deep) from None
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are no text
        raise CheckpointError(f"{printable(path)} is not JSON: {printable(first_line(e, 120))}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise CheckpointError(too_deep)
    return value


__all__ = ["JSON_LIMIT", "MAX_JSON_DEPTH", "json_depth", "read_json_file", "read_regular_file", "size_text"]
