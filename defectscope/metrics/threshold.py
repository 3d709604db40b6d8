"""The good/defect threshold: chosen on held-out training-side images, never on a test set.

Two rules:

- ``false_reject`` (default): the lowest threshold whose expected false-reject rate on new good
  images is at most ``max_false_reject``. With ``n`` held-out good scores sorted ascending, the
  threshold sits just above the ``k``-th, ``k = ceil((n + 1) * (1 - max_false_reject))``: a new
  good image from the same process scores above it with probability ``(n + 1 - k) / (n + 1)``
  (a rank argument that needs no assumption on the score distribution, as in conformal
  prediction). The rate the threshold actually has is itself random, distributed as
  ``Beta(n + 1 - k, k)``; its 95 % interval is reported. When ``n`` is too small for the rate
  asked (``n + 1 < 1 / max_false_reject``) the threshold goes above the highest held-out score
  and a note says which rate can be promised instead.
- ``f1``: the threshold of the best F1 on held-out labelled defects and good images.

Verdict: an image is a defect when its score is ``>= threshold``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .image import f1_max

__all__ = ["THRESHOLD_RULES", "fit_threshold", "verdict_rates"]

THRESHOLD_RULES = ("false_reject", "f1")


def _check_rate(value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise ValueError(f"max_false_reject must be a rate in (0, 1), e.g. 0.01 for 1 %, got {value!r}")
    return value


def _above(value: float, next_value: float | None) -> float:
    """A threshold just above ``value`` (so ``score >= threshold`` rejects only higher scores):
    half way to the next higher score, or the next float32 above it."""
    if next_value is not None and next_value > value:
        return float((value + next_value) / 2.0)
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def verdict_rates(labels, scores, threshold: float) -> dict[str, float]:
    """False-reject rate (good images at or above ``threshold``) and escape rate (defects
    below it), NaN where a class is absent; with the counts behind them."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    good, bad = scores[labels == 0], scores[labels == 1]
    return {
        "false_reject_rate": float(np.mean(good >= threshold)) if good.size else math.nan,
        "escape_rate": float(np.mean(bad < threshold)) if bad.size else math.nan,
        "false_rejects": int(np.sum(good >= threshold)),
        "escapes": int(np.sum(bad < threshold)),
        "n_good": int(good.size),
        "n_defect": int(bad.size),
    }


def fit_threshold(
    labels,
    scores,
    rule: str = "false_reject",
    max_false_reject: float = 0.01,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Choose the verdict threshold from held-out scores.

    Args:
        labels: ``[N]`` 0 good / 1 defect, of held-out training-side images.
        scores: ``[N]`` their image scores (finite).
        rule: ``"false_reject"`` or ``"f1"`` (see the module docstring).
        max_false_reject: the false-reject rate asked for (``false_reject`` rule).
        confidence: level of the reported interval of the false-reject rate.

    Returns:
        ``{"threshold", "rule", "max_false_reject", "expected_false_reject",
        "false_reject_interval", "n_good", "n_defect", "validation_false_reject",
        "validation_escape", "notes"}``.

    Raises:
        ValueError: unknown rule, no good image, non-finite scores, or ``f1`` without defects.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"Unknown threshold rule {rule!r}. Fix: use one of {', '.join(THRESHOLD_RULES)}.")
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length ({labels.size} vs {scores.size})")
    if not np.isfinite(scores).all():
        raise ValueError("held-out scores contain NaN or inf; the model is broken (check the training settings)")
    good = np.sort(scores[labels == 0])
    n, n_defect = int(good.size), int(np.sum(labels == 1))
    if n == 0:
        raise ValueError("no held-out good image: a threshold needs good images that the model did not train on")
    notes: list[str] = []
    result: dict[str, Any] = {"rule": rule, "n_good": n, "n_defect": n_defect}
    if rule == "f1":
        if n_defect == 0:
            raise ValueError(
                "the F1 rule needs held-out labelled defects and there are none. Fix: add labelled defective "
                "training images, or use the false-reject rule (--threshold-rule false_reject)."
            )
        _, threshold = f1_max(labels, scores)
        result["threshold"] = float(threshold)
        result["max_false_reject"] = None
        if n_defect < 10:
            notes.append(f"F1 threshold from only {n_defect} held-out defect(s): expect it to move with more data")
    else:
        alpha = _check_rate(max_false_reject)
        k = math.ceil((n + 1) * (1.0 - alpha))  # 1-based rank of the good score the threshold sits above
        if k > n:
            k = n
            notes.append(
                f"{n} held-out good images are too few for a {alpha:.2%} false-reject rate (that needs at least "
                f"{math.ceil(1 / alpha) - 1}); the threshold is above the highest of them, which promises "
                f"{1 / (n + 1):.2%} on average. Fix: more good training images, or a larger --val-fraction."
            )
        next_value = float(good[k]) if k < n else None
        result["threshold"] = _above(float(good[k - 1]), next_value)
        result["max_false_reject"] = alpha
    # The rate a rank threshold has on new good images: Beta(n + 1 - k, k) over draws of the
    # held-out set, k = number of held-out good scores below the threshold.
    from scipy.stats import beta

    below = int(np.sum(good < result["threshold"]))
    a, b = n + 1 - below, max(below, 1)
    result["expected_false_reject"] = a / (n + 1)
    tail = (1.0 - confidence) / 2.0
    result["false_reject_interval"] = [float(beta.ppf(tail, a, b)), float(beta.ppf(1.0 - tail, a, b))]
    result["confidence"] = confidence
    rates = verdict_rates(labels, scores, result["threshold"])
    result["validation_false_reject"] = rates["false_reject_rate"]
    result["validation_escape"] = rates["escape_rate"]
    result["notes"] = notes
    return result
