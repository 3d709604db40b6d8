"""What ``defectscope predict`` writes, image by image as results come in (numpy, Pillow and
scipy only: no PyTorch, so an exported model's inferencer uses the same writer).

Output folder::

    predictions.csv   one row per input, in input order: file, score, verdict (good / defect /
                      skipped), threshold, seconds (reading the image plus its share of its
                      batch's model time), the largest defect region's box
                      (x0, y0, x1, y1 in the original image's pixels, x1 / y1 exclusive), its
                      area (pixels) and peak (largest map value in it), the number of regions,
                      the ground-truth label when known and, for a skipped file, the reason
    regions.json      every connected region (8-connected) of the map at or above the pixel
                      threshold, per image, largest first
    images/           image | heat-map | contour of the predicted region (one PNG per image)
    masks/            binary masks of the predicted regions (0 / 255 PNG), on request
    maps/             raw maps at the image's own size, ``.npy`` (float32) or 16-bit PNG whose
                      text chunk holds the value range (``defectscope_min`` / ``_max``), on request
    report.html       one self-contained page: summary, score histogram with the threshold,
                      metrics when ground truth is known, the highest and lowest scores with
                      thumbnails, the skipped files

Memory stays bounded whatever the number of images: each map is used and dropped in
:meth:`PredictionWriter.add`; the writer keeps one float per image (the histogram and the
metrics) and small thumbnails of at most ``report_images`` images.
"""

from __future__ import annotations

import base64
import csv
import heapq
import html
import io
import json
import math
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = [
    "CSV_COLUMNS",
    "PredictionWriter",
    "find_regions",
    "image_files",
    "labels_from_csv",
    "labels_from_layout",
    "overlay_strip",
    "resize_map",
]

CSV_COLUMNS = ["file", "score", "verdict", "threshold", "seconds", "x0", "y0", "x1", "y1", "area", "peak",
               "regions", "label", "reason"]
MAP_FORMATS = ("npy", "png16")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # as defectscope.data.images
# Regions listed per image in regions.json (the count is always given in full).
MAX_REGIONS = 100
_EIGHT = np.ones((3, 3), dtype=bool)


# ---- inputs ---------------------------------------------------------------------------------
class image_files(Iterable):  # a class used like a function: re-iterable
    """The image files of ``inputs`` (files and folders), listed lazily and re-iterable.

    A folder gives its image files (by extension, hidden entries ignored) sorted by name, and,
    with ``recursive``, those of its sub-folders (depth first, sorted). Only one folder's names
    are held at a time. A file is given as it is (even without an image extension: reading it
    says what is wrong), and so is a path that does not exist (reported as skipped)."""

    def __init__(self, inputs: Iterable[str | os.PathLike], recursive: bool = False) -> None:
        self.inputs = [Path(p) for p in inputs]
        self.recursive = recursive

    def __iter__(self) -> Iterator[Path]:
        for item in self.inputs:
            if item.is_dir():
                yield from self._walk(item)
            else:
                yield item

    def _walk(self, folder: Path) -> Iterator[Path]:
        try:
            with os.scandir(folder) as entries:
                names = sorted((e.name, e.is_dir()) for e in entries if not e.name.startswith("."))
        except OSError:
            return
        for name, is_dir in names:
            if not is_dir and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield folder / name
        if self.recursive:
            for name, is_dir in names:
                if is_dir:
                    yield from self._walk(folder / name)


def labels_from_layout(inputs: Iterable[str | os.PathLike]) -> Callable[[Path], int | None] | None:
    """Ground truth from an MVTec-style layout: for each input folder that has a ``good``
    sub-folder, images below ``good/`` are good (0) and images below its other sub-folders are
    defective (1). None when no input folder has a ``good`` sub-folder."""
    roots = [Path(p) for p in inputs if Path(p).is_dir() and (Path(p) / "good").is_dir()]
    if not roots:
        return None
    roots = [(str(r), len(r.parts)) for r in roots]

    def label(path: Path) -> int | None:
        path = Path(path)
        for root, depth in roots:
            if str(path).startswith(root.rstrip(os.sep) + os.sep) and len(path.parts) > depth + 1:
                return 0 if path.parts[depth] == "good" else 1
        return None

    return label


_LABEL_WORDS = {"0": 0, "1": 1, "good": 0, "ok": 0, "false": 0, "normal": 0,
                "defect": 1, "bad": 1, "ng": 1, "true": 1, "anomaly": 1, "anomalous": 1}


