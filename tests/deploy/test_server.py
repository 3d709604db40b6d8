"""The inspection server (defectscope.deploy.server, `defectscope serve`): the API for an exported
model and for a run folder, batch, health and model, the page, the API key, the busy (503) and
timeout (504) answers, and more than 20 kinds of bad request, each a 4xx with a JSON message,
after which the server still serves."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install 'defectscope[serve]'")
pytest.importorskip("multipart", reason="the server needs python-multipart: pip install 'defectscope[serve]'")
pytest.importorskip("onnxruntime", reason="the exported model needs onnxruntime: pip install 'defectscope[export]'")

from _server_helpers import make_model, png_bytes
from fastapi.testclient import TestClient

from defectscope.deploy.server import Backend, create_app

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def exported_client(model):
    with TestClient(create_app(model["onnx"], api_key="")) as client:
        yield client


@pytest.fixture(scope="module")
def run_client(model):
    with TestClient(create_app(model["run_dir"], api_key="")) as client:
        yield client


def _png_of(result: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(result["overlay_png"])))


def test_predict_matches_the_inferencer_multipart_and_raw(model, exported_client):
    from defectscope.deploy import load_inferencer

    inf = load_inferencer(model["onnx"])
    for path in model["images"]:
        data = path.read_bytes()
        r = exported_client.post("/predict", files={"file": (path.name, data, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        scores, _ = inf.predict(np.stack([inf.preprocess(path)]))
        assert body["score"] == pytest.approx(float(scores[0]), abs=1e-5)
        assert body["verdict"] == ("defect" if scores[0] >= inf.threshold else "good")
        assert body["threshold"] == pytest.approx(inf.threshold) and body["pixel_threshold"] == pytest.approx(0.55)
        assert body["model"]["name"].lower() == "supersimplenet" and body["model"]["version"]
        assert body["file"] == path.name and body["milliseconds"] > 0
        assert body["n_regions"] == len(body["regions"])
        for region in body["regions"]:
            assert region["peak"] >= 0.55 and 0 <= region["x0"] < region["x1"] <= 64
        strip = _png_of(body)
        assert strip.format == "PNG" and strip.size[0] == 3 * strip.size[1]  # image | heat-map | contour
        raw = exported_client.post("/predict?overlay=false", content=data)  # the raw body, no Content-Type
        curl = exported_client.post("/predict", content=data,  # curl --data-binary's default Content-Type
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert curl.status_code == 200 and curl.json()["score"] == pytest.approx(body["score"], abs=1e-6)
        assert raw.status_code == 200 and raw.json()["score"] == pytest.approx(body["score"], abs=1e-6)
        assert "overlay_png" not in raw.json()


def test_a_run_folder_is_served_through_pytorch_with_the_same_results(model, exported_client, run_client):
    for path in model["images"]:
        a = exported_client.post("/predict", content=path.read_bytes()).json()
        b = run_client.post("/predict", content=path.read_bytes()).json()
        assert b["score"] == pytest.approx(a["score"], abs=1e-3)
        assert a["verdict"] == b["verdict"]
    info = run_client.get("/model").json()
    assert info["kind"] == "run" and info["runtime"] == "torch" and info["image_size"] == [64, 64]


def test_batch_gives_one_result_per_file_in_order(model, exported_client):
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in model["images"]]
    r = exported_client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == len(files) and [x["file"] for x in body["results"]] == [p.name for p in model["images"]]
    for path, result in zip(model["images"], body["results"]):
        single = exported_client.post("/predict", content=path.read_bytes()).json()
        assert result["score"] == pytest.approx(single["score"], abs=1e-6)


def test_health_model_page_and_openapi(exported_client):
    health = exported_client.get("/health").json()
    assert health["status"] == "ok" and health["model"].lower() == "supersimplenet" and health["queue"]["max"] == 64
    info = exported_client.get("/model").json()
    assert info["kind"] == "exported" and info["image_size"] == [64, 64] and info["roi"] is None
    assert info["pixel_threshold_fitted"] is True
    assert info["limits"]["max_upload_mb"] == 20 and info["limits"]["api_key_required"] is False
    page = exported_client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file"' in page.text and 'id="overlay"' in page.text and 'id="recent"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from the internet
    spec = exported_client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health", "/model"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_the_docs_pages_load_only_local_files(exported_client):
    """/docs (Swagger UI 5, which renders the OpenAPI 3.1 FastAPI writes) and /redoc come from the
    fastapi-offline package's files: every script, style sheet and icon is on this server."""
    import re

    pytest.importorskip("fastapi_offline", reason="offline /docs needs fastapi-offline (the 'serve' extra)")
    for page, needed in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = exported_client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assert "http://" not in html.text and "https://" not in html.text, page  # nothing from the internet
        urls = re.findall(r'(?:src|href)="([^"]+)"', html.text) + re.findall(r"url: '([^']+)'", html.text)
        urls += re.findall(r'spec-url="([^"]+)"', html.text)
        assert any(u.endswith(needed) for u in urls) and "/openapi.json" in urls, (page, urls)
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), (page, url)
            assert exported_client.get(url).status_code == 200, (page, url)
    bundle = exported_client.get("/docs-static/swagger-ui-bundle.js").text
    assert re.search(r'PACKAGE_VERSION:"5\.', bundle), "Swagger UI 5.x renders OpenAPI 3.1"
    assert exported_client.get("/openapi.json").json()["openapi"].startswith("3.1")
    assert exported_client.get("/docs-static/nothing.js").status_code == 404


