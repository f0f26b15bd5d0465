"""``gmlp serve``: a trained model behind HTTP (`gmlp_vision.serve`), until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
from typing import Any

from gmlp_vision.cli.common import add_tta, cpu_threads_for, device_flag, positive_int
from gmlp_vision.errors import ConfigError, printable


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("gmlp serve needs the serve extra: pip install 'gmlp-vision[serve]'") from None
    from gmlp_vision.predict import Classifier
    from gmlp_vision.runtime import resolve_device
    from gmlp_vision.serve import ServeOptions, create_app
    from gmlp_vision.serve_run import bind, serve

    options = ServeOptions(
        args.max_batch,
        args.max_wait_ms,
        int(args.max_body_mb * 1024 * 1024),
        args.timeout,
        args.top_k,
        tuple(args.cors or ()),
    )
    device = resolve_device(args.device)
    cpu_threads_for(device)
    classifier = Classifier.load(args.model, device, batch_size=options.max_batch, tta=args.tta)
    app = create_app(classifier, args.model, options)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {printable(args.model)} at http://{shown}:{port}/ (POST /predict, GET /metadata, /health, /docs); "
        "Ctrl-C or SIGTERM stops it",
        flush=True,
    )
    serve(app, sock, options.timeout)
    return 0


def _megabytes(text: str) -> float:
    value = float(text)
    if not 0 < value <= 2048:
        raise argparse.ArgumentTypeError(f"must be in (0, 2048] MB, got {text}")
    return value


def add_serve(sub: Any) -> None:
    """Add ``serve`` to the ``gmlp`` subparsers."""
    p = sub.add_parser("serve", help="serve a trained model over HTTP: POST /predict, a demo page at /")
    p.add_argument(
        "model",
        metavar="MODEL",
        help="what gmlp predict takes: a run directory, a checkpoint, an export "
        "folder, an .onnx file, or an export's Hugging Face Hub id",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: a free one, printed)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="images run together at most (default: 32)")
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with (default: 5)"
    )
    p.add_argument("--max-body-mb", type=_megabytes, default=20.0, help="largest request body in MB (default: 20)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds a request may take, and its headers (default: 30)"
    )
    p.add_argument("--top-k", type=positive_int, default=5, help="classes returned per image (default: 5)")
    p.add_argument(
        "--cors",
        action="append",
        metavar="ORIGIN",
        help="allow browser pages from ORIGIN to call the server (repeatable; default: none)",
    )
    p.add_argument("--device", type=device_flag, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_tta(p)
    p.set_defaults(func=_cmd_serve)
