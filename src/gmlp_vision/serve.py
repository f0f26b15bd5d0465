"""``gmlp serve``: a trained model behind HTTP, with dynamic batching and a demo page.

Built on FastAPI and uvicorn (the ``serve`` extra) rather than a server of our own: uvicorn parses HTTP (httptools),
limits header sizes (`serve_run` adds a deadline for them), shuts down gracefully on SIGTERM (requests in flight
finish, then exit 0), and FastAPI gives the OpenAPI schema and docs (``/docs``). LitServe would bring its own process
model and queue on top of the same FastAPI; the batching here is a few lines of asyncio in front of one model, where
its cost can be measured.

- ``POST /predict``: an image as the raw body, or multipart with the field ``image``; ``?top_k=N``. The top-k classes
  and probabilities as JSON. Concurrent requests are gathered (`Batcher`) into one batch of up to ``max_batch``
  images, waiting at most ``max_wait_ms`` after the first, and run once. It is answered by `Predict`, a plain ASGI
  application in front of FastAPI (`Front`), which serves the rest and documents it.
- ``GET /health``, ``GET /metadata`` (classes, input size and channels, resize rule, precision, version), ``GET /``
  the demo page (no external scripts or fonts), ``GET /docs`` and ``/openapi.json``.
- Hardening: a body cap (``max_body``, checked on the declared length and while reading), the image-format allow-list,
  pixel and bomb limits of `images.open_image`, a per-request timeout (and one for the headers), no path or URL is
  ever read on a request's word, CORS off unless origins are given. A bad request gets a 4xx JSON ``{"error": ...}``
  and the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from torch import Tensor

from gmlp_vision.errors import ConfigError, ImageError, first_line
from gmlp_vision.metrics import top_classes
from gmlp_vision.serve_requests import PREDICT_DOC, RequestError, image_bytes
from gmlp_vision.version import __version__

log = logging.getLogger("gmlp_vision")
_WHOLE = re.compile(r"[0-9]{1,9}")


class Classifier(Protocol):
    """What the server needs of a model: `predict.Classifier` (this module loads none itself)."""

    classes: tuple[str, ...]
    image_size: int
    in_chans: int
    resize: str
    crop_pct: float
    precision: str
    tta: str

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
    """Gathers concurrent requests' decoded images into batches and runs each batch once, in one thread.

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
        "tta": classifier.tta,
        "gmlp_vision": __version__,
        "max_batch": options.max_batch,
        "max_wait_ms": options.max_wait_ms,
        "max_body": options.max_body,
        "top_k": min(options.top_k, len(classifier.classes)),
    }


