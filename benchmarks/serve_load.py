"""Load test of `defectscope serve` on 127.0.0.1 (by hand; writes benchmarks/results/serve.md).

    .venv/bin/python benchmarks/serve_load.py [--model export/model.onnx --images DIR] [--seconds 20]
    .venv/bin/python benchmarks/serve_load.py --only overfilled --seconds 10   # one part only
    .venv/bin/python benchmarks/serve_load.py --only scaleout                  # 1 vs 2 processes

Without --model it builds one: a SuperSimpleNet (efficientnet_lite0) at --image-size px with fitted
feature statistics (no training: the network's cost is the same), exported to ONNX, and synthetic
test images. Then:

1. `predict`'s batch throughput for that model: defectscope.deploy.outputs.predict_files (what
   `defectscope predict MODEL IMAGES` runs for an exported model), batch 8, overlays written;
2. the server in its own process (`python -m defectscope.cli serve`), 200 concurrent async clients
   (httpx) each sending one image after another for --seconds, --rounds times (the later rounds
   check that memory does not grow after warm-up): errors, p50 / p99 latency, throughput, server RSS before,
   during (peak) and after;
3. the same 200 clients against a queue of --small-queue: every refusal must be a 503 with Retry-After;
4. optionally (--workers 2) the server with 2 processes.

``--only main | overfilled | workers | scaleout`` runs one part (and writes serve_<part>.md).
``scaleout`` measures what more server processes give, with a light client: --scaleout-clients
(8) clients, raw body, ``?overlay=false`` (no overlay drawn, encoded or sent), against 1 process
with 1 model thread, then 2 processes (--workers 2) with 1 model thread each. Run it on a quiet
machine: the table reports the CPU cores the server processes and the client process used, and
the load average, so a comparison starved of cores shows as such.

Each row also reports the server's own time per answered request (``milliseconds`` in the
answer: decoding, waiting for and running the model, regions, overlay) and how late the client's
event loop woke up (its lag): client latency - server time = the HTTP path and the event loops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (from /proc/<pid>/stat)."""
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def own_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children(pid: int) -> list[int]:
    out = [pid]
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += children(int(child))
    except OSError:
        pass
    return out


def build_model(work: Path, size: int) -> tuple[Path, list[Path]]:
    import torch

    from defectscope.cli import main
    from defectscope.data import make_synthetic_mvtec
    from defectscope.models import SuperSimpleNet

    make_synthetic_mvtec(work / "data", category="tile", image_size=size, n_train=2, n_test_good=8, n_test_defect=8)
    images = sorted((work / "data" / "tile" / "test").rglob("*.png"))
    torch.manual_seed(0)
    model = SuperSimpleNet(backbone="efficientnet_lite0", image_size=size).eval()
    with torch.inference_mode():
        x = torch.rand(4, 3, size, size)
        mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
        model.fit_feature_statistics(model.extract_features((x - mean) / std))
        scores = [model.predict(p)[0] for p in images]
    model.threshold.fill_(float(np.median(scores)))
    model.pixel_threshold = 0.55
    model.save(work / "model")
    assert main(["export", str(work / "model"), "--output", str(work / "export"), "--exporter", "legacy"]) == 0
    return work / "export" / "model.onnx", images


def predict_throughput(model: Path, images: list[Path], n: int, out: Path) -> float:
    from defectscope.deploy import load_inferencer
    from defectscope.deploy.outputs import PredictionWriter, predict_files

    inf = load_inferencer(model)
    files = [images[i % len(images)] for i in range(n)]
    warm = PredictionWriter(out / "warm", inf.threshold, inf.pixel_threshold, report=False, notice=lambda t: None)
    predict_files(inf, files[:8], warm, batch_size=8)
    warm.close()
    writer = PredictionWriter(out / "run", inf.threshold, inf.pixel_threshold, report=False, notice=lambda t: None)
    started = time.perf_counter()
    predict_files(inf, files, writer, batch_size=8)
    writer.close()
    return n / (time.perf_counter() - started)


