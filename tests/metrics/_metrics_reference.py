"""Brute-force reference implementations and test data for the metrics tests.

Written independently of defectscope.metrics: every threshold is applied
explicitly and the curves are integrated segment by segment.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def reference_pro_curve(masks, maps) -> tuple[list[float], list[float]]:
    """(fpr, pro) for a threshold above all scores, then every unique score, descending.

    ``masks`` and ``maps`` are sequences of 2-D images (sizes may differ) or [N, H, W] arrays.
    """
    masks = [np.asarray(mask, dtype=bool) for mask in masks]
    maps = [np.asarray(scores, dtype=np.float64) for scores in maps]
    regions = []  # (image index, region mask [H, W]) for every 8-connected region
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.extend((index, labelled == region_id) for region_id in range(1, count + 1))
    all_scores = np.concatenate([scores.ravel() for scores in maps])
    normal_scores = all_scores[~np.concatenate([mask.ravel() for mask in masks])]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(all_scores)[::-1]:
        fprs.append(np.sum(normal_scores >= threshold) / normal_scores.size)
        overlaps = [np.mean(maps[index][region] >= threshold) for index, region in regions]
        pros.append(float(np.mean(overlaps)))
    return fprs, pros


def reference_partial_area(xs: list[float], ys: list[float], limit: float) -> float:
    """Trapezoids from x=0 to ``limit``, interpolating the segment that crosses it."""
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2.0
    return area


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    fprs, pros = reference_pro_curve(masks, maps)
    return reference_partial_area(fprs, pros, fpr_limit) / fpr_limit


def random_case(seed: int, n: int = 4, size: int = 24, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few rectangles and discs of different sizes (some images empty), noisy maps."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        if i == n - 1:
            continue  # one image without defects
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size, 2)
            if rng.random() < 0.5:
                h, w = rng.integers(1, size // 3, 2)
                masks[i, y : y + h, x : x + w] = True
            else:
                masks[i] |= (yy - y) ** 2 + (xx - x) ** 2 <= rng.integers(1, size // 4) ** 2
    maps = rng.random(masks.shape) + masks * rng.random(masks.shape) * 0.8
    if ties:
        maps = np.round(maps * 8) / 8
    return masks, maps
