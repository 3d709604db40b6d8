"""A small synthetic MVTec-layout data set with exact defect masks, for tests and demos.

No packaged data set has pixel masks, so pixel metrics (pixel AUROC, AUPRO) are checked on
textures drawn here: every good image is a fresh sample of one procedural texture family
(fabric weave, wood grain or stone), and every defect image is a good sample with scratches,
stains or holes painted in. The mask is exactly the set of pixels the painting changed.
Everything derives from ``numpy.random.default_rng`` seeded per image, and PNG encoding is
deterministic, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .images import DataError, _show

__all__ = ["make_synthetic_mvtec", "TEXTURES", "DEFECT_TYPES"]

TEXTURES = ("fabric", "wood", "stone")
DEFECT_TYPES = ("scratch", "stain", "hole")
_MARKER = ".defectscope_synthetic.json"
# Every changed pixel differs from the clean texture by at least this many grey levels in some
# channel, so "mask == changed pixels" holds exactly after 8-bit rounding.
_MIN_CHANGE = 6


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-smoothed white noise, zero mean and unit std, tiling (wrap) borders."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _colourise(shade: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """``shade`` [H,W] around 1.0 times an RGB base colour -> [H,W,3] kept inside [0.04, 0.96]
    (headroom so that stains and scratches can always change a pixel)."""
    return np.clip(shade[..., None] * colour[None, None, :], 0.04, 0.96)


def _fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    angle = rng.uniform(-0.08, 0.08)
    period = size / rng.uniform(14.0, 18.0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    u = x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0, period)
    v = -x * np.sin(angle) + y * np.cos(angle) + rng.uniform(0, period)
    warp, weft = np.sin(2 * np.pi * u / period), np.sin(2 * np.pi * v / period)
    # Over-under weave: warp threads show where the checkerboard phase is positive, weft elsewhere.
    over = np.sin(np.pi * u / period) * np.sin(np.pi * v / period) > 0
    weave = np.where(over, np.abs(warp), np.abs(weft))
    fibres = _smooth_noise(rng, size, (0.6, 2.5))
    shade = 0.78 + 0.22 * weave + 0.04 * fibres + 0.03 * _smooth_noise(rng, size, size / 6)
    colour = np.array([0.38, 0.47, 0.70]) + rng.uniform(-0.03, 0.03, 3)
    return _colourise(shade, colour)


def _wood(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy = -rng.uniform(1.5, 3.0) * size, rng.uniform(-0.5, 1.5) * size
    radius = np.hypot(x - cx, y - cy)
    period = size / rng.uniform(7.0, 10.0)
    warp = 0.6 * period * _smooth_noise(rng, size, size / 10)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (radius + warp) / period)
    grain = _smooth_noise(rng, size, (0.7, 6.0))  # long thin fibres across the image
    shade = 0.72 + 0.28 * rings**2 + 0.05 * grain
    colour = np.array([0.80, 0.56, 0.34]) + rng.uniform(-0.04, 0.04, 3)
    return _colourise(shade, colour)


def _stone(rng: np.random.Generator, size: int) -> np.ndarray:
    octaves = sum(0.55**k * _smooth_noise(rng, size, size / (6 * 2**k)) for k in range(5))
    octaves /= octaves.std() + 1e-12
    specks = (rng.random((size, size)) < 0.01) * rng.uniform(-0.15, 0.15)
    shade = 0.85 + 0.09 * octaves + specks
    colour = np.array([0.66, 0.63, 0.58]) + rng.uniform(-0.03, 0.03, 3)
    return _colourise(shade, colour)


_TEXTURE_MAKERS = {"fabric": _fabric, "wood": _wood, "stone": _stone}


def _scratch_region(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin, slightly curved line: a random walk of half-pixel steps, thickened a little."""
    region = np.zeros((size, size), dtype=bool)
    y, x = rng.uniform(0.15, 0.85, 2) * size
    heading = rng.uniform(0, 2 * np.pi)
    bend = rng.uniform(-0.015, 0.015)
    for _ in range(int(rng.uniform(0.25, 0.55) * size * 2)):
        heading += bend + rng.normal(0, 0.03)
        y, x = y + 0.5 * np.sin(heading), x + 0.5 * np.cos(heading)
        iy, ix = int(round(y)), int(round(x))
        if 0 <= iy < size and 0 <= ix < size:
            region[iy, ix] = True
    if size >= 192 or rng.random() < 0.4:
        region = ndimage.binary_dilation(region, structure=ndimage.generate_binary_structure(2, 1))
    return region


