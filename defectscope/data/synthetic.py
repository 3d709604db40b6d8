"""A small synthetic MVTec-layout data set with exact defect masks, for tests and demos.

No packaged data set has pixel masks, so pixel metrics (pixel AUROC, AUPRO) are checked on
textures drawn here: every good image is a fresh sample of one procedural texture family
(fabric weave, wood grain or stone), and every defect image is a good sample with scratches,
stains or holes painted in. The mask is exactly the set of pixels the painting changed.
Everything derives from ``numpy.random.default_rng`` seeded per image, and PNG encoding is
deterministic, so the same arguments give byte-identical files.

Opt-in extras (the defaults reproduce the original data bit for bit): the stochastic natural
surfaces ``grass`` (many thin random blades) and ``gravel`` (random stones of varied grey and
colour) through ``textures=``, and the defect kinds ``crack`` (a thin 2-4 px jagged stroke),
``patch`` (a region filled with another texture matched to the surface's colour, so its edges
have low contrast) and ``smudge`` (a soft Gaussian-edged blob changing intensity by a few
percent) through ``defect_kinds=``. Masks: scratch / stain / hole / crack: exactly the changed
pixels; patch: the filled region; smudge: where the change is at least
``SMUDGE_MASK_FRACTION`` of its peak.
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
from scipy.spatial import cKDTree

from .images import DataError, _show

__all__ = [
    "make_synthetic_mvtec",
    "TEXTURES",
    "NATURAL_TEXTURES",
    "ALL_TEXTURES",
    "DEFECT_TYPES",
    "EXTRA_DEFECT_TYPES",
    "ALL_DEFECT_TYPES",
    "SMUDGE_MASK_FRACTION",
]

TEXTURES = ("fabric", "wood", "stone")  # the default choice (by category name)
NATURAL_TEXTURES = ("grass", "gravel")  # stochastic natural surfaces, opt-in via ``textures=``
ALL_TEXTURES = TEXTURES + NATURAL_TEXTURES
DEFECT_TYPES = ("scratch", "stain", "hole")  # the default defect kinds
EXTRA_DEFECT_TYPES = ("crack", "patch", "smudge")  # opt-in via ``defect_kinds=``
ALL_DEFECT_TYPES = DEFECT_TYPES + EXTRA_DEFECT_TYPES
# A smudge's mask is where its (pre-rounding) intensity change is at least this share of its peak.
SMUDGE_MASK_FRACTION = 0.5
# Nominal crack widths in pixels (the stroke is every pixel within width/2 of its centre line).
_CRACK_WIDTH = (2.2, 3.6)
# Smudges change intensity by this fraction of the pixel value at their peak (soft, low contrast).
_SMUDGE_AMPLITUDE = (0.03, 0.07)
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


def _grass(rng: np.random.Generator, size: int) -> np.ndarray:
    """Many thin (1 px) slightly curved random blades over dark soil, green to straw coloured."""
    scale = size / 128
    mean_length = 12.0 * scale + 2.0
    n = int(rng.uniform(1.8, 2.6) * size * size / mean_length)
    y0, x0 = rng.uniform(-0.1, 1.1, (2, n)) * size
    lean = rng.uniform(-0.4, 0.4)
    heading = -np.pi / 2 + lean + rng.normal(0, 0.45, n)
    length = rng.uniform(0.5, 1.5, n) * mean_length
    curve = rng.normal(0, 0.6, n)  # radians of bend over the whole blade
    value = rng.uniform(0.55, 1.0, n)
    dryness = rng.uniform(0, 1, n) ** 2
    t = np.linspace(0.0, 1.0, max(int(2 * length.max()), 4))[None, :]
    angle = heading[:, None] + curve[:, None] * t
    ys = np.rint(y0[:, None] + length[:, None] * t * np.sin(angle)).astype(np.int64)
    xs = np.rint(x0[:, None] + length[:, None] * t * np.cos(angle)).astype(np.int64)
    # Brightest blade wins a pixel; its dryness rides in the low digits (order-independent).
    key = np.rint(value * 1e4).astype(np.int64) * 100 + np.rint(dryness * 99).astype(np.int64)
    key = np.broadcast_to(key[:, None], ys.shape)
    ok = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    canvas = np.zeros((size, size), dtype=np.int64)
    np.maximum.at(canvas, (ys[ok], xs[ok]), key[ok])
    shade = np.where(canvas > 0, (canvas // 100) / 1e4, 0.0)
    dry = np.where(canvas > 0, (canvas % 100) / 99.0, 0.0)
    green = np.array([0.30, 0.58, 0.20]) + rng.uniform(-0.03, 0.03, 3)
    straw = np.array([0.66, 0.60, 0.34])
    soil = np.array([0.20, 0.20, 0.10])
    colour = (1 - dry[..., None]) * green + dry[..., None] * straw
    rgb = np.where((canvas > 0)[..., None], shade[..., None] * colour, soil[None, None, :])
    rgb = ndimage.gaussian_filter(rgb, (0.5, 0.5, 0))  # anti-aliasing, strokes stay thin
    light = 1.0 + 0.08 * _smooth_noise(rng, size, size / 5)
    return np.clip(rgb * light[..., None] * 1.25, 0.04, 0.96)


def _gravel(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random stones (Voronoi cells) of varied grey and colour, domed, with dark gaps between."""
    cell = rng.uniform(7.0, 12.0) * size / 128 + 2.0
    n = int(((size + 2 * cell) / cell) ** 2)
    seeds = rng.uniform(-cell, size + cell, (n, 2))
    y, x = np.mgrid[0:size, 0:size]
    dist, idx = cKDTree(seeds).query(np.stack([y.ravel(), x.ravel()], axis=1).astype(np.float64), k=2)
    d0, d1 = dist[:, 0].reshape(size, size), dist[:, 1].reshape(size, size)
    stone = idx[:, 0].reshape(size, size)
    grey = rng.uniform(0.5, 1.0, n)
    tint = np.array([0.62, 0.58, 0.52])[None, :] + rng.normal(0, 0.035, (n, 3))
    colour = grey[:, None] * tint
    # 0 at a stone's centre, 1 on its border: darker towards the border (a dome in the light).
    rim = np.clip(2 * d0 / (d0 + d1 + 1e-12), 0, 1)
    shade = 1.0 - 0.3 * rim**2 + 0.04 * _smooth_noise(rng, size, 0.7)
    gap = (d1 - d0) < rng.uniform(0.8, 1.6)
    rgb = colour[stone] * shade[..., None]
    rgb[gap] = rgb[gap] * 0.3
    return np.clip(ndimage.gaussian_filter(rgb, (0.4, 0.4, 0)), 0.04, 0.96)


