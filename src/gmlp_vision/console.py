"""The run's lines on the terminal: the ``gmlp`` command's logging, and ``train(verbose=1)``'s for Python callers.

The library logs (``logging.getLogger("gmlp_vision")``); where the lines go is decided here alone. The command sets up
the root logger (`log_to_terminal`); `train` with ``verbose=1`` adds the same two handlers for the run only where no
logging is set up (`run_lines`), so that a notebook shows the epoch lines and a program with its own logging keeps it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
from collections.abc import Iterator

from gmlp_vision.errors import printable

LOGGER = "gmlp_vision"


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING


class _TerminalSafe(logging.Formatter):
    """The message alone, terminal-safe: it may quote class or file names (`errors.printable`), one line each."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone (``gmlp info ... | head -2``): poll says POLLERR."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor (tests, notebooks)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLERR)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def drop_stdout() -> None:
    """Send the rest of standard output to /dev/null, so that nothing fails to write it again (not even at exit)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class _Stdout(logging.StreamHandler):  # type: ignore[type-arg]
    """The log's stdout handler: when the reader has gone, the rest of the log is dropped and the command goes on."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError) and stdout_gone():
            drop_stdout()
            return
        super().handleError(record)


def log_to_terminal(level: int) -> None:
    """The ``gmlp`` command's log: progress and results on stdout; warnings and errors on stderr (never in ``--json``).

    A run whose reader goes (``gmlp train ... | head``) keeps training, its log dropped: the run folder holds the rest.
    """
    logging.basicConfig(level=level, handlers=_handlers(), force=True)


def _handlers() -> list[logging.Handler]:
    out, err = _Stdout(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(_below_warning)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(_TerminalSafe("%(message)s"))
    return [out, err]


@contextlib.contextmanager
def run_lines(shown: bool) -> Iterator[None]:
    """For the block, the library's INFO lines on stdout and warnings on stderr, where no logging is set up.

    ``shown``: this process prints (rank 0); elsewhere only warnings show. A logger with handlers of its own, here or
    above it (the command's root handlers, a program's ``logging.basicConfig``), is left as it is.
    """
    logger = logging.getLogger(LOGGER)
    if logger.hasHandlers():
        yield
        return
    handlers, level = _handlers(), logger.level
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if shown else logging.WARNING)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)


__all__ = ["drop_stdout", "log_to_terminal", "run_lines", "stdout_gone"]