def _blob_region(rng: np.random.Generator, size: int, scale: tuple[float, float]) -> np.ndarray:
    """An irregular ellipse: random axes and angle, its outline wobbled by a few harmonics."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    a, b = rng.uniform(*scale, 2) * size
    angle = rng.uniform(0, np.pi)
    dx, dy = x - cx, y - cy
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / max(a, 1.5)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / max(b, 1.5)
    theta = np.arctan2(v, u)
    outline = 1.0 + sum(
        rng.uniform(0.03, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    return np.hypot(u, v) < outline


def _paint(kind: str, rng: np.random.Generator, image: np.ndarray, region: np.ndarray) -> None:
    """Paint one defect of ``kind`` into ``image`` (float [H,W,3]) inside ``region``, in place."""
    size = image.shape[0]
    inside = image[region]
    if kind == "scratch":
        # Scratches catch the light (brighter) or cut into a darker layer.
        target = np.full(3, 0.97) if rng.random() < 0.5 else np.full(3, 0.10)
        strength = rng.uniform(0.35, 0.6) * (0.8 + 0.4 * rng.random(inside.shape[0]))
    elif kind == "stain":
        # Oil / rust / water-mark tints: a colour shift of moderate contrast with uneven density.
        # Only tints that differ enough from this surface are drawn, so every stain is visible.
        palette = np.array([[0.35, 0.25, 0.10], [0.55, 0.30, 0.12], [0.25, 0.25, 0.30], [0.85, 0.80, 0.55]])
        distance = np.abs(palette - inside.mean(axis=0)).mean(axis=1)
        candidates = np.flatnonzero(distance >= 0.2)
        target = palette[rng.choice(candidates) if candidates.size else int(distance.argmax())]
        density = ndimage.gaussian_filter(rng.random((size, size)), max(size / 40, 1.0))[region]
        density = (density - density.min()) / (np.ptp(density) + 1e-12)
        strength = rng.uniform(0.4, 0.6) * (0.6 + 0.4 * density)
    elif kind == "hole":
        # A hole shows the surface in shadow, darkest in its middle.
        depth = ndimage.distance_transform_edt(region)[region]
        target = inside * rng.uniform(0.1, 0.25)
        image[region] = inside + (0.7 + 0.3 * depth / (depth.max() + 1e-12))[:, None] * (target - inside)
        return
    else:
        raise ValueError(kind)
    image[region] = inside + strength[:, None] * (target[None, :] - inside)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _defect_image(rng: np.random.Generator, clean: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Paint 1-2 defects of ``kind`` onto ``clean`` (uint8) -> (image uint8, mask bool)."""
    size = clean.shape[0]
    image = clean.astype(np.float64) / 255.0
    n_regions = 1 if rng.random() < 0.7 else 2
    painted_region = np.zeros((size, size), dtype=bool)
    for _ in range(n_regions):
        for _attempt in range(20):
            if kind == "scratch":
                region = _scratch_region(rng, size)
            elif kind == "stain":
                region = _blob_region(rng, size, (0.05, 0.13))
            else:
                region = _blob_region(rng, size, (0.025, 0.06))
            if region.sum() >= 8:
                break
        _paint(kind, rng, image, region)
        painted_region |= region
    painted = _to_uint8(image)
    # Pixels where the paint rounded back to (nearly) the clean value: move their green channel
    # clearly away from the clean one, so the mask (every changed pixel) equals the painted
    # region, with no pin-holes.
    diff = np.abs(painted.astype(np.int16) - clean.astype(np.int16)).max(axis=2)
    weak = painted_region & (diff < _MIN_CHANGE)
    if weak.any():
        green = clean[..., 1][weak].astype(np.int16)
        shifted = np.where(green > 127, green - 2 * _MIN_CHANGE, green + 2 * _MIN_CHANGE)
        painted[..., 1][weak] = shifted.astype(np.uint8)
    mask = (painted != clean).any(axis=2)
    assert np.array_equal(mask, painted_region)
    return painted, mask


