"""Threshold sweeps and piecewise-linear areas shared by the exact metrics.

Convention everywhere: a pixel/image is predicted defective when
``score >= threshold``. Sweeping the threshold from above the largest score
down to the smallest one traces a curve from (0, 0) to (1, 1); scores that are
tied move together, which makes the curve a straight segment across a tie.
"""

from __future__ import annotations

import numpy as np


def cumulative_at_thresholds(scores: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sum ``weights`` over all items with ``score >= t``, for every distinct score ``t``.

    Args:
        scores: [N] finite numbers.
        weights: arrays [N] (bool, int or float) summed per threshold.

    Returns:
        ``(thresholds, sums)``: ``thresholds`` [T] are the distinct scores in
        descending order; ``sums[i][j]`` is the sum of ``weights[i]`` over items
        with ``score >= thresholds[j]`` ([T] each, non-decreasing).
    """
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    # Last position of every run of equal scores in the descending order.
    group_ends = np.flatnonzero(sorted_scores[:-1] != sorted_scores[1:])
    group_ends = np.append(group_ends, sorted_scores.size - 1)
    sums = [np.cumsum(w[order])[group_ends] for w in weights]
    return sorted_scores[group_ends], sums


def with_origin(*curves: np.ndarray) -> list[np.ndarray]:
    """Prepend 0 to each curve (the point for a threshold above every score), as float64."""
    return [np.concatenate(([0.0], np.asarray(c, dtype=np.float64))) for c in curves]


def area_under(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under the polyline through (x[i], y[i]); x non-decreasing."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline through (x[i], y[i]) from x[0] to ``x_max``.

    ``x`` is non-decreasing. If ``x_max`` falls strictly inside a segment, the
    point at ``x_max`` is linearly interpolated on that segment. (A vertical
    segment exactly at ``x_max`` does not change the area, so ties there are
    harmless.)
    """
    inside = int(np.searchsorted(x, x_max, side="right"))  # x[:inside] <= x_max
    xs, ys = x[:inside], y[:inside]
    if inside < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return area_under(xs, ys)