class Server:
    def __init__(self, model: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "defectscope.cli", "serve", str(model), "--port",
                                      str(self.port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not start: " + self.proc.stderr.read().decode()[-2000:])

    def rss(self) -> float:
        return rss_mib(children(self.proc.pid))

    def cpu(self) -> float:
        return cpu_seconds(children(self.proc.pid))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(server: Server, bodies: list[bytes], clients: int, seconds: float, overlay: bool = True) -> dict:
    latencies: list[float] = []
    server_ms: list[float] = []
    lags: list[float] = []
    statuses: dict[str, int] = {}
    retry_after_missing = 0
    peak = [server.rss()]
    stop = time.monotonic() + seconds
    url = server.url + "/predict" + ("" if overlay else "?overlay=false")

    async def sample():
        while time.monotonic() < stop:
            peak.append(server.rss())
            await asyncio.sleep(0.5)

    async def lag():  # how late this process's event loop wakes up: the client's own CPU starvation
        while time.monotonic() < stop:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            lags.append(time.monotonic() - t - 0.05)

    async def client(k: int, http: httpx.AsyncClient):
        nonlocal retry_after_missing
        i = k
        while time.monotonic() < stop:
            body = bodies[i % len(bodies)]
            i += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(url, content=body)
                key = str(r.status_code)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    at = r.content.rfind(b'"milliseconds":')  # the server's time (the last key: no full parse)
                    if at >= 0:
                        server_ms.append(float(r.content[at + 15:].split(b",")[0].split(b"}")[0]))
                elif r.status_code == 503:
                    retry_after_missing += "retry-after" not in r.headers
                    await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 5))  # as a client should
            except httpx.HTTPError as err:
                key = type(err).__name__
            statuses[key] = statuses.get(key, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        started = time.monotonic()
        server_cpu, client_cpu = server.cpu(), own_cpu_seconds()
        await asyncio.gather(sample(), lag(), *(client(k, http) for k in range(clients)))
        elapsed = time.monotonic() - started
        server_cpu, client_cpu = server.cpu() - server_cpu, own_cpu_seconds() - client_cpu
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    srv = np.array(server_ms) if server_ms else np.array([np.nan])
    lag_ms = np.array(lags) * 1000 if lags else np.array([np.nan])
    return {"clients": clients, "seconds": round(elapsed, 1), "ok": statuses.get("200", 0), "statuses": statuses,
            "retry_after_missing": retry_after_missing, "throughput": statuses.get("200", 0) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "server_p50_ms": float(np.percentile(srv, 50)), "lag_p50_ms": float(np.percentile(lag_ms, 50)),
            "lag_max_ms": float(lag_ms.max()), "server_cores": server_cpu / elapsed,
            "client_cores": client_cpu / elapsed, "rss_peak_mib": max(peak)}


def round_trip(server: Server, bodies, clients, seconds, overlay: bool = True) -> dict:
    before = server.rss()
    result = asyncio.run(load(server, bodies, clients, seconds, overlay))
    time.sleep(2)
    result.update(rss_before_mib=before, rss_after_mib=server.rss(), load_avg=os.getloadavg()[0])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="exported model; None: build one")
    parser.add_argument("--images", default=None, help="folder of images to send; None: the built model's")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the main load (later ones: memory growth)")
    parser.add_argument("--queue", type=int, default=256, help="--max-queue of the main rounds (>= clients: no 503)")
    parser.add_argument("--small-queue", type=int, default=16, help="--max-queue of the overfilled round")
    parser.add_argument("--workers", type=int, default=0, help="also measure this many server processes (0: no)")
    parser.add_argument("--predict-images", type=int, default=256,
                        help="images of the predict throughput measurement (0: skip it)")
    parser.add_argument("--only", choices=["all", "main", "overfilled", "workers", "scaleout"], default="all",
                        help="run one part only (all: main, overfilled and, with --workers, workers; scaleout: "
                             "1 vs 2 processes with a light client, never run by all)")
    parser.add_argument("--scaleout-clients", type=int, default=8, help="clients of the scaleout part")
    parser.add_argument("--output", default=None,
                        help="report; None: benchmarks/results/serve.md (all) or serve_<part>.md (--only)")
    args = parser.parse_args()
    if args.output is None:
        name = "serve.md" if args.only == "all" else f"serve_{args.only}.md"
        args.output = str(ROOT / "benchmarks" / "results" / name)
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    try:
        if args.model:
            model = Path(args.model)
            images = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".bmp"))
        else:
            model, images = build_model(work, args.image_size)
        bodies = [p.read_bytes() for p in images]
        load_start = os.getloadavg()
        predict_ips = float("nan")
        if args.predict_images > 0:
            predict_ips = predict_throughput(model, images, args.predict_images, work / "predict")
            print(f"predict (batch 8, overlays): {predict_ips:.1f} images/s", flush=True)
        rows = []

        def rounds(names, *server_args, clients=args.clients, overlay=True):
            """Start a server with ``server_args``, warm it up, load it once per name, stop it."""
            server = Server(model, *server_args, "--timeout", "120")
            try:
                asyncio.run(load(server, bodies, 8, 2, overlay))  # warm-up
                for name in names:
                    rows.append((name, round_trip(server, bodies, clients, args.seconds, overlay)))
                    print(name, json.dumps(rows[-1][1]), flush=True)
            finally:
                server.stop()

        if args.only in ("all", "main"):
            rounds([f"{args.clients} clients, round {k + 1}" for k in range(args.rounds)], "--max-queue",
                   str(args.queue))
        if args.only in ("all", "overfilled"):
            rounds([f"overfilled: queue {args.small_queue}, clients wait Retry-After"], "--max-queue",
                   str(args.small_queue))
        if (args.only == "all" and args.workers > 1) or args.only == "workers":
            workers = max(args.workers, 2)
            rounds([f"{workers} processes (--workers {workers})"], "--max-queue", str(args.queue),
                   "--workers", str(workers))
        if args.only == "scaleout":
            light = {"clients": args.scaleout_clients, "overlay": False}
            rounds(["scale-out: 1 process, 1 model thread"], "--max-queue", str(args.queue), "--model-threads", "1",
                   **light)
            rounds(["scale-out: 2 processes (--workers 2), 1 model thread each"], "--max-queue", str(args.queue),
                   "--workers", "2", "--model-threads", "1", **light)
        write_report(Path(args.output), args, predict_ips, rows, load_start, model)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_report(path: Path, args, predict_ips: float, rows, load_start, model: Path) -> None:
    lines = [
        "# `defectscope serve` under load (benchmarks/serve_load.py)",
        "",
        (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with other jobs; "
        f"load average before the run {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f} (1 / 5 / 15 min). "
        f"Model: {'given: ' + str(model) if args.model else f'SuperSimpleNet (efficientnet_lite0) at {args.image_size} px, exported to ONNX (onnxruntime)'}; "
        f"clients: httpx async on the same machine, each sending one PNG after another (the raw body, "
        + ("overlay returned" if args.only != "scaleout" else "`?overlay=false`: no overlay")
        + f"), {args.seconds:g} s per round. The clients share the CPUs with the server."),
        "",
        (f"`predict`'s batch throughput for the same model (predict_files, batch 8, overlays written): "
        f"**{predict_ips:.1f} images/s**; 0.75x of it: {0.75 * predict_ips:.1f} images/s."
         if np.isfinite(predict_ips) else "`predict`'s throughput: not measured (--predict-images 0)."),
        "",
        ("Server ms: the server's own time per answered request (p50; decode, model queue and run, regions, "
         "overlay). Loop lag: how late the client's event loop woke up (p50 / max). Cores: CPU seconds per "
         "second of the server processes and of the client process."),
        "",
        ("| round | clients | answered 200 | other answers | 503 without Retry-After | p50 ms | p99 ms | server ms "
         "| loop lag ms | cores server / client | images/s | vs predict | RSS before / peak / after MiB "
         "| load avg after |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        other = {k: v for k, v in r["statuses"].items() if k != "200"}
        versus = f"{r['throughput'] / predict_ips:.2f}x" if np.isfinite(predict_ips) else "-"
        lines.append(f"| {name} | {r['clients']} | {r['ok']} | {json.dumps(other) if other else 'none'} | "
                     f"{r['retry_after_missing']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['server_p50_ms']:.0f} | "
                     f"{r['lag_p50_ms']:.0f} / {r['lag_max_ms']:.0f} | {r['server_cores']:.2f} / "
                     f"{r['client_cores']:.2f} | {r['throughput']:.1f} | {versus} | {r['rss_before_mib']:.0f} / "
                     f"{r['rss_peak_mib']:.0f} / {r['rss_after_mib']:.0f} | {r['load_avg']:.2f} |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
