"""The rules every config field obeys: its type, its choices, its range; and the helpers the groups check with.

Library callers and JSON files are not argparse, so nothing here trusts a value's type: an integer given for a float
becomes that float, and nothing else is converted.
"""

from __future__ import annotations

import functools
import math
import re
import typing
from dataclasses import field, fields
from typing import Any

from gmlp_vision.errors import ConfigError, shown

MAX_IMAGE_SIZE = 16_384  # pixels per side: far beyond any gMLP input, far below sizes whose patches overflow
MAX_TOKENS = 65_536  # a 256 x 256 patch grid: its spatial projections alone hold 4.3G weights per block
MAX_INT = 2**31 - 1  # the largest integer any field takes (but --seed: 0..2**32-1)
MAX_THREADS = 1024  # torch crashes (SIGSEGV) when asked for 100,000 threads; no machine has more than this many cores


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field whose help text (and choices) become the CLI flag's."""
    return field(default=default, metadata={"help": help, "choices": choices})


def flag(name: str) -> str:
    """The command-line flag of field ``name`` (``embed_dim`` -> ``--embed-dim``)."""
    return "--" + name.replace("_", "-")


def require(ok: bool, message: str) -> None:
    """Raise `ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def positive(obj: Any, *names: str) -> None:
    """Each named field of ``obj`` is >= 1."""
    for name in names:
        require(getattr(obj, name) >= 1, f"{flag(name)} must be a positive integer, got {getattr(obj, name)}")


def non_negative(obj: Any, *names: str) -> None:
    """Each named field of ``obj`` is >= 0."""
    for name in names:
        require(getattr(obj, name) >= 0, f"{flag(name)} must be >= 0, got {getattr(obj, name)}")


def fraction(obj: Any, *names: str) -> None:
    """Each named field in [0, 1)."""
    for name in names:
        require(0.0 <= getattr(obj, name) < 1.0, f"{flag(name)} must be in [0, 1), got {getattr(obj, name)}")


def check_device(name: str) -> str:
    """``name`` if it is a device the CLI accepts: auto, cpu, cuda or cuda:N.

    Raises:
        ConfigError: anything else (meta, mps, a typo), naming the flag.
    """
    if not (name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,3}", name)):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {shown(name)}")
    return name


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Each field's value type and whether None is allowed, from the annotations (``str | None`` -> (str, True))."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        kinds = [a for a in args if a is not type(None)] or [hint]
        out[name] = (kinds[0], type(None) in args)
    return out


_KIND_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def check_fields(obj: Any) -> None:
    """Refuse a value of the wrong type, a non-finite float, an int beyond 32 bits, a string outside its choices.

    An integer given for a float field becomes that float; nothing else is converted (``"no"`` is not false, ``8.0`` is
    not an integer).
    """
    for f in fields(obj):
        kind, optional = field_types(type(obj))[f.name]
        value = getattr(obj, f.name)
        if kind not in _KIND_WORDS or (value is None and optional):
            continue  # a group, or an optional value left unset
        if kind is float and type(value) is int:
            value = float(value) if abs(value) < 2**1000 else math.inf  # larger ints overflow float: not finite
            object.__setattr__(obj, f.name, value)  # frozen: __post_init__ is where a field may still be set
        if not (type(value) is kind and (kind is not float or math.isfinite(value))):
            what = _KIND_WORDS[kind] + (" or null" if optional else "")
            raise ConfigError(f"{flag(f.name)} must be {what}, got {shown(value)}")
        if kind is int and f.name != "seed" and abs(value) > MAX_INT:  # torch sizes and counts are 32-bit somewhere
            raise ConfigError(f"{flag(f.name)} must be at most {MAX_INT:,d}, got {shown(value)}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {shown(value)}")