# ---- bad requests ---------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb() -> bytes:
    """A valid PNG header that claims 40000 x 40000 RGB pixels (4.8 GB decoded), 100 bytes long."""
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


def _nan_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


def bad_requests(good: bytes) -> list[tuple[str, dict, set[int]]]:
    """(what, httpx request arguments, accepted statuses): more than 20 kinds of bad request."""
    auth = {"X-API-Key": KEY}
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (1024 * 1024 + 10)

    def chunks():  # no Content-Length: the size is counted as it arrives
        for _ in range(20):
            yield b"\x89PNG\r\n\x1a\n" + b"\x00" * 65536

    multipart = {"Content-Type": "multipart/form-data; boundary=xyz", **auth}
    return [
        ("no API key", {"method": "POST", "url": "/predict", "content": good}, {401}),
        ("wrong API key", {"method": "POST", "url": "/predict", "content": good, "headers": {"X-API-Key": "nope"}}, {401}),
        ("wrong bearer token", {"method": "POST", "url": "/predict", "content": good,
                                    "headers": {"Authorization": "Bearer nope"}}, {401}),
        ("/model without the key", {"method": "GET", "url": "/model"}, {401}),
        ("empty body", {"method": "POST", "url": "/predict", "content": b"", "headers": auth}, {400}),
        ("over the size limit (Content-Length)", {"method": "POST", "url": "/predict", "content": big, "headers": auth}, {413}),
        ("over the size limit (chunked)", {"method": "POST", "url": "/predict", "content": chunks(), "headers": auth}, {413}),
        ("plain text", {"method": "POST", "url": "/predict", "content": b"hello, this is not an image\n", "headers": auth},
         {415}),
        ("a PDF named .png", {"method": "POST", "url": "/predict", "files": {"file": ("x.png", b"%PDF-1.7\n%...", "image/png")},
                                  "headers": auth}, {415}),
        ("a ZIP archive", {"method": "POST", "url": "/predict", "content": b"PK\x03\x04" + b"\x00" * 100, "headers": auth}, {415}),
        ("a GIF image", {"method": "POST", "url": "/predict", "content": _gif(), "headers": auth}, {415}),
        ("JSON", {"method": "POST", "url": "/predict", "json": {"image": "abc"}, "headers": auth}, {415}),
        ("SVG", {"method": "POST", "url": "/predict", "content": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "headers": auth},
         {415}),
        ("an HEIC photo", {"method": "POST", "url": "/predict", "content": b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40,
                               "headers": auth}, {415}),
        ("truncated PNG", {"method": "POST", "url": "/predict", "content": good[: len(good) // 2], "headers": auth}, {422}),
        ("PNG signature then garbage", {"method": "POST", "url": "/predict", "content": b"\x89PNG\r\n\x1a\n" + b"junk" * 50,
                                            "headers": auth}, {422}),
        ("decompression bomb", {"method": "POST", "url": "/predict", "content": _bomb(), "headers": auth}, {413}),
        ("BMP header then garbage", {"method": "POST", "url": "/predict", "content": b"BM" + b"\x01" * 60, "headers": auth},
         {422}),
        ("TIFF header then garbage", {"method": "POST", "url": "/predict", "content": b"II*\x00" + b"\xff" * 60,
                                          "headers": auth}, {422}),
        ("NaN float TIFF", {"method": "POST", "url": "/predict", "content": _nan_tiff(), "headers": auth}, {422}),
        ("multipart without a file part", {"method": "POST", "url": "/predict", "data": {"file": "not a file"},
                                               "files": {"other": ("", b"", "")}, "headers": auth}, {400}),
        ("multipart with an empty file", {"method": "POST", "url": "/predict", "files": {"file": ("a.png", b"", "image/png")},
                                              "headers": auth}, {400}),
        ("malformed multipart", {"method": "POST", "url": "/predict", "content": b"--xyz\r\nno headers end", "headers": multipart},
         {400}),
        ("multipart without a boundary", {"method": "POST", "url": "/predict", "content": good,
                                              "headers": {"Content-Type": "multipart/form-data", **auth}}, {400}),
        ("two images to /predict", {"method": "POST", "url": "/predict",
                                        "files": [("file", ("a.png", good, "image/png")), ("file", ("b.png", good, "image/png"))],
                                        "headers": auth}, {400}),
        ("url-encoded form", {"method": "POST", "url": "/predict", "data": {"image": "abc"}, "headers": auth}, {415}),
        ("overlay=maybe", {"method": "POST", "url": "/predict?overlay=maybe", "content": good, "headers": auth}, {422}),
        ("GET /predict", {"method": "GET", "url": "/predict", "headers": auth}, {405}),
        ("unknown path", {"method": "POST", "url": "/predictions", "content": good, "headers": auth}, {404}),
        ("raw body to /predict/batch", {"method": "POST", "url": "/predict/batch", "content": good, "headers": auth}, {415}),
        ("too many files in a batch", {"method": "POST", "url": "/predict/batch", "headers": auth,
                                           "files": [("files", (f"{i}.png", good, "image/png")) for i in range(5)]},
         {400, 413}),
        ("one file over the per-image limit in a batch", {"method": "POST", "url": "/predict/batch", "headers": auth,
                                                               "files": [("files", ("a.png", good, "image/png")),
                                                                      ("files", ("big.png", big, "image/png"))]}, {413}),
        ("one bad file in a batch", {"method": "POST", "url": "/predict/batch", "headers": auth,
                                         "files": [("files", ("a.png", good, "image/png")),
                                                ("files", ("b.png", b"not an image", "image/png"))]}, {415}),
    ]


def test_every_kind_of_bad_request_gets_a_4xx_with_a_message_and_the_server_goes_on(model):
    app = create_app(model["onnx"], api_key=KEY, max_upload_mb=1, max_files=4)
    good = model["images"][0].read_bytes()
    cases = bad_requests(good)
    assert len(cases) >= 20
    with TestClient(app, raise_server_exceptions=False) as client:
        seen = []
        for what, request, statuses in cases:
            r = client.request(**request)
            assert r.status_code in statuses, f"{what}: {r.status_code} {r.text[:300]}"
            body = r.json()
            assert isinstance(body.get("detail"), str) and len(body["detail"]) > 8, f"{what}: {body}"
            seen.append(r.status_code)
        assert all(400 <= s < 500 for s in seen)
        r = client.post("/predict", content=good, headers={"X-API-Key": KEY})
        assert r.status_code == 200 and r.json()["verdict"] in ("good", "defect")
        assert client.post("/predict", content=good, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/health").status_code == 200  # open to a load balancer without the key
        assert client.get("/").status_code == 200
        assert client.get("/health").json()["queue"]["admitted"] == 0  # every slot given back


def test_the_api_key_can_come_from_the_environment(model, monkeypatch):
    monkeypatch.setenv("DEFECTSCOPE_API_KEY", "from-env")
    with TestClient(create_app(model["onnx"])) as client:
        good = model["images"][0].read_bytes()
        assert client.post("/predict", content=good).status_code == 401
        assert client.post("/predict", content=good, headers={"X-API-Key": "from-env"}).status_code == 200
        assert client.get("/model", headers={"X-API-Key": "from-env"}).json()["limits"]["api_key_required"]


class SlowBackend(Backend):
    """A fake model that waits for ``gate`` (or ``delay`` seconds) before answering."""

    kind, name, version, image_size, threshold, pixel_threshold = "test", "Slow", "0", (16, 16), 0.5, 0.5

    def __init__(self, delay: float = 0.0) -> None:
        self.gate, self.delay = threading.Event(), delay

    def predict(self, batch):
        if self.delay:
            time.sleep(self.delay)
        else:
            self.gate.wait(10)
        return np.full(len(batch), 0.7, np.float32), np.zeros((len(batch), 16, 16), np.float32)


def test_a_full_queue_answers_503_with_retry_after_and_recovers():
    backend = SlowBackend()
    good = png_bytes(size=32)
    with TestClient(create_app(backend, api_key="", max_queue=2)) as client:
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(client.post("/predict", content=good)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while client.get("/health").json()["queue"]["admitted"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = client.post("/predict", content=good)
        assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1 and "busy" in busy.json()["detail"]
        backend.gate.set()
        for t in threads:
            t.join(10)
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["verdict"] == "defect"
        assert client.post("/predict", content=good).status_code == 200
        assert client.get("/health").json()["refused_busy"] == 1


def test_a_slow_model_answers_504_and_the_slot_comes_back():
    good = png_bytes(size=32)
    with TestClient(create_app(SlowBackend(delay=0.6), api_key="", timeout_s=0.2, max_queue=4)) as client:
        r = client.post("/predict", content=good)
        assert r.status_code == 504 and "timeout" in r.json()["detail"]
        deadline = time.monotonic() + 5
        while client.get("/health").json()["queue"]["admitted"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["queue"]["admitted"] == 0


def test_the_serve_command_is_registered_and_refuses_a_missing_model(tmp_path, capsys):
    from defectscope.cli import COMMANDS, build_parser, main

    assert "serve" in COMMANDS
    args = build_parser().parse_args(["serve", "m.onnx", "--port", "9000", "--api-key", "k", "--max-queue", "4"])
    assert (args.port, args.api_key, args.max_queue, args.host) == (9000, "k", 4, "127.0.0.1")
    assert main(["serve", str(tmp_path / "missing.onnx")]) == 2
    assert "No model at" in capsys.readouterr().err
    from defectscope import cli_serve
    from defectscope.deploy import server

    assert (cli_serve.DEFAULT_MAX_UPLOAD_MB, cli_serve.DEFAULT_MAX_QUEUE, cli_serve.DEFAULT_TIMEOUT_S,
            cli_serve.DEFAULT_MAX_BATCH) == (server.DEFAULT_MAX_UPLOAD_MB, server.DEFAULT_MAX_QUEUE,
                                             server.DEFAULT_TIMEOUT_S, server.DEFAULT_MAX_BATCH)


def test_serving_an_exported_model_never_imports_torch(model, tmp_path):
    """`defectscope serve model.onnx` goes from the command line to uvicorn.run (replaced here)
    without importing torch (~800 MiB RSS with it, ~130 MiB without); `serve --help` neither."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import uvicorn\n"
        "ran = []\n"
        "uvicorn.run = lambda app, **kw: ran.append((app, kw))\n"
        "from defectscope.cli import main\n"
        "status = main(sys.argv[1:])\n"
        "assert status == 0 and len(ran) == 1 and ran[0][1]['port'] == 8123, (status, ran)\n"
        "app = ran[0][0]\n"
        "assert app.state.service.backend.kind == 'exported'\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
        "print('torch-free')\n"
    )
    run = subprocess.run([sys.executable, "-c", code, "serve", str(model["onnx"]), "--port", "8123",
                          "--max-queue", "5"], capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert run.returncode == 0 and "torch-free" in run.stdout, run.stdout + run.stderr
    assert '"max_queue": 5' in run.stdout  # the options still reach create_app
    code = ("import sys\nfrom defectscope.cli import main\ntry:\n    main(['serve', '--help'])\n"
            "except SystemExit as e:\n    assert e.code == 0\nassert 'torch' not in sys.modules\nprint('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ok"), run.stdout + run.stderr
    assert "--max-queue" in run.stdout and "--workers" in run.stdout


def test_the_serve_command_line_is_checked_without_the_other_commands(capsys):
    from defectscope.cli import main

    assert main(["serve"]) == 2
    assert "required: model" in capsys.readouterr().err
    assert main(["serve", "m.onnx", "--prot", "9000"]) == 2
    assert "--prot -> --port" in capsys.readouterr().err
    assert main(["serve", "m.onnx", "--port", "x"]) == 2
    assert "see `defectscope serve --help`" in capsys.readouterr().err


def test_the_factory_for_process_managers_builds_the_app_from_the_environment(model, monkeypatch):
    import json

    from defectscope.deploy.server import app_from_environment

    monkeypatch.setenv("DEFECTSCOPE_SERVE", json.dumps({"model": str(model["onnx"]), "api_key": "", "max_queue": 3,
                                                        "model_threads": 1}))
    with TestClient(app_from_environment()) as client:
        assert client.get("/model").json()["limits"]["max_queue"] == 3
        assert client.post("/predict", content=model["images"][0].read_bytes()).status_code == 200
        docs = client.get("/docs")
        assert docs.status_code == 200 and "/openapi.json" in docs.text
