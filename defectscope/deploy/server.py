"""``defectscope serve``: a trained or exported model as an HTTP service (FastAPI + uvicorn).

::

    from defectscope.deploy.server import create_app
    app = create_app("export/model.onnx")          # or a run folder (PyTorch)
    # uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints:

- ``POST /predict``: one image, as a multipart file (any field name) or as the raw request body;
  JSON out: score, verdict, threshold, regions (the map's connected regions at or above the pixel
  threshold, largest first, as ``defectscope predict`` writes them), model name and version,
  milliseconds and the overlay (image | heat-map | contour) as a base64 PNG (``?overlay=false``
  leaves it out).
- ``POST /predict/batch``: several images as multipart files; one result per file, in order.
- ``GET /health``: liveness and queue use (never needs the API key);
  ``GET /model``: what is loaded (image size, thresholds, ROI, limits).
- ``GET /``: a page to drop an image on (defectscope/deploy/static/index.html, no build step,
  nothing fetched from the internet); ``/docs`` (Swagger UI) and ``/redoc``: the OpenAPI description
  (``/openapi.json``) as pages, from local files (the ``fastapi-offline`` package, in the ``serve``
  extra; without it FastAPI's own pages, which load their scripts from a CDN).

Limits: upload size (413), image type judged by the bytes (415), decompression bombs refused
from the header (413, :data:`defectscope.data.images.MAX_PIXELS`), a bounded number of admitted
requests (503 with Retry-After when full), a per-request timeout (504; 408 while the body is still
arriving), an optional API key (401). Every refused request gets a 4xx (or 503 / 504) with a JSON
``{"detail": ...}`` message; the server goes on serving.

Requests are decoded, resized, post-processed and drawn in a thread pool; the model itself runs
in one thread that takes the waiting images as one batch (up to ``max_batch``), so concurrent
clients get batch throughput. An exported model runs without PyTorch (defectscope.deploy.inferencer).
"""


import asyncio
import base64
import hashlib
import hmac
import io
import json
import math
import os
import queue
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectscope.deploy.inferencer import _images_module, resize_rgb
from defectscope.deploy.outputs import find_regions, overlay_strip, resize_map

__all__ = ["Backend", "ExportedBackend", "RequestError", "TorchBackend", "create_app", "load_backend"]

STATIC = Path(__file__).resolve().parent / "static"
API_KEY_ENV = "DEFECTSCOPE_API_KEY"
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_QUEUE = 64
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_BATCH = 8  # images the model runs at once (the batch default of `defectscope predict` on CPU)
DEFAULT_MAX_FILES = 32  # files in one /predict/batch request
MAX_REGIONS = 100
# Image types accepted, recognised by their first bytes (the file name and Content-Type are not trusted).
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
          (b"MM\x00*", "TIFF"))
_OTHER_IMAGES = ((b"GIF8", "a GIF image"), (b"RIFF", "a RIFF file (WebP image or AVI video)"),
                 (b"\x00\x00\x01\x00", "a Windows icon"), (b"8BPS", "a Photoshop document"))