def labels_from_csv(path: str | os.PathLike) -> Callable[[Path], int | None]:
    """Ground truth from a CSV with a ``file`` and a ``label`` column (0 / 1, good / defect,
    ok / ng). A file is matched by its path as given, its absolute path, or else its name."""
    path = Path(path)
    by_path: dict[str, int] = {}
    by_name: dict[str, int | None] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        if "file" not in columns or "label" not in columns:
            raise ValueError(f"--labels {path}: needs the columns 'file' and 'label', it has "
                             f"{', '.join(reader.fieldnames or []) or 'none'}. Fix: name them file,label.")
        for line, row in enumerate(reader, start=2):
            name, value = row[columns["file"]].strip(), str(row[columns["label"]]).strip().lower()
            if value not in _LABEL_WORDS:
                raise ValueError(f"--labels {path}, line {line}: label {value!r} is not 0/1 (or good/defect, "
                                 "ok/ng). Fix: use 0 for good and 1 for defective.")
            by_path[name] = by_path[str(Path(name).resolve())] = _LABEL_WORDS[value]
            base = Path(name).name
            by_name[base] = _LABEL_WORDS[value] if base not in by_name else None  # None: ambiguous name
    def label(file: Path) -> int | None:
        text = str(file)
        if text in by_path:
            return by_path[text]
        resolved = str(Path(file).resolve())
        if resolved in by_path:
            return by_path[resolved]
        return by_name.get(Path(file).name)

    return label


# ---- maps and regions -----------------------------------------------------------------------
def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map ``[h, w]`` to ``size`` (h, w), pixel centres aligned and
    edges clamped (as ``torch.nn.functional.interpolate(..., mode="bilinear",
    align_corners=False)``, which ``model.predict`` uses), float32."""
    amap = np.asarray(amap, dtype=np.float32)
    out_h, out_w = int(size[0]), int(size[1])
    if amap.shape == (out_h, out_w):
        return amap

    def axis(n_in: int, n_out: int):
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w1 = (src - i0).astype(np.float32)
        return i0, i1, w1

    r0, r1, rw = axis(amap.shape[0], out_h)
    c0, c1, cw = axis(amap.shape[1], out_w)
    rows = amap[r0] * (1 - rw)[:, None] + amap[r1] * rw[:, None]
    return (rows[:, c0] * (1 - cw)[None, :] + rows[:, c1] * cw[None, :]).astype(np.float32)


def find_regions(amap: np.ndarray, level: float, limit: int | None = None) -> tuple[list[dict], np.ndarray, int]:
    """Connected regions (8-connected) of ``amap >= level``: ``(regions, mask, count)`` with
    ``regions`` the ``limit`` largest (all when None), largest first (equal areas in raster
    order of their first pixel), each ``{"x0", "y0", "x1", "y1", "area", "peak", "mean"}`` with
    x1 / y1 exclusive; ``mask`` the binary map and ``count`` the number of regions."""
    binary = amap >= level
    labelled, count = ndimage.label(binary, structure=_EIGHT)
    if count == 0:
        return [], binary, 0
    areas = np.bincount(labelled.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-areas, kind="stable")[:limit]
    index = order + 1
    peaks = ndimage.maximum(amap, labelled, index)
    means = ndimage.mean(amap, labelled, index)
    boxes = ndimage.find_objects(labelled)
    regions = []
    for k, i in enumerate(order):
        rows, cols = boxes[i]
        regions.append({"x0": int(cols.start), "y0": int(rows.start), "x1": int(cols.stop), "y1": int(rows.stop),
                        "area": int(areas[i]), "peak": float(peaks[k]), "mean": float(means[k])})
    return regions, binary, int(count)


# ---- pictures -------------------------------------------------------------------------------
def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map: values in [0, 1] -> RGB uint8 (blue, cyan, yellow, red)."""
    x = np.clip(values, 0.0, 1.0)[..., None] * 4.0
    rgb = np.clip(1.5 - np.abs(x - np.array([3.0, 2.0, 1.0], dtype=np.float32)), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _fit(size: tuple[int, int], low: int, high: int) -> tuple[int, int]:
    """(w, h) scaled so that the longer side lies in [low, high]."""
    w, h = size
    scale = min(1.0, high / max(w, h))
    scale = max(scale, low / max(w, h)) if max(w, h) < low else scale
    return max(1, round(w * scale)), max(1, round(h * scale))


def overlay_strip(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, vmin: float, vmax: float,
                  caption: str = "", defect: bool = False, panel: tuple[int, int] = (128, 512)) -> Image.Image:
    """``image | heat-map | contour of the predicted region`` side by side (RGB), each panel
    scaled so that its longer side lies in ``panel`` (small images are enlarged, large ones
    reduced). ``image`` uint8 ``[H, W, 3]``, ``amap`` and ``mask`` ``[H, W]`` at its size."""
    h, w = image.shape[:2]
    pw, ph = _fit((w, h), *panel)
    picture = Image.fromarray(image)
    if (pw, ph) != (w, h):
        picture = picture.resize((pw, ph), Image.BILINEAR if pw < w else Image.NEAREST)
    base = np.asarray(picture)
    small_map = resize_map(amap, (ph, pw)) if (pw, ph) != (w, h) else amap
    scaled = (small_map - vmin) / max(vmax - vmin, 1e-12)
    heat = (base.astype(np.float32) * 0.5 + jet(scaled).astype(np.float32) * 0.5 + 0.5).astype(np.uint8)
    region = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((pw, ph), Image.NEAREST)) > 127 \
        if (pw, ph) != (w, h) else mask.astype(bool)
    edge = region & ~ndimage.binary_erosion(region, structure=_EIGHT, border_value=0)
    edge = ndimage.binary_dilation(edge, structure=_EIGHT) if min(pw, ph) >= 96 else edge
    contour = base.copy()
    contour[region] = (0.7 * contour[region] + [76, 0, 0]).astype(np.uint8)
    contour[edge] = (255, 32, 32)
    strip = Image.fromarray(np.concatenate([base, heat, contour], axis=1))
    if caption:
        draw = ImageDraw.Draw(strip)
        width = min(strip.size[0], 6 * len(caption) + 6)
        draw.rectangle((0, 0, width, 12), fill=(0, 0, 0))
        draw.text((3, 1), caption, fill=(255, 80, 80) if defect else (120, 255, 120))
    return strip