def ranked(probs: Tensor, classes: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` classes of one image's probabilities, most probable first (`metrics.top_classes`)."""
    return [{"index": i, "name": classes[i], "probability": p} for i, p in top_classes(probs[None], top_k)[0]]


class Predict:
    """``/predict`` as a plain ASGI application: the body read under its cap, decoded beside the model, batched.

    Errors are JSON ``{"error": ...}`` with their status (`RequestError`); an unexpected failure is a 500 of the
    same shape, and the server goes on. An error's traceback is dropped once answered: through `asyncio.wait_for`'s
    task it forms a reference cycle with the frames that read the body, which would keep each refused body (up to
    the cap) until the garbage collector's next pass (measured: +500 MB after 350 hostile requests).
    """

    def __init__(self, classifier: Classifier, options: ServeOptions) -> None:
        self.classifier, self.options = classifier, options
        self.batcher = Batcher(classifier, options.max_batch, options.max_wait_ms)
        self.decoder = ThreadPoolExecutor(2, thread_name_prefix="gmlp-decode")  # images decode beside the model
        self.bodies = asyncio.Semaphore(16)  # bodies held at once: 16 x the cap; the rest wait in the kernel's buffers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.respond(request)
        except RequestError as e:
            response = JSONResponse({"error": str(e)}, status_code=e.status, headers=e.headers)
            e.__traceback__ = None  # its frames hold the body: dropped now, not by a later collection (docstring)
        except Exception as e:  # the model or a library failed: this request is told, the server goes on
            log.exception("POST /predict failed")
            response = JSONResponse({"error": f"the server failed: {first_line(e, 200)}"}, status_code=500)
            e.__traceback__ = None
        await response(scope, receive, send)

    async def respond(self, request: Request) -> JSONResponse:
        if request.method != "POST":
            raise RequestError(405, "Method Not Allowed: POST an image to /predict", {"Allow": "POST"})
        top_k = self.top_k(request.query_params.get("top_k"))
        try:
            return await asyncio.wait_for(self.answer(request, top_k), self.options.timeout)
        except TimeoutError:
            raise RequestError(408, f"the request took longer than {self.options.timeout:g} s") from None

    def top_k(self, given: str | None) -> int:
        """``?top_k=N``, checked; the server's ``--top-k`` (at most the class count) when absent."""
        count = len(self.classifier.classes)
        if given is None:
            return min(self.options.top_k, count)
        if not _WHOLE.fullmatch(given):
            raise RequestError(400, f"top_k must be a whole number, got {given[:20]!r}")
        if not 1 <= int(given) <= count:
            raise RequestError(400, f"top_k must be in 1..{count}, got {int(given)}")
        return int(given)

    async def answer(self, request: Request, top_k: int) -> JSONResponse:
        async with self.bodies:  # a bounded number of bodies in memory at once, however many callers
            with self.batcher.arriving():
                data = await image_bytes(request, self.options.max_body)
                loop = asyncio.get_running_loop()
                try:
                    pixels = await loop.run_in_executor(self.decoder, self.classifier.preprocess, [data])
                except ImageError as e:
                    raise RequestError(422, str(e)) from None
        probs = await self.batcher.submit(pixels[0])
        return JSONResponse({"predictions": ranked(probs, self.classifier.classes, top_k)})

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.decoder.shutdown(wait=False)


class Front:
    """The server's ASGI application: ``/predict`` straight to `Predict`, every other path to FastAPI.

    FastAPI's routing, parameter solving and middleware cost about 190 us of the event loop's core per request
    (the server's main thread: 369 -> 183 us a request; at 64 clients, 841 -> 981 images/s, the median of three
    alternating rounds of ``benchmarks/bench_serve.py``'s load), which under load is taken from the model. FastAPI
    still serves the rest and documents ``/predict`` in its OpenAPI schema (`PREDICT_DOC`).
    """

    def __init__(self, app: FastAPI, predict: Predict) -> None:
        self.app, self.predict = app, predict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict":
            await self.predict(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(classifier: Classifier, source: str, options: ServeOptions = ServeOptions()) -> ASGIApp:
    """The ASGI application serving ``classifier`` (``source``: what ``/metadata`` calls the model)."""
    predict = Predict(classifier, options)
    info = metadata(classifier, source, options)
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        predict.start()
        yield
        await predict.stop()

    described = f"A gMLP image classifier ({len(classifier.classes)} classes) from {source}."
    app = FastAPI(title="gmlp-vision", version=__version__, lifespan=lifespan, description=described)
    app.add_exception_handler(HTTPException, _http_error)  # every error a JSON {"error": ...}, 404 and 405 too
    app.add_exception_handler(RequestValidationError, _invalid)

    @app.get("/health", summary="Liveness, and what the batcher ran")
    async def health() -> dict[str, Any]:
        batches, images = predict.batcher.batches, predict.batcher.images
        return {"status": "ok", "uptime_s": round(time.monotonic() - started, 3), "batches": batches, "images": images}

    @app.get("/metadata", summary="The model: classes, input, resize rule, precision; the server's limits")
    async def describe() -> dict[str, Any]:
        return info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return demo_page()

    app.openapi()["paths"]["/predict"] = PREDICT_DOC  # built once and kept: /openapi.json and /docs show it
    front = Front(app, predict)
    if not options.cors:
        return front
    return CORSMiddleware(front, allow_origins=list(options.cors), allow_methods=["GET", "POST"])


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)


async def _invalid(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)


__all__ = ["Batcher", "Front", "Predict", "ServeOptions", "create_app", "demo_page", "metadata"]
