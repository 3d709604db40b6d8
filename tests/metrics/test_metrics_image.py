"""image_auroc and f1_max against scikit-learn and brute force."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from defectscope.metrics import MetricUndefinedError, f1_max, image_auroc


def _random_labels_scores(seed: int, n: int, ties: bool):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes present
    scores = rng.normal(size=n) + 0.7 * labels
    if ties:
        scores = np.round(scores)  # a handful of distinct values
    return labels, scores


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed,n", [(0, 5), (1, 40), (2, 500)])
def test_image_auroc_matches_sklearn(seed, n, ties):
    labels, scores = _random_labels_scores(seed, n, ties)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_hand_made():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_image_auroc_accepts_bool_lists_and_tensors():
    labels, scores = _random_labels_scores(3, 30, ties=False)
    expected = roc_auc_score(labels, scores)
    assert image_auroc(labels.astype(bool).tolist(), scores.tolist()) == pytest.approx(expected)
    assert image_auroc(torch.tensor(labels), torch.tensor(scores, dtype=torch.float32)) == pytest.approx(expected, abs=1e-6)
    assert image_auroc(labels.astype(float), scores.astype(np.float16)) == pytest.approx(
        roc_auc_score(labels, scores.astype(np.float16))
    )


@pytest.mark.parametrize("value,present,missing", [(0, "good", "defective"), (1, "defective", "good")])
def test_image_auroc_one_class_names_the_missing_class(value, present, missing):
    with pytest.raises(MetricUndefinedError, match=f"only {present} images.*class {missing}"):
        image_auroc([value] * 4, [0.1, 0.2, 0.3, 0.4])
    assert issubclass(MetricUndefinedError, ValueError)


def _brute_force_f1_max(labels, scores):
    """Best sklearn F1 over every distinct score used as threshold (score >= t)."""
    return max(f1_score(labels, scores >= t, zero_division=0.0) for t in np.unique(scores))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed,n", [(0, 6), (1, 50), (4, 120)])
def test_f1_max_matches_brute_force(seed, n, ties):
    labels, scores = _random_labels_scores(seed, n, ties)
    best, threshold = f1_max(labels, scores)
    assert best == pytest.approx(_brute_force_f1_max(labels, scores), abs=1e-12)
    # The returned threshold achieves it, and no higher threshold does.
    assert f1_score(labels, scores >= threshold) == pytest.approx(best, abs=1e-12)
    higher = np.unique(scores[scores > threshold])
    assert all(f1_score(labels, scores >= t) < best - 1e-12 for t in higher)
    assert threshold in scores


def test_f1_max_hand_made():
    assert f1_max([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 0.8)
    # All tied: everything predicted defective, F1 = 2 * 2 / (2 * 2 + 2).
    best, threshold = f1_max([0, 1, 0, 1], [3.0, 3.0, 3.0, 3.0])
    assert (best, threshold) == (pytest.approx(2 / 3), 3.0)
    # F1 = 2/3 at threshold 4 (TP 1, FP 0) and at threshold 1 (TP 2, FP 2): the higher one is returned.
    best, threshold = f1_max([1, 0, 0, 1], [4, 3, 2, 1])
    assert (best, threshold) == (pytest.approx(2 / 3), 4.0)
    # Only defective images: predicting all as defective is perfect.
    assert f1_max([1, 1, 1], [0.3, 0.1, 0.2]) == (1.0, 0.1)


def test_f1_max_without_defective_images_raises():
    with pytest.raises(MetricUndefinedError, match="at least one defective"):
        f1_max([0, 0, 0], [0.1, 0.2, 0.3])
