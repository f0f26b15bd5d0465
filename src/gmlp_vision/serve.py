"""``gmlp serve``: a trained model behind HTTP, with dynamic batching and a demo page.

Built on FastAPI and uvicorn (the ``serve`` extra) rather than a server of our own: uvicorn parses HTTP (h11),
limits header sizes, shuts down gracefully on SIGTERM (requests in flight finish, then exit 0), and FastAPI gives
the OpenAPI schema and docs (``/docs``). LitServe would bring its own process model and queue on top of the same
FastAPI; the batching here is a few lines of asyncio in front of one model, where its cost can be measured.

- ``POST /predict``: an image as the raw body, or multipart with the field ``image``; ``?top_k=N``. The top-k classes
  and probabilities as JSON. Concurrent requests are gathered (`Batcher`) into one batch of up to ``max_batch``
  images, waiting at most ``max_wait_ms`` after the first, and run once.
- ``GET /health``, ``GET /metadata`` (classes, input size and channels, resize rule, precision, version), ``GET /``
  the demo page (no external scripts or fonts), ``GET /docs`` and ``/openapi.json``.
- Hardening: a body cap (``max_body``, checked on the declared length and while reading), the image-format allow-list,
  pixel and bomb limits of `images.open_image`, a per-request timeout, no path or URL is ever read on a request's
  word, CORS off unless origins are given. A bad request gets a 4xx JSON ``{"error": ...}`` and the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from torch import Tensor

from gmlp_vision.errors import ConfigError, ImageError, first_line
from gmlp_vision.metrics import top_classes
from gmlp_vision.version import __version__

RAW_TYPES = ("image/", "application/octet-stream")  # raw bodies: an image's bytes
MULTIPART = "multipart/form-data"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class Classifier(Protocol):
    """What the server needs of a model: `predict.Classifier` (this module loads none itself)."""

    classes: tuple[str, ...]
    image_size: int
    in_chans: int
    resize: str
    crop_pct: float
    precision: str

    def preprocess(self, images: Sequence[Any]) -> Tensor: ...

    def probabilities(self, pixels: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class ServeOptions:
    """How the server batches, caps and times requests."""

    max_batch: int = 32  # images run together at most
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_body: int = 20 * 1024 * 1024  # bytes of a request body
    timeout: float = 30.0  # seconds a request may take, reading its body included
    top_k: int = 5  # classes returned unless the request asks for fewer or more
    cors: tuple[str, ...] = ()  # origins allowed to call from a browser page of theirs (none: CORS off)

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError(f"--max-batch must be in 1..4096, got {self.max_batch}")
        if not (math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms <= 10_000):
            raise ConfigError(f"--max-wait-ms must be in 0..10000, got {self.max_wait_ms}")
        if not 1 <= self.max_body <= 1 << 31:
            raise ConfigError(f"--max-body-mb must give 1 byte to 2 GiB, got {self.max_body} bytes")
        if not (math.isfinite(self.timeout) and 0 < self.timeout <= 3600):
            raise ConfigError(f"--timeout must be in (0, 3600] seconds, got {self.timeout}")


class Batcher:
    """Gathers concurrent requests' preprocessed images into batches and runs each batch once, in one thread.

    A batch waits for more images (up to ``max_wait_ms`` after its first) only while other requests are on their way
    (``coming``: counted by `arriving`), so a lone request runs at once. ``batches`` and ``images`` count what ran
    (``/health`` reports them).
    """

    def __init__(self, classifier: Classifier, max_batch: int, max_wait_ms: float) -> None:
        self.classifier, self.max_batch, self.max_wait = classifier, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue[tuple[Tensor, asyncio.Future[Tensor]]] = asyncio.Queue()
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="gmlp-model")  # the model runs one batch at a time
        self.batches = self.images = 0
        self.coming = 0  # requests on their way here (reading or decoding): worth waiting for
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.runner.shutdown(wait=False)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Count a request as on its way for the block (its body read and decoded), so that batches wait for it."""
        self.coming += 1
        try:
            yield
        finally:
            self.coming -= 1

    async def submit(self, pixels: Tensor) -> Tensor:
        """The probabilities of one preprocessed image (C, S, S), run in a batch with whatever else is waiting."""
        done: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        await self.queue.put((pixels, done))
        return await done

    async def _gather(self) -> list[tuple[Tensor, asyncio.Future[Tensor]]]:
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(items) < self.max_batch:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0 or not self.coming:  # nobody else on the way: a lone request does not wait
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return [(x, f) for x, f in items if not f.done()]  # a caller that timed out is not run

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            live = await self._gather()
            if not live:
                continue
            batch = torch.stack([x for x, _ in live])
            try:
                probs = await loop.run_in_executor(self.runner, self.classifier.probabilities, batch)
            except Exception as e:  # the model failed: every caller of the batch is told, the loop goes on
                for _, done in live:
                    if not done.done():
                        done.set_exception(e)
                continue
            self.batches, self.images = self.batches + 1, self.images + len(live)
            for (_, done), row in zip(live, probs, strict=True):
                if not done.done():
                    done.set_result(row)


def demo_page() -> str:
    """The demo page's HTML (package data: ``gmlp_vision/serve_page.html``), self-contained."""
    return resources.files("gmlp_vision").joinpath("serve_page.html").read_text(encoding="utf-8")


