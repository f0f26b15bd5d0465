"""What a request to ``POST /predict`` may carry: an image, as the raw body or the multipart field ``image``, capped.

`image_bytes` reads it (`read_body` refuses a body over the cap as soon as it is declared or sent); `RequestError` is
a refusal with its HTTP status; `PREDICT_DOC` describes the endpoint in the OpenAPI schema (``/docs``), since
`serve.Predict` answers it outside FastAPI's routing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from gmlp_vision.errors import first_line

RAW_TYPES = ("image/", "application/octet-stream")  # raw bodies: an image's bytes
MULTIPART = "multipart/form-data"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ERROR = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}
_RANKED = {
    "type": "object",
    "properties": {"index": {"type": "integer"}, "name": {"type": "string"}, "probability": {"type": "number"}},
}
PREDICT_DOC: dict[str, Any] = {
    "post": {
        "summary": "Classify one image (raw body or multipart field 'image')",
        "operationId": "predict",
        "parameters": [
            {
                "name": "top_k",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1},
                "description": "classes returned, most probable first (default: the server's --top-k)",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "image/*": _BINARY,
                "application/octet-stream": _BINARY,
                MULTIPART: {
                    "schema": {
                        "type": "object",
                        "properties": {"image": {"type": "string", "format": "binary"}},
                        "required": ["image"],
                    }
                },
            },
        },
        "responses": {
            "200": {
                "description": "The top-k classes and their probabilities",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {"predictions": {"type": "array", "items": _RANKED}},
                        }
                    }
                },
            },
            **{
                str(status): {"description": why, "content": _ERROR}
                for status, why in (
                    (400, "A bad top_k, multipart body or empty body"),
                    (405, "Not a POST"),
                    (408, "The request took longer than the server's --timeout"),
                    (413, "The body is larger than the server's --max-body-mb"),
                    (415, "Neither an image body nor multipart"),
                    (422, "The bytes are no image of an accepted format, or too large an image"),
                    (500, "The server failed"),
                )
            },
        },
    }
}


class RequestError(Exception):
    """A request the server refuses: its HTTP status, a one-line reason, and headers to send (``Allow``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers


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


__all__ = ["MULTIPART", "PREDICT_DOC", "RAW_TYPES", "RequestError", "image_bytes", "read_body"]
