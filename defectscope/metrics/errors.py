"""Exceptions raised by :mod:`defectscope.metrics`."""

from __future__ import annotations


class MetricUndefinedError(ValueError):
    """The inputs are valid, but the metric has no value for them.

    Example: AUROC when every test image is good, so there is no defective
    image to rank. The message names the metric and the missing class.
    Subclasses :class:`ValueError`, so ``except ValueError`` also catches it.
    """


def needs(metric: str) -> str:
    """``"needs"`` for one metric name, ``"need"`` for "A and B"."""
    return "need" if " and " in metric else "needs"


def require_both_pixel_classes(n_normal: int, n_defective: int, n_masks: int, metric: str) -> None:
    """Raise :class:`MetricUndefinedError` unless there are normal and defective pixels.

    ``metric`` is the human-readable name used in the message, e.g. "AUPRO".
    """
    if n_defective == 0:
        raise MetricUndefinedError(
            f"{metric} {needs(metric)} both normal and defective pixels; the ground-truth "
            f"masks contain no defective pixels (all {n_masks} masks are empty)"
        )
    if n_normal == 0:
        raise MetricUndefinedError(
            f"{metric} {needs(metric)} both normal and defective pixels; the ground-truth "
            f"masks contain no normal pixels (every pixel is marked defective)"
        )
