"""The prediction writer (defectscope.deploy.outputs): CSV, regions, masks, maps, overlays and
report.html, without PyTorch, in bounded memory."""

from __future__ import annotations

import csv
import gc
import json
import re
import subprocess
import sys
import tracemalloc
import weakref
from collections import deque

import numpy as np
import pytest
from PIL import Image

from defectscope.deploy.outputs import (
    CSV_COLUMNS,
    PredictionWriter,
    find_regions,
    image_files,
    labels_from_csv,
    labels_from_layout,
    predict_files,
    resize_map,
)

QUIET = {"notice": lambda text: None}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def brute_force_regions(binary: np.ndarray) -> list[dict]:
    """8-connected components by flood fill, the slow obvious way."""
    seen = np.zeros_like(binary, dtype=bool)
    h, w = binary.shape
    regions = []
    for y in range(h):
        for x in range(w):
            if not binary[y, x] or seen[y, x]:
                continue
            queue, pixels = deque([(y, x)]), []
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                pixels.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and binary[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            ys, xs = zip(*pixels)
            regions.append({"x0": min(xs), "y0": min(ys), "x1": max(xs) + 1, "y1": max(ys) + 1, "area": len(pixels)})
    return regions


def known_map() -> np.ndarray:
    amap = np.zeros((40, 50), np.float32)
    amap[5:9, 6:16] = 0.8  # 40 px
    amap[9, 16] = 0.9  # touches the first only diagonally: same region with 8-connectivity
    amap[20:30, 30:33] = 0.7  # 30 px
    amap[25, 31] = 0.95
    amap[35, 2] = 0.6  # one pixel
    amap[38:40, 45:50] = 0.55  # at the border
    return amap


def test_regions_match_a_brute_force_flood_fill():
    amap = known_map()
    regions, mask, count = find_regions(amap, 0.5)
    expected = sorted(brute_force_regions(amap >= 0.5), key=lambda r: -r["area"])
    assert count == len(expected) == 4
    assert [{k: r[k] for k in ("x0", "y0", "x1", "y1", "area")} for r in regions] == expected
    assert regions[0]["area"] == 41 and regions[0]["peak"] == pytest.approx(0.9)
    assert regions[1]["peak"] == pytest.approx(0.95)
    assert mask.sum() == sum(r["area"] for r in expected)
    rng = np.random.default_rng(3)
    noisy = rng.random((33, 47)).astype(np.float32)
    regions, _, count = find_regions(noisy, 0.7)
    brute = brute_force_regions(noisy >= 0.7)
    assert count == len(brute) and find_regions(noisy, 0.7, limit=5)[0] == regions[:5]

    def key(r):
        return r["y0"], r["x0"], r["area"], r["x1"], r["y1"]

    assert sorted(({k: r[k] for k in ("x0", "y0", "x1", "y1", "area")} for r in regions), key=key) == sorted(brute, key=key)


def test_resize_map_is_torch_bilinear():
    torch = pytest.importorskip("torch")
    amap = np.random.default_rng(0).random((17, 23)).astype(np.float32)
    for size in ((64, 80), (9, 5), (17, 23), (40, 11)):
        ours = resize_map(amap, size)
        theirs = torch.nn.functional.interpolate(torch.from_numpy(amap)[None, None], size=size, mode="bilinear",
                                                 align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(ours, theirs, atol=5e-6)  # float32 round-off


def test_writer_rows_regions_masks_maps_and_overlays(tmp_path):
    amap = known_map()
    image = np.full((80, 100, 3), 120, np.uint8)  # twice the map's size: boxes in the image's pixels
    out = tmp_path / "out"
    writer = PredictionWriter(out, threshold=0.85, pixel_threshold=0.5, save_masks=True, save_maps="png16",
                              map_range=(0, 1), **QUIET)
    writer.add(tmp_path / "a.png", image, 0.9, amap, seconds=0.25)
    writer.add(tmp_path / "b.png", image[:40, :50], 0.1, np.zeros((40, 50), np.float32), seconds=0.5)
    summary = writer.close()
    assert summary["n_scored"] == 2 and summary["n_defect"] == 1
    rows = read_csv(out / "predictions.csv")
    assert list(rows[0]) == CSV_COLUMNS
    full = resize_map(amap, (80, 100))
    expected = sorted(brute_force_regions(full >= 0.5), key=lambda r: -r["area"])
    first = rows[0]
    assert first["verdict"] == "defect" and float(first["score"]) == pytest.approx(0.9)
    assert [int(first[k]) for k in ("x0", "y0", "x1", "y1", "area")] == [expected[0][k] for k in
                                                                          ("x0", "y0", "x1", "y1", "area")]
    assert int(first["regions"]) == len(expected) and float(first["seconds"]) == pytest.approx(0.25)
    assert float(first["peak"]) == pytest.approx(float(full[full >= 0.5].max()), abs=0.05)
    assert rows[1]["verdict"] == "good" and rows[1]["x0"] == "" and rows[1]["regions"] == "0"
    regions = json.loads((out / "regions.json").read_text())
    assert regions["pixel_threshold"] == 0.5 and regions["pixel_threshold_fitted"] is True
    listed = regions["images"][0]["regions"]
    assert [{k: r[k] for k in ("x0", "y0", "x1", "y1", "area")} for r in listed] == expected
    mask = np.asarray(Image.open(out / regions["images"][0]["mask"])) > 0
    assert mask.shape == (80, 100) and mask.sum() == sum(r["area"] for r in expected)
    with Image.open(out / regions["images"][0]["map"]) as png:
        low, high = float(png.text["defectscope_min"]), float(png.text["defectscope_max"])
        restored = low + np.asarray(png, dtype=np.float64) / 65535 * (high - low)
    np.testing.assert_allclose(restored, full, atol=(high - low) / 65535)
    with Image.open(out / regions["images"][0]["overlay"]) as strip:
        width, height = strip.size  # image | heat-map | contour, each the image's shape (enlarged)
        assert width % 3 == 0 and (width // 3) / height == pytest.approx(100 / 80, abs=0.02) and height >= 80
        contour = np.asarray(strip)[:, 2 * width // 3:]
        assert ((contour == (255, 32, 32)).all(axis=2)).any()  # the region's outline is drawn


def test_skipped_files_are_listed_and_a_missing_pixel_threshold_is_said_once(tmp_path):
    said = []
    writer = PredictionWriter(tmp_path, threshold=0.5, pixel_threshold=None, notice=said.append)
    writer.add("ok.png", np.zeros((32, 32, 3), np.uint8), 0.7, np.full((32, 32), 0.6, np.float32))
    writer.skip("broken.png", "Image broken.png: truncated.\n Fix: re-export it")
    writer.add("ok2.png", np.zeros((32, 32, 3), np.uint8), 0.2, np.zeros((32, 32), np.float32))
    writer.close()
    assert sum("no pixel threshold" in s for s in said) == 1
    assert any(s.startswith("skipped broken.png") for s in said)
    rows = read_csv(tmp_path / "predictions.csv")
    assert [r["verdict"] for r in rows] == ["defect", "skipped", "good"]
    assert rows[1]["reason"] == "Image broken.png: truncated. Fix: re-export it"
    assert rows[0]["area"] == str(32 * 32)  # the image threshold marked the regions
    page = (tmp_path / "report.html").read_text()
    assert 'id="skipped"' in page and "broken.png" in page and "truncated" in page


def test_report_is_self_contained_with_histogram_threshold_and_sorted_thumbnails(tmp_path):
    rng = np.random.default_rng(1)
    writer = PredictionWriter(tmp_path, threshold=0.6, pixel_threshold=0.7, report_images=6, map_range=(0, 1),
                              save_images=False, **QUIET)
    scores = rng.random(30)
    for i, score in enumerate(scores):
        writer.add(f"img{i}.png", rng.integers(0, 255, (24, 24, 3), dtype=np.uint8), float(score),
                   rng.random((24, 24)).astype(np.float32))
    writer.close()
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert 'id="score-histogram"' in page and 'id="threshold-line"' in page and "threshold 0.6" in page
    bars = re.findall(r'<rect class="bar unlabelled"[^>]*><title>unlabelled: (\d+) images', page)
    assert sum(map(int, bars)) == 30
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 6 and all(src.startswith("data:image/png;base64,") for src in images)
    shown = [int(m) for m in re.findall(r'<td class="file">img(\d+)\.png</td>', page)]
    order = list(np.argsort(-scores))
    assert shown == order[:3] + order[-3:]  # highest first, then the lowest, sorted by score
    assert 'id="metrics"' not in page  # no ground truth, no metrics


def test_metrics_with_ground_truth_equal_sklearn(tmp_path):
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 40)
    scores = rng.random(40) + 0.3 * labels
    truth = {f"img{i}.png": int(y) for i, y in enumerate(labels)}
    writer = PredictionWriter(tmp_path, threshold=0.7, pixel_threshold=0.9, save_images=False,
                              label_for=lambda p: truth.get(p.name), **QUIET)
    for i, score in enumerate(scores):
        writer.add(f"img{i}.png", np.zeros((8, 8, 3), np.uint8), float(score), np.zeros((8, 8), np.float32))
    writer.add("unlabelled.png", np.zeros((8, 8, 3), np.uint8), 0.5, np.zeros((8, 8), np.float32))
    metrics = writer.close()["metrics"]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics["n_labelled"] == 40 and metrics["n_unlabelled"] == 1
    assert metrics["false_reject_rate"] == pytest.approx(np.mean(scores[labels == 0] >= 0.7))
    page = (tmp_path / "report.html").read_text()
    shown = float(re.search(r'<td class="image_auroc">([0-9.]+)</td>', page).group(1))
    assert shown == pytest.approx(roc_auc_score(labels, scores), abs=1e-4)
    assert 'class="bar good"' in page and 'class="bar defect"' in page
    rows = read_csv(tmp_path / "predictions.csv")
    assert [r["label"] for r in rows[:3]] == [str(y) for y in labels[:3]] and rows[-1]["label"] == ""


def test_the_writer_keeps_no_map_and_bounded_memory(tmp_path):
    writer = PredictionWriter(tmp_path, threshold=0.5, pixel_threshold=0.9, report_images=4, map_range=(0, 1),
                              save_images=False, **QUIET)
    rng = np.random.default_rng(0)
    image = np.zeros((256, 256, 3), np.uint8)
    refs = []
    tracemalloc.start()
    try:
        for i in range(120):  # 120 maps of 256 KiB: 30 MiB if any were kept
            amap = rng.random((256, 256)).astype(np.float32) * 0.5
            amap[100:120, 40:90] = 0.95  # one region
            writer.add(f"img{i}.png", image, float(rng.random()), amap)
            refs.append(weakref.ref(amap))
            del amap
        gc.collect()
        _, peak = tracemalloc.get_traced_memory()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not any(ref() is not None for ref in refs)
    assert current < 4 * 2**20, current  # thumbnails and one float per image, not the maps
    assert peak < 12 * 2**20, peak
    writer.close()
    assert len(re.findall(r"<img ", (tmp_path / "report.html").read_text())) == 4


def test_the_writer_module_imports_no_torch():
    code = "import sys, defectscope.deploy.outputs; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_image_files_are_lazy_sorted_and_labels_come_from_the_layout(tmp_path):
    for name in ("good/b.png", "good/a.png", "crack/c.png", "crack/.hidden.png", "crack/notes.txt", "top.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    flat = list(image_files([tmp_path]))
    assert flat == [tmp_path / "top.png"]
    files = image_files([tmp_path], recursive=True)
    assert iter(files) is not files  # re-iterable, walked when iterated
    assert list(files) == [tmp_path / "top.png", tmp_path / "crack/c.png", tmp_path / "good/a.png",
                           tmp_path / "good/b.png"]
    label = labels_from_layout([tmp_path])
    assert [label(p) for p in files] == [None, 1, 0, 0]
    assert labels_from_layout([tmp_path / "crack"]) is None
    table = tmp_path / "labels.csv"
    table.write_text(f"file,label\n{tmp_path / 'top.png'},defect\nc.png,0\n")
    lookup = labels_from_csv(table)
    assert lookup(tmp_path / "top.png") == 1 and lookup(tmp_path / "crack/c.png") == 0 and lookup(tmp_path / "x.png") is None
    table.write_text("name,label\nx,1\n")
    with pytest.raises(ValueError, match="file"):
        labels_from_csv(table)


class FakeInferencer:
    """What defectscope.deploy.inferencer gives, in numpy: 16x16 input, mean-brightness score."""

    model_name, image_size, threshold, pixel_threshold, roi = "fake", (16, 16), 0.5, 0.6, None

    def preprocess(self, path):
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB").resize((16, 16)))

    def predict(self, batch):
        maps = batch.mean(axis=3) / 255.0
        return maps.reshape(len(batch), -1).max(axis=1), maps


def test_predict_files_streams_an_exported_models_results_and_skips_bad_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, level in enumerate((10, 250, 30)):
        Image.fromarray(np.full((20, 30, 3), level, np.uint8)).save(folder / f"{i}.png")
    (folder / "1b.png").write_bytes(b"not a png")
    writer = PredictionWriter(tmp_path / "out", 0.5, 0.6, **QUIET)
    counts = predict_files(FakeInferencer(), image_files([folder]), writer, batch_size=2)
    writer.close()
    assert counts == {"seen": 4, "scored": 3}
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [(r["file"].split("/")[-1], r["verdict"]) for r in rows] == [
        ("0.png", "good"), ("1.png", "defect"), ("1b.png", "skipped"), ("2.png", "good")]
    assert [rows[1][k] for k in ("x0", "y0", "x1", "y1", "area")] == ["0", "0", "30", "20", "600"]  # original pixels
    with pytest.raises(ValueError, match="None of the 1 files"):
        predict_files(FakeInferencer(), [folder / "1b.png"], PredictionWriter(tmp_path / "o2", 0.5, 0.6, **QUIET))
