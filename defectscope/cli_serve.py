"""``defectscope serve <run_dir or exported model>``: the model as an HTTP service and a web page
(defectscope.deploy.server; FastAPI + uvicorn, the ``serve`` extra)."""

from __future__ import annotations

import argparse
from pathlib import Path

# The defaults of defectscope.deploy.server.create_app (not imported here: `defectscope --help` stays light).
DEFAULT_MAX_UPLOAD_MB, DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT_S, DEFAULT_MAX_BATCH = 20.0, 64, 30.0, 8
HELP = "serve a run folder or an exported model over HTTP: POST /predict, a web page at /, docs at /docs"


def add_parser(sub, formatter_class=argparse.ArgumentDefaultsHelpFormatter) -> argparse.ArgumentParser:
    """The ``serve`` sub-command's parser, added to ``sub`` (build_parser's subparsers)."""
    p = sub.add_parser("serve", help=HELP, formatter_class=formatter_class)
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