def _image_rng(seed: int, category: str, part: str, index: int) -> np.random.Generator:
    # One stream per image: changing n_train does not change the test images.
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(part.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False)


def make_synthetic_mvtec(
    root: str | os.PathLike,
    category: str = "synthetic",
    image_size: int = 128,
    n_train: int = 24,
    n_test_good: int = 8,
    n_test_defect: int = 12,
    seed: int = 0,
) -> Path:
    """Write a deterministic MVTec-layout data set and return its category folder ``root/category``.

    Layout: ``train/good/000.png ...``, ``test/good/...``, ``test/<type>/...`` and
    ``ground_truth/<type>/<stem>_mask.png`` (0/255, 8-bit grey) for the defect types
    ``scratch``, ``stain`` and ``hole`` (defect image i gets type ``i % 3``). Images are RGB PNG of
    ``image_size`` x ``image_size``. The texture family is the category name when it is one of
    ``fabric``, ``wood``, ``stone``, otherwise chosen from the name. Every defect image has at
    least one defect region, and its mask is exactly the set of pixels that differ from the
    clean texture. Read it with ``mvtec_split(root, category)``.

    A folder written by an earlier call (it holds a hidden marker file) is replaced; any other
    non-empty folder raises :class:`DataError` rather than be deleted.
    """
    if not isinstance(image_size, int) or image_size < 32:
        raise DataError(f"image_size must be an int >= 32, got {image_size!r}.")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise DataError(
            f"Counts must be n_train >= 1, n_test_good >= 0, n_test_defect >= 0; got {n_train}, "
            f"{n_test_good}, {n_test_defect}."
        )
    if not category or Path(category).name != category or category.startswith("."):
        raise DataError(f"category must be a plain folder name, got {category!r}.")
    base = Path(root) / category
    if base.exists():
        if not base.is_dir():
            raise DataError(f"{_show(base)} is a file. Fix: choose another root or category.")
        if (base / _MARKER).is_file():
            shutil.rmtree(base)
        elif any(base.iterdir()):
            raise DataError(
                f"{_show(base)} exists and was not written by make_synthetic_mvtec, so it is not "
                "overwritten. Fix: choose another root or category, or delete the folder."
            )
    texture = category if category in TEXTURES else TEXTURES[zlib.crc32(category.encode()) % len(TEXTURES)]
    make = _TEXTURE_MAKERS[texture]

    for index in range(n_train):
        _save_png(
            _to_uint8(make(_image_rng(seed, category, "train", index), image_size)),
            base / "train" / "good" / f"{index:03d}.png",
        )
    for index in range(n_test_good):
        _save_png(
            _to_uint8(make(_image_rng(seed, category, "test_good", index), image_size)),
            base / "test" / "good" / f"{index:03d}.png",
        )
    for index in range(n_test_defect):
        kind = DEFECT_TYPES[index % len(DEFECT_TYPES)]
        stem = f"{index // len(DEFECT_TYPES):03d}"
        rng = _image_rng(seed, category, "test_defect", index)
        clean = _to_uint8(make(rng, image_size))
        image, mask = _defect_image(rng, clean, kind)
        _save_png(image, base / "test" / kind / f"{stem}.png")
        _save_png(mask.astype(np.uint8) * 255, base / "ground_truth" / kind / f"{stem}_mask.png")

    params = {
        "generator": "defectscope.data.make_synthetic_mvtec",
        "category": category,
        "texture": texture,
        "image_size": image_size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "seed": seed,
    }
    (base / _MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return base
