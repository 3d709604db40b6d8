"""Peak extra memory of PixelMetrics on an MVTec-like test set.

Run as a script to measure other sizes, e.g. the full MVTec AD test set::

    python tests/metrics/test_metrics_memory.py --images 1700
"""

import argparse
import time
import tracemalloc

import numpy as np

from defectscope.metrics import PixelMetrics

MAX_EXTRA_BYTES_PER_PIXEL = 3.0


def make_test_set(n_images: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 maps and bool masks [n, size, size]; every other image has 1-3 rectangular defects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(0, n_images, 2):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(2, size // 4, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = rng.random(masks.shape, dtype=np.float32)
    maps[masks] += 0.5
    return masks, maps


def measure_extra_bytes_per_pixel(masks: np.ndarray, maps: np.ndarray, batch_size: int = 32) -> tuple[float, dict]:
    """Peak traced allocations during update() + compute(), divided by the number of pixels."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        metrics = PixelMetrics()
        for start in range(0, len(masks), batch_size):
            metrics.update(maps[start : start + batch_size], masks[start : start + batch_size])
        values = metrics.compute()
        values.update({f"{key}_bound": value for key, value in metrics.error_bounds().items()})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / masks.size, values


def test_pixel_metrics_peak_memory_for_200_images():
    masks, maps = make_test_set(200)
    bytes_per_pixel, values = measure_extra_bytes_per_pixel(masks, maps)
    assert bytes_per_pixel < MAX_EXTRA_BYTES_PER_PIXEL, f"{bytes_per_pixel:.2f} extra bytes per pixel"
    assert values["aupro_bound"] < 1e-3 and values["pixel_auroc_bound"] < 1e-3
    assert 0.5 < values["pixel_auroc"] <= 1.0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    masks, maps = make_test_set(args.images)
    started = time.perf_counter()
    bytes_per_pixel, values = measure_extra_bytes_per_pixel(masks, maps, args.batch_size)
    seconds = time.perf_counter() - started
    print(f"{args.images} images, {masks.size / 1e6:.1f} M pixels, {seconds:.1f} s")
    print(f"peak extra memory: {bytes_per_pixel:.3f} bytes/pixel ({bytes_per_pixel * masks.size / 2**20:.1f} MiB)")
    print({key: round(value, 6) if value > 1e-6 else value for key, value in values.items()})