class RequestError(Exception):
    """A request that cannot be served: ``status`` (4xx, 503, 504), ``detail`` (what is wrong and
    the fix), optional extra ``headers``."""

    def __init__(self, status: int, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


# ---- backends -------------------------------------------------------------------------------
class Backend:
    """What the server needs of a model. ``predict(batch uint8 [B,h,w,3] at image_size)`` ->
    ``(scores [B], maps [B,h',w'])``; the rest describes it."""

    kind = "?"
    name = "?"
    version = "?"
    image_size: tuple[int, int] = (0, 0)
    threshold = 0.5
    pixel_threshold = 0.5
    pixel_threshold_fitted = True
    wide_range: str | None = None
    map_range: tuple[float, float] | None = None  # None: per image (low = map min, threshold mid-scale)
    source = ""

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def roi(self) -> dict | None:
        return None

    def info(self) -> dict:
        return {"name": self.name, "version": self.version, "kind": self.kind, "source": self.source,
                "image_size": list(self.image_size), "threshold": self.threshold,
                "pixel_threshold": self.pixel_threshold, "pixel_threshold_fitted": self.pixel_threshold_fitted,
                "roi": self.roi()}


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


class ExportedBackend(Backend):
    """An exported .onnx / .xml model through the torch-free inferencer."""

    kind = "exported"

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        from defectscope.deploy.inferencer import load_inferencer

        self.inferencer = inf = load_inferencer(path, threads=threads)
        if inf.tiling:
            raise ValueError(f"'{path}' was trained on tiles; the server scores whole images. Fix: serve the run "
                             "folder it was exported from.")
        self.name = inf.model_name
        self.source = inf.path.name
        self.image_size = inf.image_size
        self.threshold = float(inf.threshold)
        self.pixel_threshold = float(inf.pixel_threshold)
        self.pixel_threshold_fitted = inf.meta.get("pixel_threshold") is not None
        self.wide_range = inf.wide_range
        self.version = f"{inf.meta.get('defectscope_version', '?')}+{_file_digest([inf.path, inf.path.with_suffix('.json')])}"
        self.runtime = inf.runtime

    def predict(self, batch):
        scores, maps = self.inferencer.predict(batch)
        return scores, (maps[:, 0] if maps.ndim == 4 else maps)

    def roi(self):
        meta = self.inferencer.meta.get("roi")
        if not meta:
            return None
        mask = self.inferencer.roi
        out = {k: v for k, v in meta.items() if k in ("source", "coverage")}
        if mask is not None:
            out["coverage"] = round(float(mask.mean()), 6)
        return out


class TorchBackend(Backend):
    """A run folder (or models/<n> folder) through PyTorch: ``defectscope.models.load_model``."""

    kind = "run"

    def __init__(self, path: str | os.PathLike, category: str | None = None) -> None:
        import torch

        from defectscope.models import load_model

        self.torch = torch
        self.model = model = load_model(path, category=category).eval()
        self.name = model.name
        self.source = Path(path).name
        self.image_size = tuple(int(s) for s in model.image_size)
        self.threshold = float(model.threshold)
        pixel = getattr(model, "pixel_threshold", None)
        self.pixel_threshold_fitted = pixel is not None
        self.pixel_threshold = float(pixel) if pixel is not None else self.threshold
        self.wide_range = (model.data_info or {}).get("wide_range")
        self.map_range = (0.0, 1.0) if model.post_processor else None
        self.tiled = bool(model.tiling_info)
        import defectscope

        root = Path(path)
        files = sorted(root.rglob("ckpt.pth")) + sorted(root.rglob("params.json")) if root.is_dir() else [root]
        self.version = f"{defectscope.__version__}+{_file_digest(files)}"

    def predict(self, batch):
        torch = self.torch
        if self.tiled:  # a model trained on tiles scores each whole image by its tiles
            results = [self.model.predict(image) for image in batch]
            return np.array([r[0] for r in results], np.float32), np.stack([r[1] for r in results])
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
        scores, maps = self.model.predict(x)
        return np.asarray(scores, np.float32).reshape(-1), np.asarray(maps, np.float32)

    def roi(self):
        info = dict(self.model.roi_info or {})
        return {k: v for k, v in info.items() if k in ("source", "coverage")} if info else None


def load_backend(model_path: str | os.PathLike, category: str | None = None, threads: int | None = None) -> Backend:
    """An exported model (.onnx / .xml file, or the folder `defectscope export` wrote) or a run
    folder (PyTorch), told apart as `defectscope predict` tells them."""
    from defectscope.cli import _model_kind

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"No model at '{path}': the path does not exist. Serve a run folder written by "
                                "`defectscope train` or an exported .onnx / .xml file.")
    kind = _model_kind(path)
    if kind == "exported":
        return ExportedBackend(path, threads=threads)
    if kind == "run":
        backend = TorchBackend(path, category=category)
        if threads:
            backend.torch.set_num_threads(int(threads))
        return backend
    raise ValueError(f"'{path}' is not a model: expected a run folder (holding models/<n>/params.json), its "
                     "models/<n> folder, or an exported model (.onnx / .xml file, or its export folder).")


