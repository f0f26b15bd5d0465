"""Exceptions the library raises; the CLI turns each into a one-line message and an exit code."""


class GmlpError(Exception):
    """Base class of every error the library raises on purpose (bad input, not bugs)."""


class ConfigError(GmlpError, ValueError):
    """An impossible or contradictory configuration; the message names the flag."""


class DataError(GmlpError):
    """A dataset that is missing, corrupt, hostile, of the wrong kind, or cannot be downloaded."""


class CheckpointError(GmlpError):
    """A checkpoint that is missing, corrupt, unsafe, or made for another model."""


class ImageError(GmlpError):
    """An image file that is missing, not an image, truncated, too large, or an array of an unusable shape."""


class ExportError(GmlpError):
    """An export that cannot be made or checked (missing optional extra, failed parity check)."""


class ReportError(GmlpError):
    """A run directory that lacks what a report needs, or a missing optional plotting/logging extra."""


class NonFiniteLossError(GmlpError):
    """Training met NaN or infinity (loss, weights, validation loss); the message says where, and what is kept."""


class RunDirBusy(GmlpError):
    """Another process is writing the run directory (training or resuming it); the message names the holder."""


class TrainingInterrupted(GmlpError):
    """SIGINT or SIGTERM stopped training after a step; a resumable checkpoint was saved first."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class KernelUnavailable(RuntimeError):
    """The fused CPU kernels cannot be built or loaded here (the model then takes the PyTorch path)."""


class DamagedLibrary(KernelUnavailable):
    """A built library that must not be loaded as it is (missing digest, wrong bytes, foreign owner): build again."""


def one_line(error: BaseException | str) -> str:
    """``error``'s whole message on one line, for messages that quote one (tarfile's and torch's hold newlines)."""
    return " ".join(str(error).split())


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters (its type's name when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` for a message, shortened with "..." past ``limit`` characters (a hostile file's values)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: object) -> str:
    r"""``text`` safe to show on a terminal: each control or invisible character as its escape, the rest as it is.

    A class name or a file name is data, and data must not move the cursor, recolour the screen or start a new
    output line: ESC, CR, LF and the other C0 and C1 controls, Unicode bidi overrides and line separators, and
    unpaired surrogates (a file name that is not UTF-8) become ``\x1b``, ``\n``, ``\u202e``, ``\udcff`` (as
    ``repr`` writes them, without the quotes); backslashes and all printable text are kept.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