def metadata(classifier: Classifier, source: str, options: ServeOptions) -> dict[str, Any]:
    """What ``GET /metadata`` says of the model and the server."""
    return {
        "model": source,
        "classes": list(classifier.classes),
        "image_size": classifier.image_size,
        "in_chans": classifier.in_chans,
        "resize": classifier.resize,
        "crop_pct": classifier.crop_pct,
        "precision": classifier.precision,
        "gmlp_vision": __version__,
        "max_batch": options.max_batch,
        "max_wait_ms": options.max_wait_ms,
        "max_body": options.max_body,
        "top_k": min(options.top_k, len(classifier.classes)),
    }


class RequestError(Exception):
    """A request the server refuses: its HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, cap: int) -> bytes:
    """The request's body, refused (413) as soon as it declares or sends more than ``cap`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "Content-Length is not a number")
        if int(declared) > cap:
            raise RequestError(413, f"the body ({int(declared):,d} bytes) is larger than the cap, {cap:,d} bytes")
    body = bytearray()  # one growing buffer, given back whole: no heap of small chunks left behind
    async for chunk in request.stream():
        if len(body) + len(chunk) > cap:
            raise RequestError(413, f"the body is larger than the cap, {cap:,d} bytes")
        body += chunk
    return bytes(body)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def image_bytes(request: Request, cap: int) -> bytes:
    """The image a request carries: its raw body, or the multipart field ``image``."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (kind.startswith(RAW_TYPES) or kind == MULTIPART):
        raise RequestError(415, f"send an image as the body (image/*) or as multipart field 'image', not {kind!r}")
    body = await read_body(request, cap)
    if kind == MULTIPART:
        parser = MultiPartParser(request.headers, _once(body), max_files=1, max_fields=8, max_part_size=cap)
        parser.spool_max_size = cap  # in memory: the body is capped already
        try:
            form = await parser.parse()
        except Exception as e:  # a malformed multipart body: Starlette's own errors, or the part limits
            raise RequestError(400, f"cannot read the multipart body: {first_line(e, 200)}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "the multipart body has no file field 'image'")
        body = await upload.read()
    if not body:
        raise RequestError(400, "the request holds no image (an empty body)")
    return body


def ranked(probs: Tensor, classes: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` classes of one image's probabilities, most probable first (`metrics.top_classes`)."""
    return [{"index": i, "name": classes[i], "probability": p} for i, p in top_classes(probs[None], top_k)[0]]


def create_app(classifier: Classifier, source: str, options: ServeOptions = ServeOptions()) -> FastAPI:
    """The FastAPI application serving ``classifier`` (``source``: what ``/metadata`` calls the model)."""
    batcher = Batcher(classifier, options.max_batch, options.max_wait_ms)
    decoder = ThreadPoolExecutor(2, thread_name_prefix="gmlp-decode")  # images decode beside the model's runs
    bodies = asyncio.Semaphore(16)  # bodies held at once: 16 x the cap at most; the rest wait in the kernel's buffers
    info = metadata(classifier, source, options)
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()
        decoder.shutdown(wait=False)

    described = f"A gMLP image classifier ({len(classifier.classes)} classes) from {source}."
    app = FastAPI(title="gmlp-vision", version=__version__, lifespan=lifespan, description=described)
    if options.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors), allow_methods=["GET", "POST"])

    app.add_exception_handler(RequestError, _refused)  # every error a JSON {"error": ...}, 404 and 405 too
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)

    async def answer(request: Request, top_k: int) -> JSONResponse:
        async with bodies:  # a bounded number of bodies in memory at once, however many callers
            with batcher.arriving():
                data = await image_bytes(request, options.max_body)
                try:
                    pixels = await asyncio.get_running_loop().run_in_executor(decoder, classifier.preprocess, [data])
                except ImageError as e:
                    raise RequestError(422, str(e)) from None
        probs = await batcher.submit(pixels[0])
        return JSONResponse({"predictions": ranked(probs, classifier.classes, top_k)})  # plain JSON: no re-encoding

    @app.post("/predict", summary="Classify one image (raw body or multipart field 'image')")
    async def predict(request: Request, top_k: int | None = None) -> JSONResponse:
        k = min(options.top_k, len(classifier.classes)) if top_k is None else top_k
        if not 1 <= k <= len(classifier.classes):
            raise RequestError(400, f"top_k must be in 1..{len(classifier.classes)}, got {k}")
        try:
            return await asyncio.wait_for(answer(request, k), options.timeout)
        except TimeoutError:
            raise RequestError(408, f"the request took longer than {options.timeout:g} s") from None

    @app.get("/health", summary="Liveness, and what the batcher ran")
    async def health() -> dict[str, Any]:
        batches, images = batcher.batches, batcher.images
        return {"status": "ok", "uptime_s": round(time.monotonic() - started, 3), "batches": batches, "images": images}

    @app.get("/metadata", summary="The model: classes, input, resize rule, precision; the server's limits")
    async def describe() -> dict[str, Any]:
        return info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return demo_page()

    return app


async def _refused(request: Request, error: Exception) -> JSONResponse:
    status = error.status if isinstance(error, RequestError) else 400
    return JSONResponse({"error": str(error)}, status_code=status)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)


async def _invalid(request: Request, error: Exception) -> JSONResponse:  # ?top_k=abc
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)


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


def serve(app: FastAPI, sock: socket.socket, timeout: float) -> None:
    """Run ``app`` on ``sock`` with uvicorn until SIGINT or SIGTERM; requests in flight finish first."""
    _return_large_buffers()
    settings = dict(log_level="warning", timeout_keep_alive=5, limit_concurrency=1024, access_log=False)
    config = uvicorn.Config(app, timeout_graceful_shutdown=int(timeout) + 1, **settings)
    _Server(config).run(sockets=[sock])


__all__ = ["Batcher", "RequestError", "ServeOptions", "bind", "create_app", "demo_page", "metadata", "serve"]
