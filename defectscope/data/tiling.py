"""Large images as tiles: split for training and inference, stitch the maps back.

A camera image is often far larger than a model's input (a 4000x2000 line-scan frame against a
256x256 model); resizing it whole would shrink a small defect to a pixel or less. With
``--tile SIZE [--tile-overlap PX]``:

- **training** uses every tile of every training image as an image of its own
  (:func:`tile_samples`: :class:`TiledSample` s that :class:`~defectscope.data.AnomalyDataset`
  crops from their image);
- **inference** splits each image into the same grid (:func:`tile_boxes`), runs the model on
  batches of tiles, resizes each tile's map to the tile and stitches them into one map at the
  image's full resolution (:func:`stitch`); in the overlaps each tile weighs less towards its
  own border, so there are no seams; the **image score is the stitched map's maximum**
  (:class:`Tiler`).

Tiles are ``SIZE`` pixels high and as wide as the model's input aspect ratio makes them (square
for a square model); each is resized to the model's input (no resize when ``SIZE`` is the
input's height). Neighbouring tiles overlap by at least ``PX`` pixels; the last tile of each row
and column is placed flush with the image border, so every pixel is covered and no tile is
padded. An image no larger than one tile is scored whole, as without tiling.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .images import DataError, load_image
from .samples import Sample

__all__ = ["TiledSample", "Tiler", "tile_boxes", "tile_samples", "stitch", "blend_window", "load_cached"]


@dataclass(frozen=True)
class TiledSample(Sample):
    """One tile of a larger image: ``box`` is ``(left, top, right, bottom)`` in the image's pixels
    (after its EXIF orientation), as ``PIL.Image.crop`` takes it."""

    box: tuple[int, int, int, int] | None = None


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets along one side: stride ``tile - overlap``, the last tile flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    starts = [min(i * stride, length - tile) for i in range(count)]
    return sorted(set(starts))


def tile_boxes(height: int, width: int, tile: int | tuple[int, int], overlap: int = 0) -> list[tuple[int, int, int, int]]:
    """``(left, top, right, bottom)`` of the tiles covering a ``height x width`` image, row by row.

    ``tile``: the tile's side (square) or ``(tile_h, tile_w)``; a side larger than the image's
    becomes the image's. Neighbours overlap by at least ``overlap`` pixels."""
    th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    if th < 1 or tw < 1:
        raise ValueError(f"tile sides must be >= 1, got {tile!r}")
    if overlap < 0 or overlap >= min(th, tw):
        raise ValueError(f"tile overlap must be >= 0 and smaller than the tile ({th}x{tw}), got {overlap}")
    th, tw = min(th, height), min(tw, width)
    return [(left, top, left + tw, top + th)
            for top in _starts(height, th, min(overlap, th - 1))
            for left in _starts(width, tw, min(overlap, tw - 1))]


def blend_window(height: int, width: int, overlap: int) -> torch.Tensor:
    """``[height, width]`` blending weights of one tile: 1 inside, falling linearly towards the
    tile's border over ``overlap`` pixels (to ``1 / (overlap + 1)``, never 0, so a pixel that only
    one tile covers keeps that tile's value exactly)."""
    if overlap <= 0:
        return torch.ones(height, width)

    def ramp(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32)
        edge = torch.minimum(i, n - 1 - i)
        return ((edge + 1) / (overlap + 1)).clamp(max=1.0)

    return ramp(height)[:, None] * ramp(width)[None, :]


def stitch(maps: Iterable[torch.Tensor], boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int],
           overlap: int = 0) -> torch.Tensor:
    """Tile maps -> one ``[1, H, W]`` map of the whole image (``size = (H, W)``).

    ``maps``: one ``[1, h, w]`` (or ``[h, w]``) map per box, in box order, at any resolution
    (resized to its box, bilinear). Overlaps are averaged with :func:`blend_window` weights."""
    height, width = size
    total = torch.zeros(height, width)
    weight = torch.zeros(height, width)
    windows: dict[tuple[int, int], torch.Tensor] = {}
    count = 0
    for tile_map, (left, top, right, bottom) in zip(maps, boxes):
        h, w = bottom - top, right - left
        tile_map = tile_map.float().cpu().reshape(1, 1, *tile_map.shape[-2:])
        if tuple(tile_map.shape[-2:]) != (h, w):
            tile_map = F.interpolate(tile_map, size=(h, w), mode="bilinear", align_corners=False)
        if (h, w) not in windows:
            windows[(h, w)] = blend_window(h, w, overlap)
        window = windows[(h, w)]
        total[top:bottom, left:right] += tile_map[0, 0] * window
        weight[top:bottom, left:right] += window
        count += 1
    if count != len(boxes):
        raise ValueError(f"stitch got {count} maps for {len(boxes)} tiles")
    if not bool((weight > 0).all()):
        raise ValueError("the tiles do not cover the whole image")
    return (total / weight)[None]