def _png_base64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(value: float, digits: int = 6) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


# ---- the writer -----------------------------------------------------------------------------
class PredictionWriter:
    """Writes predictions as they come: ``add`` one scored image, ``skip`` one unreadable
    file, ``close`` at the end (writes ``report.html``; ground truth, if any, adds metrics).

    Args:
        out_dir: the output folder (created).
        threshold: the image score at or above which an image is a defect.
        pixel_threshold: the map level that marks defect regions; None (a model saved before
            it existed): the image threshold is used, with one notice.
        save_images: write ``images/`` overlays.
        save_masks: write ``masks/`` (binary PNG at the image's size).
        save_maps: ``"npy"`` or ``"png16"`` to write ``maps/``, None for none.
        map_range: (low, high) of the heat-map colours; None: from the first image's map,
            low = its minimum, high = the same distance above the pixel threshold (so the
            threshold sits mid-scale).
        report: write ``report.html``; ``report_images``: thumbnails in it (half the highest
            scores, half the lowest).
        label_for: ``callable(path) -> 0 / 1 / None``, the ground truth of an image when known.
        model_name, model_source: shown in the report.
        notice: ``callable(text)`` for the run's notices (default: ``notice: ...`` on stderr).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        threshold: float,
        pixel_threshold: float | None = None,
        *,
        save_images: bool = True,
        save_masks: bool = False,
        save_maps: str | None = None,
        map_range: tuple[float, float] | None = None,
        report: bool = True,
        report_images: int = 40,
        label_for: Callable[[Path], int | None] | None = None,
        model_name: str = "",
        model_source: str = "",
        notice: Callable[[str], None] | None = None,
    ) -> None:
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if save_maps not in (None, *MAP_FORMATS):
            raise ValueError(f"save_maps must be one of {', '.join(MAP_FORMATS)} or None, got {save_maps!r}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.notice = notice or (lambda text: print(f"notice: {text}", file=sys.stderr, flush=True))
        self.threshold = float(threshold)
        self.pixel_threshold_fitted = pixel_threshold is not None
        self.pixel_threshold = float(pixel_threshold) if pixel_threshold is not None else self.threshold
        if pixel_threshold is None:
            self.notice(f"this model has no pixel threshold (saved before defectscope fitted one): defect regions "
                        f"and masks use the image threshold {self.threshold:.4g} instead. Fix: retrain, or pass "
                        "--pixel-threshold")
        self.save_images, self.save_masks, self.save_maps = save_images, save_masks, save_maps
        self.map_range = tuple(float(v) for v in map_range) if map_range is not None else None
        self.report, self.report_images = report, max(0, int(report_images))
        self.label_for = label_for
        self.model_name, self.model_source = model_name, model_source
        self.started = time.perf_counter()
        self.model_seconds = 0.0
        # One float / byte per image: the histogram and the metrics.
        self.scores = array("f")
        self.labels = array("b")  # -1 unknown
        self.n_defect = 0
        self.skipped: list[tuple[str, str]] = []  # capped in the report, counted in full
        self.n_skipped = 0
        self._index = 0
        self._top: list = []  # min-heap of the highest scores: (score, seq, row, thumbnail)
        self._bottom: list = []  # min-heap of -score: the lowest scores
        self._csv_file = open(self.out / "predictions.csv", "w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS)
        self._csv.writeheader()
        self._regions = open(self.out / "regions.json", "w")
        self._regions.write('{\n"threshold": %s,\n"pixel_threshold": %s,\n"pixel_threshold_fitted": %s,\n'
                            '"box": "x0, y0, x1, y1 in the original image\'s pixels, x1 and y1 exclusive",\n'
                            '"images": [' % (json.dumps(self.threshold), json.dumps(self.pixel_threshold),
                                             json.dumps(self.pixel_threshold_fitted)))
        self._first_region = True
        self.closed = False

    # ---- per image ---------------------------------------------------------------------------
    def _name(self, path: Path, suffix: str) -> str:
        return f"{self._index:06d}_{Path(path).stem}{suffix}"

    def _label(self, path: Path) -> int | None:
        return self.label_for(Path(path)) if self.label_for is not None else None

    def add(self, path: str | os.PathLike, image: np.ndarray, score: float, amap: np.ndarray,
            seconds: float = math.nan) -> dict:
        """One scored image: ``image`` uint8 RGB ``[H, W, 3]`` as read (any size), its
        ``score`` and ``amap`` (``[h, w]``, any size: resized to the image's). Writes its CSV
        row, regions, overlay (mask, map) now; keeps nothing of the map. Returns the CSV row."""
        path = Path(path)
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        height, width = image.shape[:2]
        full = resize_map(np.asarray(amap, dtype=np.float32), (height, width))
        score = float(score)
        defect = score >= self.threshold
        regions, mask, n_regions = find_regions(full, self.pixel_threshold, limit=MAX_REGIONS)
        label = self._label(path)
        biggest = regions[0] if regions else {}
        row = {"file": str(path), "score": _number(score, 8), "verdict": "defect" if defect else "good",
               "threshold": _number(self.threshold, 8), "seconds": f"{seconds:.5f}" if math.isfinite(seconds) else "",
               **{k: biggest.get(k, "") for k in ("x0", "y0", "x1", "y1", "area")},
               "peak": _number(biggest["peak"], 6) if biggest else "", "regions": n_regions,
               "label": "" if label is None else label, "reason": ""}
        self._csv.writerow(row)
        entry = {"file": str(path), "score": score, "verdict": row["verdict"], "width": width, "height": height,
                 "n_regions": n_regions, "regions": regions}
        if self.map_range is None:
            low = float(full.min())
            self.map_range = (low, self.pixel_threshold + max(self.pixel_threshold - low, 1e-6))
        if self.save_masks:
            folder = self.out / "masks"
            folder.mkdir(exist_ok=True)
            entry["mask"] = f"masks/{self._name(path, '.png')}"
            Image.fromarray(mask.astype(np.uint8) * 255).save(self.out / entry["mask"], compress_level=1)
        if self.save_maps:
            (self.out / "maps").mkdir(exist_ok=True)
            entry["map"] = self._save_map(path, full)
        need_thumb = self._wants_thumbnail(score)
        if self.save_images or need_thumb:
            strip = overlay_strip(image, full, mask, *self.map_range, caption=f"{row['verdict']} {score:.3f}",
                                  defect=defect)
            if self.save_images:
                (self.out / "images").mkdir(exist_ok=True)
                entry["overlay"] = f"images/{self._name(path, '.png')}"
                strip.save(self.out / entry["overlay"], compress_level=1)
            if need_thumb:
                thumb = strip.copy()
                thumb.thumbnail((3 * 96, 96))
                self._keep_thumbnail(score, row, _png_base64(thumb))
        self._regions.write(("\n" if self._first_region else ",\n") + json.dumps(entry))
        self._first_region = False
        self.scores.append(score)
        self.labels.append(-1 if label is None else int(label))
        self.n_defect += defect
        self._index += 1
        return row

    def _save_map(self, path: Path, full: np.ndarray) -> str:
        if self.save_maps == "npy":
            name = f"maps/{self._name(path, '.npy')}"
            np.save(self.out / name, full.astype(np.float32))
            return name
        from PIL import PngImagePlugin

        name = f"maps/{self._name(path, '.png')}"
        low, high = float(full.min()), float(full.max())
        levels = np.round((full - low) / max(high - low, 1e-30) * 65535).astype(np.uint16)
        info = PngImagePlugin.PngInfo()
        info.add_text("defectscope_min", repr(low))
        info.add_text("defectscope_max", repr(high))
        Image.fromarray(levels).save(self.out / name, pnginfo=info, compress_level=1)
        return name

    def _wants_thumbnail(self, score: float) -> bool:
        if not self.report or self.report_images == 0:
            return False
        half_top, half_bottom = (self.report_images + 1) // 2, self.report_images // 2
        return (len(self._top) < half_top or score > self._top[0][0]
                or (half_bottom > 0 and (len(self._bottom) < half_bottom or -score > self._bottom[0][0])))

    def _keep_thumbnail(self, score: float, row: dict, thumb: str) -> None:
        half_top, half_bottom = (self.report_images + 1) // 2, self.report_images // 2
        item = (row["file"], row, thumb)
        seq = self._index
        if len(self._top) < half_top:
            heapq.heappush(self._top, (score, seq, item))
        elif score > self._top[0][0]:
            heapq.heapreplace(self._top, (score, seq, item))
        if half_bottom > 0:
            if len(self._bottom) < half_bottom:
                heapq.heappush(self._bottom, (-score, -seq, item))
            elif -score > self._bottom[0][0]:
                heapq.heapreplace(self._bottom, (-score, -seq, item))

    def skip(self, path: str | os.PathLike, reason: str) -> dict:
        """One file that could not be used: listed in the CSV and the report with ``reason``,
        and said as a notice; the run goes on."""
        reason = " ".join(str(reason).split())
        row = {k: "" for k in CSV_COLUMNS}
        row.update(file=str(path), verdict="skipped", reason=reason)
        label = self._label(Path(path))
        row["label"] = "" if label is None else label
        self._csv.writerow(row)
        self.n_skipped += 1
        if len(self.skipped) < 200:
            self.skipped.append((str(path), reason))
        self.notice(f"skipped {path}: {reason}")
        self._index += 1
        return row

    def flush(self) -> None:
        """Push what was written so far to disk (after each batch)."""
        self._csv_file.flush()
        self._regions.flush()

    @property
    def n_scored(self) -> int:
        return len(self.scores)

    # ---- the end -----------------------------------------------------------------------------
    def metrics(self) -> dict | None:
        """Image-level metrics over the scored images whose ground truth is known (None when
        none is): image AUROC, F1-max, and the false-reject / escape rates at the threshold."""
        labels = np.frombuffer(self.labels, dtype=np.int8) if len(self.labels) else np.zeros(0, np.int8)
        known = labels >= 0
        if not known.any():
            return None
        from defectscope.metrics import MetricUndefinedError, f1_max, image_auroc
        from defectscope.metrics.threshold import verdict_rates

        y = labels[known].astype(np.int64)
        s = np.frombuffer(self.scores, dtype=np.float32)[known].astype(np.float64)
        out: dict = {"n_labelled": int(known.sum()), "n_unlabelled": int((~known).sum()), "notes": []}
        out.update(verdict_rates(y, s, self.threshold))
        out["accuracy"] = float(np.mean((s >= self.threshold) == (y == 1)))
        try:
            out["image_auroc"] = image_auroc(y, s)
        except MetricUndefinedError as err:
            out["image_auroc"] = math.nan
            out["notes"].append(str(err))
        try:
            out["image_f1_max"], out["f1_threshold"] = f1_max(y, s)
        except MetricUndefinedError as err:
            out["image_f1_max"] = out["f1_threshold"] = math.nan
            out["notes"].append(str(err))
        return out

    def close(self, labels: dict | Callable | None = None) -> dict:
        """Finish ``predictions.csv`` and ``regions.json`` and write ``report.html``. ``labels``
        (optional, a ``{path: 0/1}`` dict or ``callable(path)``) replaces the ground truth for
        images added without one. Returns a summary (counts, metrics or None, paths)."""
        if self.closed:
            return self.summary
        if labels is not None:
            lookup = labels if callable(labels) else (lambda p, d=labels: d.get(str(p)))
            self._relabel(lookup)
        self._csv_file.close()
        self._regions.write("\n]\n}\n")
        self._regions.close()
        metrics = self.metrics()
        seconds = time.perf_counter() - self.started
        self.summary = {"n_scored": self.n_scored, "n_defect": self.n_defect, "n_skipped": self.n_skipped,
                        "threshold": self.threshold, "pixel_threshold": self.pixel_threshold,
                        "pixel_threshold_fitted": self.pixel_threshold_fitted, "metrics": metrics,
                        "seconds": seconds, "csv": self.out / "predictions.csv", "regions": self.out / "regions.json",
                        "report": self.out / "report.html" if self.report else None}
        if self.report:
            (self.out / "report.html").write_text(self._html(metrics, seconds), encoding="utf-8")
        self.closed = True
        return self.summary

    def _relabel(self, lookup: Callable) -> None:
        """Labels given at close: read the CSV back (file order = add order) to match them."""
        self._csv_file.flush()
        with open(self.out / "predictions.csv", newline="") as fh:
            files = [r["file"] for r in csv.DictReader(fh) if r["verdict"] != "skipped"]
        for i, file in enumerate(files):
            if self.labels[i] < 0:
                value = lookup(Path(file))
                if value is not None:
                    self.labels[i] = int(value)

    # ---- report.html -------------------------------------------------------------------------
    def _histogram_svg(self) -> str:
        scores = np.frombuffer(self.scores, dtype=np.float32).astype(np.float64)
        labels = np.frombuffer(self.labels, dtype=np.int8)
        width, height, left, bottom, top = 720, 240, 50, 40, 24
        low = min(float(scores.min()), self.threshold) if scores.size else self.threshold - 1
        high = max(float(scores.max()), self.threshold) if scores.size else self.threshold + 1
        if high - low < 1e-12:
            low, high = low - 0.5, high + 0.5
        pad = (high - low) * 0.02
        low, high = low - pad, high + pad
        bins = 40
        edges = np.linspace(low, high, bins + 1)
        groups = [("good", "#2e8b57", labels == 0), ("defect", "#c0392b", labels == 1),
                  ("unlabelled", "#4a6fa5", labels < 0)]
        counts = {name: np.histogram(scores[sel], edges)[0] for name, _, sel in groups if sel.any()}
        peak = max((int(sum(c[i] for c in counts.values())) for i in range(bins)), default=1) or 1
        plot_w, plot_h = width - left - 10, height - bottom - top

        def x_of(v: float) -> float:
            return left + (v - low) / (high - low) * plot_w

        parts = [f'<svg id="score-histogram" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
                 'role="img" aria-label="score histogram with the threshold">',
                 f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>']
        base = np.zeros(bins)
        for name, colour, _ in groups:
            if name not in counts:
                continue
            for i, n in enumerate(counts[name]):
                if n == 0:
                    continue
                x0, x1 = x_of(edges[i]), x_of(edges[i + 1])
                h = n / peak * plot_h
                y = top + plot_h - (base[i] / peak * plot_h) - h
                parts.append(f'<rect class="bar {name}" x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                             f'height="{h:.1f}" fill="{colour}"><title>{name}: {n} images with scores '
                             f'{edges[i]:.4g} to {edges[i + 1]:.4g}</title></rect>')
            base += counts[name]
        tx = x_of(self.threshold)
        parts.append(f'<line id="threshold-line" x1="{tx:.1f}" y1="{top - 8}" x2="{tx:.1f}" y2="{top + plot_h}" '
                     'stroke="#000" stroke-width="2" stroke-dasharray="6,3"/>')
        parts.append(f'<text x="{tx + 4:.1f}" y="{top - 10}" font-size="12">threshold {self.threshold:.4g}</text>')
        for value in np.linspace(low, high, 5):
            parts.append(f'<text x="{x_of(value):.1f}" y="{top + plot_h + 16}" font-size="11" '
                         f'text-anchor="middle">{value:.3g}</text>')
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="12" '
                     'text-anchor="middle">image score</text>')
        parts.append(f'<text x="{left - 6}" y="{top + 4}" font-size="11" text-anchor="end">{peak}</text>')
        parts.append(f'<text x="{left - 6}" y="{top + plot_h}" font-size="11" text-anchor="end">0</text>')
        legend_x = left + 10
        for name, colour, _ in groups:
            if name in counts and len(counts) > 1:
                parts.append(f'<rect x="{legend_x}" y="4" width="10" height="10" fill="{colour}"/>'
                             f'<text x="{legend_x + 14}" y="13" font-size="11">{name}</text>')
                legend_x += 90
        parts.append("</svg>")
        return "\n".join(parts)

    def _rows_html(self, items: list) -> str:
        out = []
        for rank, (_, _, (file, row, thumb)) in enumerate(items, start=1):
            box = (f"({row['x0']}, {row['y0']}, {row['x1']}, {row['y1']}), {row['area']} px, peak {row['peak']}"
                   if row["area"] != "" else "none")
            label = {0: "good", 1: "defect"}.get(row["label"], "") if row["label"] != "" else ""
            out.append(f'<tr class="{row["verdict"]}"><td>{rank}</td><td><img alt="overlay of '
                       f'{html.escape(Path(file).name)}" src="data:image/png;base64,{thumb}"></td>'
                       f'<td class="file">{html.escape(file)}</td><td>{float(row["score"]):.4f}</td>'
                       f'<td>{row["verdict"]}</td><td>{label}</td><td>{html.escape(box)}</td>'
                       f'<td>{row["regions"]}</td></tr>')
        return "\n".join(out)

    def _html(self, metrics: dict | None, seconds: float) -> str:
        esc = html.escape
        top = sorted(self._top, key=lambda t: (-t[0], t[1]))
        shown = {id(t[2]) for t in top}
        bottom = [t for t in sorted(self._bottom, key=lambda t: (-t[0], -t[1])) if id(t[2]) not in shown]
        bottom = [(-s, q, item) for s, q, item in bottom][::-1]  # highest first, as the table above
        head = ('<tr><th>#</th><th>image | heat-map | predicted region</th><th>file</th><th>score</th>'
                '<th>verdict</th><th>truth</th><th>largest region (x0, y0, x1, y1)</th><th>regions</th></tr>')
        pixel_note = ("" if self.pixel_threshold_fitted else
                      " (this model has no pixel threshold: the image threshold is used for regions)")
        rate = self.n_scored / seconds if seconds > 0 else math.nan
        lines = [
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            "<title>defectscope predictions</title>",
            "<style>body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;"
            "margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:left}"
            "tr.defect td{background:#fdecea}td.file{max-width:28em;word-break:break-all}"
            "img{image-rendering:pixelated;display:block}h2{margin-top:1.2em}</style></head><body>",
            "<h1>defectscope predictions</h1>",
            f'<p id="summary">Model: {esc(self.model_name or "?")} {esc(self.model_source)}<br>'
            f"{self.n_scored} images scored, <b>{self.n_defect} defect</b>, {self.n_scored - self.n_defect} good, "
            f"{self.n_skipped} skipped; threshold <b>{self.threshold:.6g}</b>, pixel threshold "
            f"{self.pixel_threshold:.6g}{esc(pixel_note)}; {seconds:.1f} s ({rate:.1f} images/s).<br>"
            f"Every image is in predictions.csv and regions.json; this page shows the "
            f"{len(top) + len(bottom)} highest and lowest scores.</p>",
            "<h2>Score histogram</h2>", self._histogram_svg(),
        ]
        if metrics is not None:
            lines.append('<h2>Metrics (ground truth known)</h2><table id="metrics">')
            for key, name in (("image_auroc", "image AUROC"), ("image_f1_max", "image F1-max"),
                              ("accuracy", "accuracy at the threshold"),
                              ("false_reject_rate", "false-reject rate (good called defect)"),
                              ("escape_rate", "escape rate (defect called good)"),
                              ("n_good", "good images"), ("n_defect", "defective images"),
                              ("n_unlabelled", "images without ground truth")):
                value = metrics.get(key)
                text = f"{value:.4f}" if isinstance(value, float) else str(value)
                lines.append(f'<tr><th>{name}</th><td class="{key}">{text}</td></tr>')
            lines.append("</table>")
            lines.extend(f"<p>note: {esc(n)}</p>" for n in metrics["notes"])
        lines.append(f'<h2>Highest scores</h2><table id="highest">{head}\n{self._rows_html(top)}</table>')
        if bottom:
            lines.append(f'<h2>Lowest scores</h2><table id="lowest">{head}\n{self._rows_html(bottom)}</table>')
        if self.n_skipped:
            lines.append(f'<h2>Skipped ({self.n_skipped})</h2><table id="skipped"><tr><th>file</th><th>reason</th></tr>')
            lines.extend(f"<tr><td class=\"file\">{esc(f)}</td><td>{esc(r)}</td></tr>" for f, r in self.skipped)
            lines.append("</table>")
            if self.n_skipped > len(self.skipped):
                lines.append(f"<p>and {self.n_skipped - len(self.skipped)} more: see predictions.csv</p>")
        lines.append("</body></html>")
        return "\n".join(lines) + "\n"

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self.closed:
            self.close()


# ---- the loop for exported models -----------------------------------------------------------
def read_picture(path: str | os.PathLike) -> np.ndarray:
    """An image file as stored, as RGB uint8 ``[H, W, 3]`` (EXIF orientation applied), with
    Pillow alone: the picture the outputs are drawn on when no PyTorch is installed."""
    from PIL import ImageOps

    with Image.open(path) as picture:
        picture = ImageOps.exif_transpose(picture)
        if picture.mode in ("I;16", "I;16L", "I;16B", "I", "F"):
            values = np.asarray(picture, dtype=np.float64)
            high = 65535.0 if picture.mode.startswith("I") else 1.0
            grey = np.clip(np.round(values / high * 255.0), 0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.asarray(picture.convert("RGB"))


def predict_files(inferencer, files: Iterable, writer: PredictionWriter, batch_size: int = 8,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Score ``files`` with an exported model's ``inferencer`` (``preprocess(path)`` -> model
    input ``[H, W, 3]`` uint8, ``predict(batch)`` -> scores ``[B]``, maps ``[B, h, w]``) in
    batches, streaming each into ``writer``; unreadable files are skipped with the reason. The
    picture drawn on is the file itself: ``inferencer.read(path)`` when it has one (then
    ``preprocess`` gets that picture: each file is decoded once), else :func:`read_picture`. Returns ``{"seen", "scored"}``; raises ValueError when no file could be
    read. The writer is left open (``writer.close()`` writes the report)."""
    counts = {"seen": 0, "scored": 0}
    reasons: list[str] = []
    own_read = getattr(inferencer, "read", None)

    def load(path) -> tuple[np.ndarray, np.ndarray]:
        if own_read is not None:  # read once; preprocess takes the picture
            picture = np.asarray(own_read(path), dtype=np.uint8)
            return np.asarray(inferencer.preprocess(picture), dtype=np.uint8), picture
        return np.asarray(inferencer.preprocess(path), dtype=np.uint8), read_picture(path)

    def flush(chunk: list) -> None:
        ok = [item for item in chunk if item[1] is not None]
        scores = maps = None
        share = 0.0
        if ok:
            started = time.perf_counter()
            scores, maps = inferencer.predict(np.stack([item[1] for item in ok]))
            scores, maps = np.asarray(scores, dtype=np.float32).reshape(-1), np.asarray(maps, dtype=np.float32)
            if maps.ndim == 4:
                maps = maps[:, 0]
            share = (time.perf_counter() - started) / len(ok)
        k = 0
        for path, x, picture, reason, seconds in chunk:
            counts["seen"] += 1
            if x is None:
                reasons.append(f"{path}: {reason}")
                writer.skip(path, reason)
                continue
            writer.add(path, picture, float(scores[k]), maps[k], seconds + share)
            counts["scored"] += 1
            k += 1
        writer.flush()
        if progress is not None:
            progress(len(chunk))

    chunk: list = []
    for path in files:
        started = time.perf_counter()
        try:
            x, picture = load(path)
            chunk.append((path, x, picture, None, time.perf_counter() - started))
        except Exception as err:  # noqa: BLE001 (an unreadable file is skipped, the run goes on)
            text = str(err) if type(err).__name__ == "DataError" else f"cannot be read ({type(err).__name__}: {err})"
            chunk.append((path, None, None, text, 0.0))
        if len(chunk) == batch_size:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    if counts["seen"] == 0:
        raise ValueError("Nothing to predict: no image files were given (or the folders hold none).")
    if counts["scored"] == 0:
        listed = "\n".join(f"  - {r}" for r in reasons[:20])
        raise ValueError(f"None of the {counts['seen']} files could be read:\n{listed}\n"
                         "Fix: repair or remove these files, then run again.")
    return counts
