"""The ``gmlp serve`` process: its listening socket, uvicorn until SIGINT or SIGTERM, and its memory.

The application it runs is `serve.create_app`'s; this module only hosts it: a socket bound before serving (so the
address is printed before the first request), uvicorn's graceful shutdown ending in a return (exit 0), and glibc told
to give large request bodies back to the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from gmlp_vision.errors import ConfigError

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: a free one), so the address is known before serving.

    Raises:
        ConfigError: the address cannot be bound (in use, no permission, unknown host).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, ended by SIGINT or SIGTERM with a return: `gmlp serve` exits 0 once requests are answered.

    uvicorn >= 0.29 raises the signal again after its graceful shutdown (for supervisors), which would end the
    process by the signal instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _return_large_buffers() -> None:
    """glibc: every allocation of 1 MiB or more mmapped, so a request body given back is given back to the system.

    By default glibc raises that threshold to the size of the largest block freed so far (up to 32 MiB), after which
    the bodies of large requests land on the heap and stay in the server's resident memory (measured with
    ``benchmarks/bench_serve.py``: +240 MB after 350 hostile requests). Elsewhere than glibc nothing is changed.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def header_deadline(timeout: float) -> type[asyncio.Protocol] | str:
    """The HTTP protocol for uvicorn: its httptools one, with a deadline for each request's headers.

    The headers must be in ``timeout`` seconds after the connection or the request's first byte, or the connection
    is closed ("auto", no deadline, without httptools). uvicorn has none: a connection that sends nothing, or a
    header a byte at a time, would be held for ever, and ``limit_concurrency`` such connections would shut everyone
    else out.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class HeaderDeadline(HttpToolsProtocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self.deadline is None:  # the next request on a kept-alive connection
                self.arm()

        def on_headers_complete(self) -> None:
            self.disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def arm(self) -> None:
            self.deadline = self.loop.call_later(timeout, self.too_slow)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def too_slow(self) -> None:
            self.deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def serve(app: Any, sock: socket.socket, timeout: float) -> None:
    """Run ``app`` on ``sock`` with uvicorn until SIGINT or SIGTERM; requests in flight finish first.

    ``timeout``: the seconds a request's headers may take (`header_deadline`), and the grace period at shutdown.
    """
    _return_large_buffers()
    settings = dict(log_level="warning", timeout_keep_alive=5, limit_concurrency=1024, access_log=False)
    config = uvicorn.Config(app, timeout_graceful_shutdown=int(timeout) + 1, http=header_deadline(timeout), **settings)
    _Server(config).run(sockets=[sock])


__all__ = ["bind", "serve"]