_CACHE_LOCK = threading.Lock()
_CACHE: dict = {}


def load_cached(path: str | Path, wide_range: str | None = None, max_pixels: int | None = None):
    """:func:`~defectscope.data.images.load_image`, keeping the last image decoded (per process):
    the tiles of one image are read one after another, and decoding a large image once per tile
    would cost more than the model does."""
    path = Path(path)
    try:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, wide_range, max_pixels)
    except OSError:
        key = None
    with _CACHE_LOCK:
        if key is not None and _CACHE.get("key") == key:
            return _CACHE["image"]
    image = load_image(path, wide_range=wide_range, max_pixels=max_pixels)
    if key is not None:
        with _CACHE_LOCK:
            _CACHE.clear()
            _CACHE.update(key=key, image=image)
    return image


def _image_hw(path: Path, wide_range=None, max_pixels=None) -> tuple[int, int]:
    from .roi import image_size_of

    size = image_size_of(path)
    if size is None:  # unreadable header: decode (raises the usual DataError naming the file)
        image = load_cached(path, wide_range, max_pixels)
        size = (image.size[1], image.size[0])
    return size


def tile_shape(tile: int, model_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a tile ``tile`` pixels high with the model input's aspect ratio."""
    mh, mw = model_size
    return int(tile), max(1, round(tile * mw / mh))


def tile_samples(samples: Iterable[Sample], tile: int, overlap: int = 0,
                 model_size: tuple[int, int] | None = None) -> list[Sample]:
    """Each sample larger than a tile -> its tiles as :class:`TiledSample` s (same label and
    mask file; the dataset crops both); samples no larger than a tile stay as they are."""
    shape = tile_shape(tile, model_size or (tile, tile))
    out: list[Sample] = []
    for sample in samples:
        height, width = _image_hw(Path(sample.path))
        if height <= shape[0] and width <= shape[1]:
            out.append(sample)
            continue
        for box in tile_boxes(height, width, shape, overlap):
            out.append(TiledSample(path=sample.path, label=sample.label, mask_path=sample.mask_path,
                                   defect_type=sample.defect_type, box=box))
    return out


class Tiler:
    """Tiled inference for a model: :meth:`predict` (one image) and :meth:`score` (the engine's
    scoring of a data set: full-resolution stitched maps, scores from them).

    ``tile``: tile height in image pixels (width from the model input's aspect ratio); ``overlap``:
    pixels shared by neighbouring tiles; ``batch_size``: tiles per forward."""

    def __init__(self, tile: int, overlap: int = 0, batch_size: int = 16) -> None:
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 32:
            raise ValueError(f"tile must be an integer of at least 32 pixels, got {tile!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile // 2:
            raise ValueError(f"tile overlap must be an integer from 0 to under half the tile ({tile // 2}), got {overlap!r}")
        self.tile, self.overlap, self.batch_size = tile, overlap, max(1, int(batch_size))

    def info(self) -> dict:
        return {"tile": self.tile, "overlap": self.overlap}

    def training_tiles(self, samples: Iterable[Sample], model_size: tuple[int, int]) -> list[Sample]:
        """:func:`tile_samples` with this tiler's grid."""
        return tile_samples(samples, self.tile, self.overlap, model_size)

    @classmethod
    def from_model(cls, model) -> Tiler | None:
        """The tiling a model was trained with (``model.tiling_info``), or None."""
        info = getattr(model, "tiling_info", None) or {}
        return cls(int(info["tile"]), int(info.get("overlap", 0))) if info.get("tile") else None

    def _tiles(self, model, pixels: torch.Tensor, boxes) -> torch.Tensor:
        """Normalised ``[N,3,h,w]`` model inputs of ``boxes`` cut from ``pixels`` ``[3,H,W]`` in [0, 1]."""
        mean = torch.tensor(model.mean).view(1, 3, 1, 1)
        std = torch.tensor(model.std).view(1, 3, 1, 1)
        crops = []
        for left, top, right, bottom in boxes:
            crop = pixels[None, :, top:bottom, left:right]
            if tuple(crop.shape[-2:]) != tuple(model.image_size):
                crop = F.interpolate(crop, size=tuple(model.image_size), mode="bilinear", antialias=True,
                                     align_corners=False).clamp_(0, 1)
            crops.append(crop)
        return (torch.cat(crops) - mean) / std

    @torch.inference_mode()
    def predict_pixels(self, model, pixels: torch.Tensor) -> tuple[float, torch.Tensor]:
        """``[3,H,W]`` float image in [0, 1] -> (score, ``[1,H,W]`` stitched map)."""
        height, width = pixels.shape[-2:]
        boxes = tile_boxes(height, width, tile_shape(self.tile, tuple(model.image_size)), self.overlap)
        device = model.threshold.device
        maps = []
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start : start + self.batch_size]
            tile_maps, _ = model(self._tiles(model, pixels, chunk).to(device))
            maps.extend(tile_maps.float().cpu())
        full = stitch(maps, boxes, (height, width), self.overlap)
        return float(full.max()), full

    def predict(self, model, image) -> tuple[float, np.ndarray]:
        """``score, anomaly_map = tiler.predict(model, image)`` for a path, PIL image or ``HxWx3``
        uint8 array: the map ``[H, W]`` at the image's own size, the score its maximum."""
        was_training = model.training
        model.eval()
        try:
            score, full = self.predict_pixels(model, _pixels(image))
        finally:
            model.train(was_training)
        return score, full[0].numpy()

    @torch.inference_mode()
    def score(self, model, dataset, pixel=None, progress=None) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """What ``Engine._score`` returns, tiled: scores ``[N]`` (stitched maps' maxima), labels
        ``[N]`` and float16 maps ``[N,h,w]`` at the dataset's ``image_size`` (the full-resolution map
        is reduced by area averaging after its score is taken; pixel metrics use the reduced map
        against the dataset's masks, at the same size). One image at a time, so memory holds one
        full-resolution image and map, whatever the number of images."""
        scores, labels, small_maps = [], [], []
        for index, sample in enumerate(dataset.samples):
            image = load_cached(sample.path, dataset.wide_range, dataset.max_pixels)
            box = getattr(sample, "box", None)
            if box is not None:
                image = image.crop(box)
            score, full = self.predict_pixels(model, _pixels(image))
            small = F.interpolate(full[None], size=tuple(dataset.image_size), mode="area")[0, 0]
            scores.append(score)
            labels.append(sample.label)
            small_maps.append(small.half())
            if pixel is not None and (sample.label == 0 or sample.mask_path is not None):
                pixel.update(small[None], dataset[index]["mask"].bool())
            if progress is not None:
                progress(1)
        return (np.asarray(scores, dtype=np.float32), np.asarray(labels, dtype=np.int64),
                torch.stack(small_maps) if small_maps else torch.zeros(0, *dataset.image_size, dtype=torch.float16))


def _pixels(image) -> torch.Tensor:
    """A path, PIL image or ``HxWx3`` uint8 array -> ``[3,H,W]`` float32 in [0, 1]."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"tiled prediction takes a path, a PIL image or an HxWx3 uint8 array, got {array.dtype} "
                        f"{array.shape}. Fix: pass the image file.")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def make_large_image(height: int = 2000, width: int = 4000, defect: tuple[int, int, int] | None = None,
                     seed: int = 0) -> np.ndarray:
    """A generated ``HxWx3`` uint8 camera frame for tests and benchmarks: a grey part with soft
    shading and sensor noise, and optionally one small dark round defect ``(centre_y, centre_x,
    radius)``."""
    rng = np.random.default_rng(seed)
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    shade = 0.5 + 0.06 * np.sin(2 * np.pi * (xs * 1.3 + rng.random())) * np.cos(2 * np.pi * (ys * 0.7 + rng.random()))
    image = shade[..., None] + rng.normal(0, 0.03, (height, width, 3)).astype(np.float32)
    if defect is not None:
        cy, cx, radius = defect
        top, bottom, left, right = max(cy - radius, 0), min(cy + radius + 1, height), max(cx - radius, 0), min(cx + radius + 1, width)
        yy, xx = np.ogrid[top:bottom, left:right]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[top:bottom, left:right][inside] = 0.12 + rng.normal(0, 0.03, (int(inside.sum()), 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