# ---- the model thread: waiting images run as one batch ----------------------------------------
class Batcher:
    """One thread runs the backend; images submitted meanwhile are taken as one batch (up to
    ``max_batch``). Cancelled submissions (timed-out requests) are dropped before they run."""

    def __init__(self, backend: Backend, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.backend, self.max_batch = backend, max(1, int(max_batch))
        self._queue: queue.Queue = queue.Queue()
        self.batches = self.images = 0
        self.rate: float | None = None  # images per second of the model, a moving average
        self._thread = threading.Thread(target=self._loop, name="defectscope-model", daemon=True)
        self._thread.start()

    def submit(self, image: np.ndarray) -> Future:
        future: Future = Future()
        self._queue.put((image, future))
        return future

    def close(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            while len(items) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                items.append(more)
            live = [(x, f) for x, f in items if f.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                started = time.perf_counter()
                scores, maps = self.backend.predict(np.stack([x for x, _ in live]))
                seconds = time.perf_counter() - started
                self.batches += 1
                self.images += len(live)
                rate = len(live) / max(seconds, 1e-6)
                self.rate = rate if self.rate is None else 0.8 * self.rate + 0.2 * rate
                for k, (_, future) in enumerate(live):
                    future.set_result((float(scores[k]), maps[k]))
            except BaseException as err:  # noqa: BLE001 (each waiting request gets the error)
                for _, future in live:
                    future.set_exception(err)


# ---- reading an upload ------------------------------------------------------------------------
def _kind_of(data: bytes) -> str | None:
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    return None


def _what_it_looks_like(data: bytes) -> str:
    for magic, words in _OTHER_IMAGES:
        if data.startswith(magic):
            return words
    head = data[:64]
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text"
    if head.lstrip()[:5].lower() in (b"<!doc", b"<html", b"<?xml", b"<svg "):
        return "HTML / XML / SVG text"
    looks = _images_module()._sniff(head)
    return looks or "unknown binary data"


def decode_image(data: bytes, name: str, max_pixels: int, wide_range: str | None) -> np.ndarray:
    """Upload bytes -> uint8 RGB ``[H, W, 3]``, by training's reading rules (EXIF orientation,
    grey / 16-bit / palette / alpha, as defectscope.data.images). Refuses (RequestError): empty
    bodies, anything that is not PNG / JPEG / BMP / TIFF by its bytes, images over ``max_pixels``
    (read from the header, before decoding: decompression bombs), corrupt or truncated files."""
    images = _images_module()
    if not data:
        raise RequestError(400, f"{name} is empty (0 bytes). Fix: send the image file's bytes.")
    kind = _kind_of(data)
    if kind is None:
        raise RequestError(415, f"{name} is not a PNG, JPEG, BMP or TIFF image: its bytes look like "
                                f"{_what_it_looks_like(data)}. The type is judged by the contents, not the file "
                                "name or Content-Type. Fix: send a PNG, JPEG, BMP or TIFF file.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            picture = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise RequestError(413, f"{name} claims too many pixels ({err}); refused before decoding as a "
                                    f"possible decompression bomb (limit {max_pixels} pixels).") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise RequestError(422, f"{name} starts like a {kind} file but cannot be read as one "
                                    f"({type(err).__name__}: {err}). Fix: send the file again, or re-export it.") from None
    with picture:
        if picture.format != kind:
            raise RequestError(415, f"{name} starts like a {kind} file but Pillow reads it as "
                                    f"{picture.format}. Fix: send a plain PNG, JPEG, BMP or TIFF file.")
        width, height = picture.size
        if width * height > max_pixels:
            raise RequestError(413, f"{name} claims {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), "
                                    f"over the limit of {max_pixels / 1e6:g} megapixels; refused before decoding, as a "
                                    "possible decompression bomb. Fix: downscale it, or start the server with a larger "
                                    "--max-pixels.")
        if width == 0 or height == 0:
            raise RequestError(422, f"{name} has no pixels ({width}x{height}).")
        try:
            if getattr(picture, "n_frames", 1) > 1:
                picture.seek(0)
            picture.load()
        except Exception as err:  # noqa: BLE001 (Pillow raises OSError, SyntaxError, ValueError, EOFError...)
            raise RequestError(422, f"{name} is corrupt or truncated ({type(err).__name__}: {err}). Fix: send "
                                    "the complete file.") from None
        try:
            rgb = images.pil_to_rgb(picture, name="An uploaded image", wide_range=wide_range)
        except images.DataError as err:
            raise RequestError(422, f"{name}: {err}") from None
        except Exception as err:  # noqa: BLE001
            raise RequestError(422, f"{name} cannot be converted to RGB ({type(err).__name__}: {err}).") from None
        return np.array(rgb, dtype=np.uint8)


def _png_base64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ---- the service ------------------------------------------------------------------------------
class Service:
    """The model, its batcher, the thread pool and the limits; what the routes call."""

    def __init__(self, backend: Backend, *, api_key: str | None, max_upload_mb: float, max_queue: int,
                 timeout_s: float, max_batch: int, max_files: int, max_pixels: int | None, threads: int | None) -> None:
        self.backend = backend
        self.api_key = api_key or None
        self.max_upload = int(max_upload_mb * 1024 * 1024)
        self.max_queue = int(max_queue)
        self.timeout_s = float(timeout_s)
        self.max_files = int(max_files)
        self.max_pixels = int(max_pixels or _images_module().MAX_PIXELS)
        self.batcher = Batcher(backend, max_batch)
        self.pool = ThreadPoolExecutor(max_workers=threads or min(32, max(4, self.max_queue)),
                                       thread_name_prefix="defectscope-request")
        self._lock = threading.Lock()
        self.admitted = 0
        self.served = self.refused_busy = self.timed_out = 0
        self.started = time.time()

    def limits(self) -> dict:
        return {"max_upload_mb": self.max_upload / 1024 / 1024, "max_batch_upload_mb": self.batch_upload / 1024 / 1024,
                "max_queue": self.max_queue, "timeout_s": self.timeout_s, "max_pixels": self.max_pixels,
                "max_batch": self.batcher.max_batch, "max_files": self.max_files,
                "api_key_required": self.api_key is not None}

    @property
    def batch_upload(self) -> int:
        """The body limit of one /predict/batch request: 4 images at the upload limit (each
        file is also held to the per-image limit)."""
        return self.max_upload * min(4, self.max_files)

    # admission: a slot is held from the request's start until its work has really finished
    def admit(self) -> None:
        with self._lock:
            if self.admitted >= self.max_queue:
                self.refused_busy += 1
                rate = self.batcher.rate or 1.0  # how long the admitted requests take to drain, 1..60 s
                retry = min(60, max(1, math.ceil(self.admitted / rate)))
                raise RequestError(503, f"The server is busy: {self.admitted} requests are queued or running (the "
                                        f"limit, --max-queue, is {self.max_queue}). Fix: retry after the "
                                        "Retry-After seconds.", {"Retry-After": str(retry)})
            self.admitted += 1

    def release(self, *_args) -> None:
        with self._lock:
            self.admitted -= 1

    def check_key(self, headers) -> None:
        if self.api_key is None:
            return
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            raise RequestError(401, "This server needs an API key. Fix: send it in the X-API-Key header (or "
                                    "Authorization: Bearer <key>).", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key.encode()):
            raise RequestError(401, "Wrong API key. Fix: send the key the server was started with "
                                    "(--api-key or DEFECTSCOPE_API_KEY).", {"WWW-Authenticate": "Bearer"})

    # the work of one request (in the thread pool)
    def score(self, uploads: list[tuple[str, bytes]], overlay: bool, deadline: float) -> list[dict]:
        backend = self.backend
        started = time.perf_counter()
        pictures = [decode_image(data, name, self.max_pixels, backend.wide_range) for name, data in uploads]
        futures = [self.batcher.submit(resize_rgb(Image.fromarray(p), backend.image_size)) for p in pictures]
        results = []
        try:
            for (name, _), picture, future in zip(uploads, pictures, futures):
                left = deadline - time.monotonic()
                try:
                    score, amap = future.result(timeout=max(left, 0.001))
                except FutureTimeout:
                    raise RequestError(504, "The model did not answer within the request timeout "
                                            f"({self.timeout_s:g} s). Fix: retry, or start the server with a "
                                            "longer --timeout.") from None
                results.append(self._result(name, picture, score, amap, overlay))
        finally:
            for future in futures:
                future.cancel()
        ms = (time.perf_counter() - started) * 1000
        for result in results:
            result["milliseconds"] = round(ms, 2)
        return results

    def _result(self, name: str, picture: np.ndarray, score: float, amap: np.ndarray, overlay: bool) -> dict:
        backend = self.backend
        height, width = picture.shape[:2]
        full = resize_map(amap, (height, width))
        regions, mask, count = find_regions(full, backend.pixel_threshold, limit=MAX_REGIONS)
        defect = score >= backend.threshold
        result = {"file": name, "score": _finite(score), "verdict": "defect" if defect else "good",
                  "threshold": backend.threshold, "pixel_threshold": backend.pixel_threshold,
                  "width": width, "height": height, "n_regions": count, "regions": regions,
                  "model": {"name": backend.name, "version": backend.version}}
        if overlay:
            if backend.map_range is not None:
                low, high = backend.map_range
            else:
                low = float(full.min())
                high = backend.pixel_threshold + max(backend.pixel_threshold - low, 1e-6)
            strip = overlay_strip(picture, full, mask, low, high, caption=f"{result['verdict']} {score:.3f}",
                                  defect=defect)
            result["overlay_png"] = _png_base64(strip)
        return result


# ---- the app ------------------------------------------------------------------------------------
_ONE_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                                           "required": ["file"]}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}
_BATCH_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}, "required": ["files"]}}},
}


