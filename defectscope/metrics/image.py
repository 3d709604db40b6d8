"""Image-level metrics: one anomaly score and one 0/1 label per image."""

from __future__ import annotations

import numpy as np

from ._curves import area_under, cumulative_at_thresholds, with_origin
from ._validation import check_labels_scores
from .errors import MetricUndefinedError


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Exact area under the ROC curve (ties count one half), no input checks.

    Args:
        positive: bool [N], with at least one True and one False.
        scores: [N] finite; higher means "more likely positive".
    """
    _, (tp, fp) = cumulative_at_thresholds(scores, positive, ~positive)
    fpr, tpr = with_origin(fp / fp[-1], tp / tp[-1])
    return area_under(fpr, tpr)


def _require_both_classes(labels: np.ndarray, metric: str) -> None:
    n_defective = int(labels.sum())
    if n_defective == 0 or n_defective == labels.size:
        present, value, missing = ("good", 0, "defective (1)") if n_defective == 0 else ("defective", 1, "good (0)")
        raise MetricUndefinedError(
            f"{metric} needs both good and defective test images; the test set has only "
            f"{present} images (all {labels.size} labels are {value}; class {missing} is missing)"
        )


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of per-image anomaly scores.

    Args:
        labels: [N] 0/1 (or bool), 1 = defective.
        scores: [N] finite anomaly scores, higher = more anomalous.

    Returns:
        AUROC in [0, 1]; tied scores count one half, as in
        ``sklearn.metrics.roc_auc_score``.

    Raises:
        MetricUndefinedError: only one class is present (the message says which is missing).
        ValueError: invalid input (shape, NaN, non-binary labels, empty).
    """
    labels, scores = check_labels_scores(labels, scores)
    _require_both_classes(labels, "image AUROC")
    return binary_auroc(labels, scores)


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 score over all thresholds, and the threshold that achieves it.

    An image is predicted defective when ``score >= threshold``. Every distinct
    score is tried as a threshold (thresholds between two scores give the same
    predictions as the higher one). When several thresholds reach the best F1,
    the highest is returned.

    Args:
        labels: [N] 0/1 (or bool), 1 = defective.
        scores: [N] finite anomaly scores.

    Returns:
        ``(best_f1, threshold)`` with ``threshold`` one of the given scores.

    Raises:
        MetricUndefinedError: there is no defective image (F1 is undefined).
        ValueError: invalid input.
    """
    labels, scores = check_labels_scores(labels, scores)
    n_defective = int(labels.sum())
    if n_defective == 0:
        raise MetricUndefinedError(
            f"image F1 needs at least one defective test image; the test set has only good "
            f"images (all {labels.size} labels are 0)"
        )
    thresholds, (tp, fp) = cumulative_at_thresholds(scores, labels, ~labels)
    # F1 = 2 TP / (2 TP + FP + FN) and FN = n_defective - TP.
    f1 = 2.0 * tp / (tp + fp + n_defective)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return float(f1[best]), float(thresholds[best])
