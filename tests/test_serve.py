"""`gmlp serve`: a real server on 127.0.0.1 with a random port, driven over HTTP (bounded in count and time):
the endpoints, the answers against `Classifier.predict`, dynamic batching, bad and hostile requests, and SIGTERM."""

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmlp_vision.cli import main
from gmlp_vision.predict import Classifier

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("fastapi", reason="the serve extra (scripts/test.sh installs it)")
from gmlp_vision.serve import Predict, ServeOptions  # noqa: E402  (after the skip: it needs the extra)


def png(seed: int, size=(20, 24)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def start(run: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """``gmlp serve RUN --port 0`` and the address it prints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "gmlp_vision", "serve", str(run), "--port", "0", *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    line = server.stdout.readline()
    if not line.startswith("serving "):
        server.kill()
        pytest.fail(f"no address printed: {line!r} {server.stderr.read()}")
    return server, line.split(" at ", 1)[1].split("/ ", 1)[0]


@pytest.fixture(scope="module")
def server(tiny_run):
    process, url = start(tiny_run, "--max-wait-ms", "100", "--max-body-mb", "1")
    yield url
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0  # SIGTERM: a clean stop


def call(url: str, path: str, body: bytes | None = None, content_type: str = "image/png") -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def multipart(field: str, data: bytes) -> tuple[bytes, str]:
    boundary = "gmlp-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
    body = (head + "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_the_endpoints_answer_as_the_classifier_does(server, tiny_run):
    clf = Classifier.from_checkpoint(tiny_run)
    assert call(server, "/health")[1]["status"] == "ok"
    status, meta = call(server, "/metadata")
    assert status == 200 and meta["classes"] == list(clf.classes) and meta["image_size"] == clf.image_size
    assert {"resize", "crop_pct", "precision", "gmlp_vision", "in_chans"} <= set(meta)
    image = png(1)
    expected = clf.predict(Image.open(io.BytesIO(image)), top_k=3)[0]
    status, raw = call(server, "/predict?top_k=3", image)
    assert status == 200 and [p["name"] for p in raw["predictions"]] == [s.name for s in expected.top_k]
    assert [p["probability"] for p in raw["predictions"]] == pytest.approx([s.probability for s in expected.top_k])
    assert call(server, "/predict?top_k=3", *multipart("image", image)) == (200, raw)
    schema = call(server, "/openapi.json")[1]
    assert "/predict" in schema["paths"] and "/metadata" in schema["paths"]
    documented = schema["paths"]["/predict"]["post"]
    assert {"image/*", "multipart/form-data"} <= set(documented["requestBody"]["content"])
    assert documented["parameters"][0]["name"] == "top_k" and {"200", "413", "422"} <= set(documented["responses"])
    with urllib.request.urlopen(server + "/", timeout=30) as page:
        html = page.read().decode()
    assert "<title>gmlp-vision</title>" in html and "http://" not in html and "https://" not in html  # offline


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status", "message"),
    [
        ("/predict", b"not an image", "image/png", 422, "is not an image file of an accepted format"),
        ("/predict", png(2)[:60], "image/png", 422, "cannot read image the uploaded image"),
        ("/predict", b"hello", "text/plain", 415, "send an image as the body"),
        ("/predict?top_k=99", png(3), "image/png", 400, "top_k must be in 1..4"),
        ("/predict", None, "image/png", 405, "Method Not Allowed"),
        ("/predict?top_k=many", png(7), "image/png", 400, "top_k must be a whole number, got 'many'"),
        ("/nowhere", png(8), "image/png", 404, "Not Found"),
        ("/predict", *multipart("photo", png(4)), 400, "no file field 'image'"),
        ("/predict", b"--x\r\nnonsense", "multipart/form-data; boundary=x", 400, ""),
    ],
)  # fmt: skip
def test_a_bad_request_is_a_4xx_json_error_and_the_server_goes_on(server, path, body, content_type, status, message):
    got, answer = call(server, path, body, content_type)
    assert got == status and message in answer["error"]
    assert call(server, "/predict", png(5))[0] == 200


def raw_post(url: str, head: str, chunks) -> tuple[int, dict]:
    """POST over a plain socket: the headers, then ``chunks`` until the server stops reading (it may answer and close
    before the body is all sent: a client library would report the broken pipe, not the answer); then its answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n{head}\r\n".encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the end: what we want to see
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def test_a_large_body_is_refused_by_its_declared_length_or_while_it_is_read(server):
    declared = raw_post(server, f"Content-Length: {2 << 20}\r\n", [b"x" * 1000])  # told at once, before the body
    assert declared[0] == 413 and "(2,097,152 bytes) is larger than the cap, 1,048,576 bytes" in declared[1]["error"]
    chunks = (b"10000\r\n" + b"y" * 65536 + b"\r\n" for _ in range(40))  # 2.5 MB chunked, no Content-Length
    streamed = raw_post(server, "Transfer-Encoding: chunked\r\n", chunks)
    assert streamed[0] == 413 and "the body is larger than the cap, 1,048,576 bytes" in streamed[1]["error"]
    assert call(server, "/predict", png(9))[0] == 200  # and on it goes


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_refused_bodies_are_given_back_at_once(tiny_run):
    process, url = start(tiny_run, "--max-body-mb", "4")
    try:
        assert call(url, "/predict", png(9))[0] == 200
        before = resident_mb(process.pid)
        for _ in range(30):  # 30 bodies refused at the 4 MB cap: 120 MB if each stayed until a garbage collection
            chunks = (b"10000\r\n" + b"z" * 65536 + b"\r\n" for _ in range(80))
            assert raw_post(url, "Transfer-Encoding: chunked\r\n", chunks)[0] == 413
        assert call(url, "/predict", png(9))[0] == 200
        assert resident_mb(process.pid) - before < 40
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def closed_after(url: str, send: bytes, trickle: bytes = b"") -> float:
    """Seconds until the server closes a connection that sent ``send`` and then ``trickle``, a byte every 0.3 s."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(send)
        sock.settimeout(0.3)
        for byte in trickle:
            try:
                if not sock.recv(1024):
                    return time.monotonic() - t0
            except TimeoutError:
                pass
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t0
        sock.settimeout(20)
        while sock.recv(1024):
            pass
    return time.monotonic() - t0


def test_slow_senders_are_cut_off_by_the_timeout(tiny_run):
    process, url = start(tiny_run, "--timeout", "1.5")
    try:
        assert 1.0 < closed_after(url, b"") < 8  # a connection that never sends a byte
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        assert 1.0 < closed_after(url, head, b"X-Slow: " + b"y" * 60) < 8  # headers a byte at a time
        assert raw_post(url, "Content-Length: 1000\r\n", [b"z" * 10])[0] == 408  # headers whole, the body never
        assert call(url, "/predict", png(9))[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    images = [png(10 + i) for i in range(16)]
    alone = [call(server, "/predict?top_k=2", image)[1] for image in images[:4]]
    before = call(server, "/health")[1]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda image: call(server, "/predict?top_k=2", image), images))
    after = call(server, "/health")[1]
    assert all(status == 200 for status, _ in answers)
    for (_, together), single in zip(answers[:4], alone, strict=True):  # the same answer in a batch as alone
        assert [p["name"] for p in together["predictions"]] == [p["name"] for p in single["predictions"]]
        probs = [p["probability"] for p in together["predictions"]]
        assert probs == pytest.approx([p["probability"] for p in single["predictions"]], abs=1e-5)
    assert after["images"] - before["images"] == 16
    assert after["batches"] - before["batches"] < 16  # gathered: fewer model runs than requests


def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(tiny_run):
    process, url = start(tiny_run, "--max-wait-ms", "1500")  # a lone request waits 1.5 s for company
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, url, "/predict", png(6))
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert pending.result(timeout=60)[0] == 200
    assert process.wait(timeout=30) == 0


def test_serving_needs_its_extra_and_a_free_address(tiny_run, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "fastapi", None)
        assert main(["serve", str(tiny_run)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "gmlp: error: gmlp serve needs the serve extra: pip install 'gmlp-vision[serve]'"
    )
    assert main(["serve", str(tiny_run), "--max-wait-ms", "-1"]) == 2
    assert "--max-wait-ms must be in 0..10000" in capsys.readouterr().err
    assert main(["serve", str(tiny_run), "--host", "256.1.1.1"]) == 2
    assert "cannot listen on 256.1.1.1" in capsys.readouterr().err


def test_cors_is_off_unless_an_origin_is_given(server, tiny_run):
    def allowed(url, path="/metadata", method="GET", body=None):
        headers = {"Origin": "http://example.org", "Content-Type": "image/png"}
        if method == "OPTIONS":
            headers["Access-Control-Request-Method"] = "POST"
        request = urllib.request.Request(url + path, body, headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.headers.get("access-control-allow-origin")

    assert allowed(server) is None and allowed(server, "/predict", "POST", png(9)) is None
    process, url = start(tiny_run, "--cors", "http://example.org")
    try:
        assert allowed(url) == "http://example.org"
        assert allowed(url, "/predict", "POST", png(9)) == "http://example.org"  # /predict answers outside FastAPI
        assert allowed(url, "/predict", "OPTIONS") == "http://example.org"  # the browser's preflight
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


class FailingOnce:
    """A classifier whose first model run fails (out of memory, say) and whose later runs answer 50 / 50."""

    classes, image_size, in_chans, resize, crop_pct, precision, tta = ("a", "b"), 4, 3, "crop", 1.0, "fp32", "none"

    def __init__(self) -> None:
        self.failed = False

    def preprocess(self, images):
        return torch.zeros(len(images), 3, 4, 4)

    def probabilities(self, pixels):
        if not self.failed:
            self.failed = True
            raise RuntimeError("out of memory\ntraceback lines")
        return torch.full((len(pixels), 2), 0.5)


async def post_asgi(app, body: bytes) -> tuple[int, dict]:
    """One POST /predict through the ASGI application itself: its status and JSON."""
    messages, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"", "headers": headers}
    await app(scope, receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_a_model_failure_is_a_500_json_error_and_the_next_request_is_answered():
    async def twice():
        predict = Predict(FailingOnce(), ServeOptions())
        predict.start()
        try:
            return [await post_asgi(predict, b"image") for _ in range(2)]
        finally:
            await predict.stop()

    (first, failed), (second, answered) = asyncio.run(twice())
    assert first == 500 and failed == {"error": "the server failed: out of memory"}
    assert second == 200 and [p["probability"] for p in answered["predictions"]] == [0.5, 0.5]
