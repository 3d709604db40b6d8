"""``defectscope serve <run_dir or exported model>``: the model as an HTTP service and a web page
(defectscope.deploy.server; FastAPI + uvicorn, the ``serve`` extra).

``defectscope.cli.main`` hands ``serve`` straight to :func:`main` here, before it builds the other
commands' parser (which imports the models, and so PyTorch): an exported model is served without
torch in the process (onnxruntime / OpenVINO only). A run folder still loads PyTorch to run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The defaults of defectscope.deploy.server.create_app (not imported here: `defectscope --help` stays light).
DEFAULT_MAX_UPLOAD_MB, DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT_S, DEFAULT_MAX_BATCH = 20.0, 64, 30.0, 8
HELP = "serve a run folder or an exported model over HTTP: POST /predict, a web page at /, docs at /docs"


def add_parser(sub, formatter_class=argparse.ArgumentDefaultsHelpFormatter) -> argparse.ArgumentParser:
    """The ``serve`` sub-command's parser, added to ``sub`` (build_parser's subparsers, for
    ``defectscope --help``)."""
    return add_options(sub.add_parser("serve", help=HELP, description=HELP, formatter_class=formatter_class))


def build_parser() -> argparse.ArgumentParser:
    """``defectscope serve``'s own parser: what :func:`main` parses with (no torch imported)."""
    return add_options(argparse.ArgumentParser(prog="defectscope serve", description=HELP,
                                               formatter_class=argparse.ArgumentDefaultsHelpFormatter))


def add_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``serve`` options, added to ``p``."""
    p.add_argument("model", help="run folder (or its models/<n> folder) written by `defectscope train`, or an "
                                 "exported model (.onnx / .xml file, or the folder `defectscope export` wrote)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--category", default=None, help="which model of a multi-category run")
    p.add_argument("--api-key", default=None,
                   help="require this key (X-API-Key header or Authorization: Bearer); None: the environment "
                        "variable DEFECTSCOPE_API_KEY, and no key when that is unset")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest image upload (413 above)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests admitted at once, queued or running (503 with Retry-After above)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request (504 after)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="images the model runs at once (waiting requests are batched)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest image in pixels, checked from the header before decoding (decompression bombs); "
                        "None: defectscope.data.images.MAX_PIXELS (100 megapixels)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes (uvicorn workers), each with its own copy of the model")
    p.add_argument("--model-threads", type=int, default=None,
                   help="threads the model runs on in each process; None: the runtime's own with 1 process, "
                        "the CPUs divided among the processes with --workers N")
    return p


def main(argv: list[str]) -> int:
    """``defectscope serve ARGV...`` (what follows ``serve``). Errors are raised (UsageError for a
    bad command line) for ``defectscope.cli.main`` to print. Imports torch only to serve a run folder."""
    from defectscope.cli import (
        UsageError,
        _closest_options,
        _model_kind,
        notices_printed,
    )

    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback too (any position)")

    def error(message: str):
        raise UsageError(f"{message} (see `defectscope serve --help`)")

    parser.error = error
    args, extra = parser.parse_known_args(argv)
    if extra:
        top = argparse.ArgumentParser(prog="defectscope")  # _closest_options looks the command up in it
        parser_for_hints = top.add_subparsers(dest="command")
        add_parser(parser_for_hints)
        hints = _closest_options(top, "serve", extra) or " (see `defectscope serve --help`)"
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}{hints}")
    path = Path(args.model)
    # An exported model: DataNotice from defectscope/data/images.py loaded without defectscope.data
    # (whose __init__ imports torch); a run folder imports defectscope.data (and torch) anyway.
    with notices_printed(torch_free=_model_kind(path) != "run"):
        return cmd_serve(args)


def cmd_serve(args) -> int:
    from defectscope.cli import UsageError

    try:
        import uvicorn

        from defectscope.deploy.server import create_app, describe
    except ImportError as err:
        raise UsageError(f"defectscope serve needs FastAPI and uvicorn ({err}). Fix: pip install "
                         "'defectscope[serve]'") from None
    path = Path(args.model)
    if not path.exists():
        raise UsageError(f"No model at '{path}': serve takes a run folder written by `defectscope train` or an "
                         "exported .onnx / .xml file.")
    if args.max_upload_mb <= 0 or args.max_queue < 1 or args.timeout <= 0 or args.max_batch < 1 or args.workers < 1:
        raise UsageError("--max-upload-mb and --timeout must be > 0; --max-queue, --max-batch and --workers >= 1")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a TCP port (1-65535)")
    options = {"category": args.category, "api_key": args.api_key, "max_upload_mb": args.max_upload_mb,
                   "max_queue": args.max_queue, "timeout_s": args.timeout, "max_batch": args.max_batch}
    threads = args.model_threads
    if threads is None and args.workers > 1:
        import os

        threads = max(1, (os.cpu_count() or 1) // args.workers)
    if threads is not None:
        options["model_threads"] = threads
    if args.max_pixels is not None:
        options["max_pixels"] = args.max_pixels
    if args.workers > 1:
        import json
        import os

        # Each worker process builds its own app (and model) from these settings.
        os.environ["DEFECTSCOPE_SERVE"] = json.dumps({"model": str(path), **options})
        print(f"serving {path} with {args.workers} processes on http://{args.host}:{args.port}/ (docs: /docs)",
              flush=True)
        uvicorn.run("defectscope.deploy.server:app_from_environment", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="warning")
        return 0
    app = create_app(path, **options)
    print(f"serving {describe(app)}\n  on http://{args.host}:{args.port}/ (page), /docs (API), /health", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
