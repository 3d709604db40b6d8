"""Tiled inference on large frames: time and memory per megapixel, and whether one small defect
tops the stitched map.

Run by hand (not in CI):  python benchmarks/tiling.py [--threads 2] [--sizes 256 128] [--steps 60]

A generated 4000x2000 frame (defectscope.data.tiling.make_large_image: grey part, soft shading,
sensor noise) with one dark spot of radius 20 px (0.03 % of the frame). For each model input size
in ``--sizes``: a SuperSimpleNet (EfficientNet-Lite0, ``upscale_factor`` 1 as the CLI default)
is trained for ``--steps`` steps on the 256 px tiles (overlap 32) of one good frame, then:

- the defect frame and a good frame are scored with :class:`defectscope.data.tiling.Tiler`
  (162 tiles of 256x256, each resized to the model input, stitched at full resolution);
- wall time per megapixel (the median of ``--repeats`` runs, after one warm-up), and peak
  resident memory during a run above the resident memory before it (sampled every 5 ms from
  /proc/self/status);
- where the stitched map peaks against the defect's centre, and the two scores.

Appends a section to benchmarks/results/tiling.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """Peak resident memory while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.base = rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128], help="model input sizes")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="tiles per forward")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from defectscope.data.tiling import Tiler, make_large_image, tile_boxes
    from defectscope.models import SuperSimpleNet

    height, width, defect = 2000, 4000, (1300, 2900, 20)
    megapixels = height * width / 1e6
    good_train = make_large_image(height, width, seed=1)
    defect_frame = make_large_image(height, width, defect=defect, seed=3)
    good_frame = make_large_image(height, width, seed=4)
    boxes = tile_boxes(height, width, args.tile, args.overlap)
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        model = SuperSimpleNet(backbone="efficientnet_lite0", image_size=size, upscale_factor=1)
        tiler = Tiler(args.tile, args.overlap, batch_size=args.batch)
        started = time.perf_counter()
        pixels = torch.from_numpy(good_train).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            tiles = tiler._tiles(model, pixels, boxes)
            feats = torch.cat([model.extract_features(tiles[i : i + 64]) for i in range(0, len(tiles), 64)])
        model.fit_feature_statistics(feats)
        optimizer, _ = model.configure_optimizers(10)
        model.train()
        g = torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            loss = model.training_step(feats[torch.randperm(len(feats), generator=g)[:16]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        train_s = time.perf_counter() - started
        del feats, tiles
        tiler.predict(model, good_frame)  # warm-up
        times, peaks = [], []
        for _ in range(args.repeats):
            with PeakRss() as mem:
                t0 = time.perf_counter()
                score, full = tiler.predict(model, defect_frame)
                times.append(time.perf_counter() - t0)
            peaks.append(mem.peak - mem.base)
            del full
        score, full = tiler.predict(model, defect_frame)
        good_score, _ = tiler.predict(model, good_frame)
        peak_y, peak_x = np.unravel_index(int(full.argmax()), full.shape)
        seconds = statistics.median(times)
        rows.append(dict(size=size, tiles=len(boxes), train_s=train_s, seconds=seconds, s_per_mp=seconds / megapixels,
                         peak_mb=max(peaks), mb_per_mp=max(peaks) / megapixels,
                         offset=float(np.hypot(peak_y - defect[0], peak_x - defect[1])),
                         score=score, good=good_score))
        print(rows[-1], flush=True)

    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M')} — {width}x{height} frame, tiles {args.tile} px, overlap {args.overlap}, "
        f"{args.threads} threads\n",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}. "
        f"SuperSimpleNet (EfficientNet-Lite0, upscale_factor 1) trained {args.steps} steps on one good frame's tiles; "
        f"{args.batch} tiles per forward; time = median of {args.repeats} runs after a warm-up; memory = peak resident "
        "memory during a run above that before it.\n",
        "| model input | tiles | s / frame | s / megapixel | peak MB above baseline | MB / megapixel | map peak to defect centre (px) | defect score | good score | training (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['size']} | {r['tiles']} | {r['seconds']:.2f} | {r['s_per_mp']:.3f} | {r['peak_mb']:.0f} | "
                     f"{r['mb_per_mp']:.1f} | {r['offset']:.0f} | {r['score']:.4f} | {r['good']:.4f} | {r['train_s']:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "tiling.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