_TEXTURE_MAKERS = {"fabric": _fabric, "wood": _wood, "stone": _stone, "grass": _grass, "gravel": _gravel}


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


def _crack_region(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin jagged stroke: a random walk of half-pixel steps that keeps a main direction, every
    pixel whose centre lies within width/2 of it; widths vary slowly inside ``_CRACK_WIDTH``."""
    n = int(rng.uniform(0.3, 0.6) * size * 2)
    main = rng.uniform(0, 2 * np.pi)
    deviation = np.zeros(n)
    for i in range(1, n):  # mean-reverting turns: jagged, but it goes somewhere
        deviation[i] = 0.9 * deviation[i - 1] + rng.normal(0, 0.22)
    heading = main + deviation
    start = rng.uniform(0.2, 0.8, 2) * size
    points = start[None, :] + np.cumsum(0.5 * np.stack([np.sin(heading), np.cos(heading)], axis=1), axis=0)
    low, high = _CRACK_WIDTH
    width = rng.uniform(low, high) + 0.15 * (high - low) * _smooth_1d(rng, n, 20.0)
    width = np.clip(width, low, high)
    y, x = np.mgrid[0:size, 0:size]
    dist, idx = cKDTree(points).query(np.stack([y.ravel(), x.ravel()], axis=1).astype(np.float64))
    return (dist <= width[idx] / 2).reshape(size, size)


def _smooth_1d(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter1d(rng.standard_normal(n), sigma)
    return (field - field.mean()) / (field.std() + 1e-12)


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
    _lift_weak(painted, clean, painted_region)
    mask = (painted != clean).any(axis=2)
    assert np.array_equal(mask, painted_region)
    return painted, mask


def _lift_weak(painted: np.ndarray, clean: np.ndarray, region: np.ndarray) -> None:
    """Move the green channel of region pixels that changed by less than ``_MIN_CHANGE`` clearly
    away from the clean value, in place."""
    diff = np.abs(painted.astype(np.int16) - clean.astype(np.int16)).max(axis=2)
    weak = region & (diff < _MIN_CHANGE)
    if weak.any():
        green = clean[..., 1][weak].astype(np.int16)
        shifted = np.where(green > 127, green - 2 * _MIN_CHANGE, green + 2 * _MIN_CHANGE)
        painted[..., 1][weak] = shifted.astype(np.uint8)


def _extra_defect_image(
    rng: np.random.Generator, clean: np.ndarray, kind: str, texture: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint 1-2 defects of an ``EXTRA_DEFECT_TYPES`` kind onto ``clean`` -> (image, mask).

    crack: darker (or sometimes brighter) stroke, mask = the changed pixels = the stroke;
    patch: the region replaced by another texture family matched to the surface's mean colour
    and (scaled) contrast, mask = the region; smudge: intensity times (1 + a * g) with g a
    Gaussian-edged blob of peak 1 and |a| in ``_SMUDGE_AMPLITUDE`` (one a per image),
    mask = g >= SMUDGE_MASK_FRACTION.
    """
    size = clean.shape[0]
    image = clean.astype(np.float64) / 255.0
    n_regions = 1 if rng.random() < 0.7 else 2
    mask = np.zeros((size, size), dtype=bool)
    amplitude, field = None, np.zeros((size, size))
    for _ in range(n_regions):
        if kind == "crack":
            for _attempt in range(20):
                region = _crack_region(rng, size)
                if region.sum() >= max(8, size // 2):
                    break
            inside = image[region]
            if rng.random() < 0.75:  # a shadowed gap
                image[region] = inside * rng.uniform(0.55, 0.8)
            else:  # a light-catching edge
                image[region] = inside + rng.uniform(0.15, 0.3) * (0.97 - inside)
            mask |= region
        elif kind == "patch":
            for _attempt in range(20):
                region = _blob_region(rng, size, (0.08, 0.18))
                if region.sum() >= 16:
                    break
            other = [t for t in ALL_TEXTURES if t != texture]
            foreign = _TEXTURE_MAKERS[other[int(rng.integers(len(other)))]](rng, size)
            here = image[region]
            mu, sd = here.mean(axis=0), here.std(axis=0) + 1e-3
            f_mu, f_sd = foreign[region].mean(axis=0), foreign[region].std(axis=0) + 1e-3
            contrast = rng.uniform(0.5, 1.1) * sd.mean() / f_sd.mean()  # one factor: keep its hues
            fill = mu + (foreign[region] - f_mu) * contrast + rng.uniform(-0.02, 0.02, 3)
            image[region] = np.clip(fill, 0.02, 0.98)
            mask |= region
        elif kind == "smudge":
            for _attempt in range(20):
                region = _blob_region(rng, size, (0.06, 0.15))
                sigma = rng.uniform(0.015, 0.03) * size + 0.5
                g = ndimage.gaussian_filter(region.astype(np.float64), sigma)
                g /= g.max() + 1e-12
                g[g < 0.05] = 0.0  # finite support: pixels far away stay exactly clean
                core = g >= SMUDGE_MASK_FRACTION
                if core.sum() >= 8:
                    break
            if amplitude is None:  # one amplitude per image, so "a share of its peak" is one level
                amplitude = rng.uniform(*_SMUDGE_AMPLITUDE) * (1 if rng.random() < 0.5 else -1)
            field = np.maximum(field, g)  # overlapping smudges: the stronger one, not both
            mask |= core
        else:
            raise ValueError(kind)
    if kind == "smudge":
        image *= 1.0 + amplitude * field[..., None]
    painted = _to_uint8(image)
    if kind == "crack":
        _lift_weak(painted, clean, mask)
        assert np.array_equal((painted != clean).any(axis=2), mask)
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
    *,
    textures: tuple[str, ...] | str = TEXTURES,
    defect_kinds: tuple[str, ...] | str = DEFECT_TYPES,
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

    Opt-in (the defaults give the original data bit for bit):

    - ``textures``: the surfaces the category's texture is chosen from (the category name when
      it is one of them, otherwise by the name's hash), from ``ALL_TEXTURES``: ``fabric``,
      ``wood``, ``stone``, and the stochastic natural ``grass`` and ``gravel``. E.g.
      ``textures=("grass",)``.
    - ``defect_kinds``: the defect types, cycled over the defect images (image i gets
      ``defect_kinds[i % len(defect_kinds)]``), from ``ALL_DEFECT_TYPES``: also ``crack`` (a 2-4 px
      stroke; mask = the stroke), ``patch`` (a region of a foreign texture matched to the
      surface's colour; mask = the region) and ``smudge`` (a soft blob changing intensity by
      3-7 %; mask = where the change is at least ``SMUDGE_MASK_FRACTION`` of its peak, lighter
      changes around it are outside the mask). Small training sets: set ``n_train`` (e.g. 40).
    """
    textures = (textures,) if isinstance(textures, str) else tuple(textures)
    defect_kinds = (defect_kinds,) if isinstance(defect_kinds, str) else tuple(defect_kinds)
    bad = [t for t in textures if t not in ALL_TEXTURES]
    if not textures or bad:
        raise DataError(f"textures must be a non-empty choice from {ALL_TEXTURES}, got {textures!r}.")
    bad = [k for k in defect_kinds if k not in ALL_DEFECT_TYPES]
    if not defect_kinds or bad or len(set(defect_kinds)) != len(defect_kinds):
        raise DataError(
            f"defect_kinds must be distinct, non-empty choices from {ALL_DEFECT_TYPES}, got {defect_kinds!r}."
        )
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
    texture = category if category in textures else textures[zlib.crc32(category.encode()) % len(textures)]
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
        kind = defect_kinds[index % len(defect_kinds)]
        stem = f"{index // len(defect_kinds):03d}"
        rng = _image_rng(seed, category, "test_defect", index)
        clean = _to_uint8(make(rng, image_size))
        if kind in DEFECT_TYPES:
            image, mask = _defect_image(rng, clean, kind)
        else:
            image, mask = _extra_defect_image(rng, clean, kind, texture)
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
    if defect_kinds != DEFECT_TYPES:  # only when opted in: the default marker stays byte-identical
        params["defect_kinds"] = list(defect_kinds)
    (base / _MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return base