def create_app(model_path: str | os.PathLike | Backend, category: str | None = None, api_key: str | None = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_queue: int = DEFAULT_MAX_QUEUE,
               timeout_s: float = DEFAULT_TIMEOUT_S, max_batch: int = DEFAULT_MAX_BATCH,
               max_files: int = DEFAULT_MAX_FILES, max_pixels: int | None = None, threads: int | None = None,
               model_threads: int | None = None):
    """The FastAPI app serving ``model_path``: a run folder, an exported model, or a
    :class:`Backend`. ``api_key`` None reads ``DEFECTSCOPE_API_KEY`` (empty: no key).
    ``max_upload_mb`` per image (a batch request: times ``max_files``); ``max_queue`` requests
    admitted at once (queued or running; more get 503); ``timeout_s`` per request (504);
    ``max_batch`` images the model runs at once; ``max_pixels`` per image (default
    defectscope.data.images.MAX_PIXELS); ``threads``: request threads (decoding, drawing);
    ``model_threads``: intra-op threads of an exported model's runtime (None: the runtime's)."""
    try:
        from fastapi import FastAPI, Query, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as err:
        raise ImportError(f"defectscope serve needs FastAPI and uvicorn ({err}). Fix: pip install "
                          "'defectscope[serve]'") from None
    if max_upload_mb <= 0 or max_queue < 1 or timeout_s <= 0 or max_batch < 1 or max_files < 1:
        raise ValueError("max_upload_mb and timeout_s must be > 0, max_queue, max_batch and max_files >= 1")
    backend = (model_path if isinstance(model_path, Backend)
               else load_backend(model_path, category=category, threads=model_threads))
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    service = Service(backend, api_key=api_key, max_upload_mb=max_upload_mb, max_queue=max_queue,
                      timeout_s=timeout_s, max_batch=max_batch, max_files=max_files, max_pixels=max_pixels,
                      threads=threads)
    from contextlib import asynccontextmanager

    import defectscope

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.batcher.close()
        service.pool.shutdown(wait=False, cancel_futures=True)

    docs_assets = _docs_assets()
    offline_docs = {"docs_url": None, "redoc_url": None} if docs_assets is not None else {}
    app = FastAPI(lifespan=lifespan, title="defectscope inspection server", version=defectscope.__version__,
                  description=f"Visual anomaly detection with {backend.name} ({backend.kind}: {backend.source}). "
                              "Send an image to /predict; see GET /model for thresholds and limits.", **offline_docs)
    app.state.service = service
    if docs_assets is not None:
        _add_offline_docs(app, docs_assets)

    def error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, err: RequestError):
        return error(err.status, err.detail, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        return error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors()]
        return error(422, "Invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _unexpected(request, err):  # a bug: still JSON, and the server goes on
        return error(500, f"Internal error ({type(err).__name__}: {err}).")

    async def read_body(request: Request, limit: int) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise RequestError(400, f"Content-Length {length!r} is not a number.") from None
            if declared > limit:
                raise RequestError(413, f"The upload is {declared / 1048576:.2f} MiB, over the limit of "
                                        f"{limit / 1048576:g} MiB. Fix: send a smaller image, or start the server "
                                        "with a larger --max-upload-mb.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"The upload is over the limit of {limit / 1048576:g} MiB. Fix: send a "
                                        "smaller image, or start the server with a larger --max-upload-mb.")
            chunks.append(chunk)
        return b"".join(chunks)

    async def uploads_of(request: Request, body: bytes, many: bool) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            from starlette.requests import Request as StarletteRequest

            sent = False

            async def replay():
                nonlocal sent
                if sent:
                    return {"type": "http.disconnect"}
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            copy = StarletteRequest(request.scope, replay)
            try:
                form = await copy.form(max_files=(service.max_files if many else 1) + 1, max_fields=64)
            except StarletteHTTPException as err:
                raise RequestError(400, f"The multipart body cannot be read: {err.detail}. Fix: send the image "
                                        "as a multipart file (curl -F file=@image.png) or as the raw body.") from None
            except Exception as err:  # noqa: BLE001 (a malformed body is the client's)
                raise RequestError(400, f"The multipart body cannot be read ({type(err).__name__}: {err}). Fix: "
                                        "send the image as a multipart file (curl -F file=@image.png).") from None
            files = []
            try:
                for key, value in form.multi_items():
                    if hasattr(value, "read"):
                        files.append((value.filename or key, await value.read()))
            finally:
                await form.close()
            if not files:
                raise RequestError(400, "The multipart body holds no file. Fix: send the image as a file part "
                                        "(curl -F file=@image.png; a text field is not a file).")
            return files
        if many:
            raise RequestError(415, f"/predict/batch takes multipart/form-data (one file part per image), not "
                                    f"{ctype or 'a body without Content-Type'}. Fix: curl -F files=@a.png -F "
                                    "files=@b.png ...")
        # curl --data-binary sends its default Content-Type (url-encoded form): the bytes decide.
        if ctype.startswith("application/x-www-form-urlencoded") and _kind_of(body) is None:
            raise RequestError(415, "A url-encoded form cannot carry an image. Fix: send multipart/form-data "
                                    "(curl -F file=@image.png) or the raw image bytes (--data-binary @image.png).")
        return [("body", body)]

    async def run(request: Request, many: bool, overlay: bool) -> list[dict]:
        service.check_key(request.headers)
        service.admit()
        released = False
        deadline = time.monotonic() + service.timeout_s
        try:
            limit = service.batch_upload if many else service.max_upload
            try:
                body = await asyncio.wait_for(read_body(request, limit), service.timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(408, f"The upload did not arrive within {service.timeout_s:g} s.") from None
            uploads = await uploads_of(request, body, many)
            del body
            if not many and len(uploads) > 1:
                raise RequestError(400, f"/predict takes one image, this request holds {len(uploads)}. Fix: send "
                                        "several to /predict/batch.")
            if len(uploads) > service.max_files:
                raise RequestError(413, f"{len(uploads)} files in one request, over the limit of {service.max_files}.")
            for name, data in uploads:
                if len(data) > service.max_upload:
                    raise RequestError(413, f"{name} is {len(data) / 1048576:.2f} MiB, over the limit of "
                                            f"{service.max_upload / 1048576:g} MiB per image.")
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(service.pool, service.score, uploads, overlay, deadline)
            future.add_done_callback(service.release)  # the slot is held until the work has ended
            released = True
            left = max(deadline - time.monotonic(), 0.001)
            try:
                results = await asyncio.wait_for(asyncio.shield(future), left)
            except asyncio.TimeoutError:
                service.timed_out += 1
                raise RequestError(504, f"No result within the request timeout ({service.timeout_s:g} s). Fix: "
                                        "retry, or start the server with a longer --timeout.") from None
            service.served += len(results)
            return results
        finally:
            if not released:
                service.release()

    @app.post("/predict", openapi_extra={"requestBody": _ONE_IMAGE_BODY},
              summary="Score one image (multipart file or raw body)")
    async def predict(request: Request, overlay: bool = Query(True, description="include the overlay PNG (base64)")):
        return (await run(request, many=False, overlay=overlay))[0]

    @app.post("/predict/batch", openapi_extra={"requestBody": _BATCH_BODY},
              summary="Score several images (multipart files)")
    async def predict_batch(request: Request, overlay: bool = Query(True, description="include the overlay PNGs")):
        results = await run(request, many=True, overlay=overlay)
        return {"n": len(results), "results": results}

    @app.get("/health", summary="Liveness and queue use (no API key needed)")
    async def health():
        return {"status": "ok", "model": backend.name, "version": backend.version,
                "queue": {"admitted": service.admitted, "max": service.max_queue},
                "served": service.served, "refused_busy": service.refused_busy, "timed_out": service.timed_out,
                "batches": service.batcher.batches, "uptime_s": round(time.time() - service.started, 1),
                "api_key_required": service.api_key is not None}

    @app.get("/model", summary="What is loaded: image size, thresholds, ROI, limits")
    async def model(request: Request):
        service.check_key(request.headers)
        return {**backend.info(), "runtime": getattr(backend, "runtime", "torch"), "limits": service.limits()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


DOCS_STATIC = "/docs-static"


def _docs_assets() -> Path | None:
    """The folder of Swagger UI 5 / ReDoc files shipped by the ``fastapi-offline`` package (in the
    ``serve`` extra), or None when it is not installed: then /docs is FastAPI's own page, which
    loads Swagger UI from a CDN."""
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    needed = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
    return folder if all((folder / name).is_file() for name in needed) else None


def _add_offline_docs(app, assets: Path) -> None:
    """/docs (Swagger UI) and /redoc from local files under :data:`DOCS_STATIC`: nothing from the
    internet, so the pages work on an offline network."""
    from fastapi import Request
    from fastapi.openapi.docs import (
        get_redoc_html,
        get_swagger_ui_html,
        get_swagger_ui_oauth2_redirect_html,
    )
    from fastapi.staticfiles import StaticFiles

    app.mount(DOCS_STATIC, StaticFiles(directory=str(assets)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API",
                                   swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
                                   oauth2_redirect_url=f"{root}{app.swagger_ui_oauth2_redirect_url}",
                                   swagger_ui_parameters=app.swagger_ui_parameters)

    @app.get(app.swagger_ui_oauth2_redirect_url, include_in_schema=False)
    async def docs_redirect():
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request):
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png", with_google_fonts=False)


def describe(app) -> str:
    """One line about a served app (the CLI prints it)."""
    s = app.state.service
    b = s.backend
    return (f"{b.name} ({b.kind}: {b.source}, version {b.version}), image size {b.image_size[0]}x{b.image_size[1]}, "
            f"threshold {b.threshold:.4g}; limits: {json.dumps(s.limits())}")


def app_from_environment():
    """The app built from ``DEFECTSCOPE_SERVE`` (JSON: model and create_app options): what each
    process of ``defectscope serve --workers N`` runs (uvicorn's factory form)."""
    settings = json.loads(os.environ["DEFECTSCOPE_SERVE"])
    return create_app(settings.pop("model"), **settings)
