"""``defectscope predict``: default batch size by measurement, and a 100,000-image folder in
bounded memory (run by hand, not in CI).

    python benchmarks/predict_scale.py [--threads 2] [--n 100000] [--work /tmp/predict_scale]

1. Batch size: ``Engine.predict`` end to end (read, score, write CSV / regions / overlays) on
   the default model (SuperSimpleNet, EfficientNet-Lite0, 256 px) over a folder of 300x300
   PNGs, at batch 1, 4, 8 and 32, round-robin so that background load hits every size alike;
   also the model's forward pass alone on pre-loaded tensors. Images/s, median of the rounds.
2. Scale: ``defectscope predict`` (a subprocess, default settings: overlays and report on) over
   a generated folder of ``--n`` 32x32 PNGs (written under ``--work``, never the repository)
   with a 64 px SuperSimpleNet (the images are 32 px; a 256 px model only costs more per image).
   Peak RSS (the child's own ``ru_maxrss``), RSS sampled during the run, and time; a 1,000-image run
   first for comparison: bounded memory means the same peak.

Appends the tables to benchmarks/results/predict.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).parent / "results" / "predict.md"


def save_model(folder: Path, image_size: int) -> Path:
    import torch

    from defectscope.models import SuperSimpleNet

    torch.manual_seed(0)
    model = SuperSimpleNet(backbone="efficientnet_lite0", image_size=image_size).eval()
    with torch.inference_mode():
        images = torch.rand(8, 3, image_size, image_size)
        mean = torch.tensor(model.mean).view(1, 3, 1, 1)
        std = torch.tensor(model.std).view(1, 3, 1, 1)
        model.fit_feature_statistics(model.extract_features((images - mean) / std))
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder)
    return folder


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
    for i in range(n):
        path = folder / f"img_{i:06d}.png"
        if path.exists():
            continue
        image = base.copy()
        y, x = rng.integers(0, size - 4, 2)
        image[y:y + 4, x:x + 4] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(image).save(path, compress_level=1)


def batch_sizes(args, work: Path) -> list[str]:
    import torch

    from defectscope.engine import Engine
    from defectscope.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model(save_model(work / "model256", 256))
    folder = work / "img300"
    write_images(folder, args.images, 300, seed=1)
    paths = sorted(folder.glob("*.png"))
    sizes = (1, 4, 8, 32)
    e2e = {b: [] for b in sizes}
    forward = {b: [] for b in sizes}
    x = torch.randn(32, 3, 256, 256)
    with torch.inference_mode():
        model(x[:2])  # warm-up
        for _ in range(args.rounds):
            for b in sizes:
                started = time.perf_counter()
                for i in range(0, 32, b):
                    model(x[i:i + b])
                forward[b].append(32 / (time.perf_counter() - started))
                out = work / f"pred_b{b}"
                shutil.rmtree(out, ignore_errors=True)
                engine = Engine(results_path=work, batch_size=b, accelerator="cpu", progress=False, max_epochs=1)
                started = time.perf_counter()
                engine.predict(model, paths, output_dir=out, return_results=False)
                e2e[b].append(len(paths) / (time.perf_counter() - started))
    lines = ["| batch | predict end to end, images/s | vs batch 1 | forward only, images/s | vs batch 1 |",
             "|---|---|---|---|---|"]
    for b in sizes:
        e, f = statistics.median(e2e[b]), statistics.median(forward[b])
        lines.append(f"| {b} | {e:.1f} | {e / statistics.median(e2e[1]):.2f}x | {f:.1f} | "
                     f"{f / statistics.median(forward[1]):.2f}x |")
    return lines


def run_predict(model: Path, folder: Path, out: Path, threads: int) -> dict:
    """``defectscope predict`` in a child process: time, peak RSS, RSS samples."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # The child says its own peak (ru_maxrss of RUSAGE_CHILDREN would count a fork of a big parent).
    code = (f"import resource, sys, torch; torch.set_num_threads({threads}); from defectscope.cli import main; "
            "code = main(sys.argv[1:]); "
            "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")
    command = [sys.executable, "-c", code, "predict", str(model), str(folder), "--output", str(out),
               "--accelerator", "cpu", "--no-progress"]
    samples: list[tuple[float, float, int]] = []
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def watch() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        csv = out / "predictions.csv"
        while proc.poll() is None:
            try:
                rss = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS"))
                rows = sum(1 for _ in open(csv)) - 1 if csv.exists() else 0
                samples.append((time.perf_counter() - started, rss / 1024, rows))
            except (OSError, StopIteration, ValueError):
                pass
            time.sleep(2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"predict failed ({proc.returncode}): {stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in stderr.splitlines() if line.startswith("peak_rss_kib")) / 1024
    sampled = max((s[1] for s in samples), default=float("nan"))
    return dict(seconds=seconds, peak_mib=peak, sampled_mib=sampled, samples=samples, stdout=stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=64, help="images per batch-size round (300x300)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/predict_scale")
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--batch-only", action="store_true", help="only the batch-size table")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} ({args.threads} threads, {os.cpu_count()} CPUs)\n"]
    if not args.skip_batch:
        report += [f"### Batch size: default model (SuperSimpleNet, EfficientNet-Lite0, 256 px), {args.images} "
                   f"PNGs 300x300, median of {args.rounds} rounds", ""]
        report += batch_sizes(args, work)
        print("\n".join(report), flush=True)
    if args.batch_only:
        with open(args.out, "a") as fh:
            fh.write("\n".join(report) + "\n")
        return
    model = save_model(work / "model64", 64)
    folder = work / f"img32_{args.n}"
    started = time.perf_counter()
    write_images(folder, args.n, 32)
    print(f"{args.n} images ready in {time.perf_counter() - started:.0f} s", flush=True)
    small_n = min(1000, args.n)
    small_folder = work / f"img32_{small_n}"
    write_images(small_folder, small_n, 32)
    small = run_predict(model, small_folder, work / f"out_{small_n}", args.threads)
    print(small["stdout"], small["peak_mib"], flush=True)
    big = run_predict(model, folder, work / f"out_{args.n}", args.threads)
    print(big["stdout"], big["peak_mib"], flush=True)
    report += ["", f"### Scale: `defectscope predict` over {args.n:,} PNGs 32x32, 64 px SuperSimpleNet, defaults "
               "(CPU batch size, overlays, regions, report)", "",
               "| images | time | images/s | peak RSS (the process's ru_maxrss) | largest RSS sampled every 2 s |",
               "|---|---|---|---|---|"]
    for n, run in ((small_n, small), (args.n, big)):
        report.append(f"| {n:,} | {run['seconds']:.0f} s | {n / run['seconds']:.0f} | {run['peak_mib']:.0f} MiB | "
                      f"{run['sampled_mib']:.0f} MiB |")
    marks = [s for s in big["samples"] if s[2] > 0]
    if marks:
        picks = [marks[int(q * (len(marks) - 1))] for q in (0.1, 0.25, 0.5, 0.75, 1.0)]
        report += ["", "RSS during the large run: " + ", ".join(f"{rows:,} rows written: {rss:.0f} MiB"
                                                                for _, rss, rows in picks)]
    report += ["", f"Output: `{big['stdout']}`"]
    text = "\n".join(report) + "\n"
    print(text)
    with open(args.out, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
