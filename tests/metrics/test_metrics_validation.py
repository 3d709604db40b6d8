"""Invalid inputs raise ValueError saying what was expected and what was received."""

import numpy as np
import pytest

from defectscope.metrics import PixelMetrics, aupro, f1_max, image_auroc, pixel_auroc

GOOD_MASKS = np.zeros((2, 4, 4), dtype=bool)
GOOD_MASKS[0, 1, 1] = True
GOOD_MAPS = np.random.default_rng(0).random((2, 4, 4))


@pytest.mark.parametrize("metric", [image_auroc, f1_max])
@pytest.mark.parametrize(
    "labels,scores,match",
    [
        ([0, 1, 1], [0.1, 0.2], r"same length; got 3 labels and 2 scores"),
        ([0, 1], [0.1, float("nan")], r"scores must be finite.*1 NaN or infinite value\(s\), the first at index 1"),
        ([0, 1], [0.1, float("inf")], r"scores must be finite"),
        ([0, 2], [0.1, 0.2], r"labels must be binary \(0 = good, 1 = defective\); got values outside \{0, 1\}: 2"),
        ([0, 0.5], [0.1, 0.2], r"labels must be binary.*0\.5"),
        ([], [], r"empty; at least one image is required"),
        ([[0, 1]], [[0.1, 0.2]], r"labels must be a 1-D array.*got shape \(1, 2\)"),
        ([0, 1], ["a", "b"], r"scores must contain real numbers.*got dtype <U1"),
        ([0, 1], [1 + 1j, 2], r"scores must contain real numbers.*complex"),
        (None, [0.1], r"labels is required; got None"),
    ],
)
def test_image_metric_errors(metric, labels, scores, match):
    with pytest.raises(ValueError, match=match):
        metric(labels, scores)


def _update(masks, maps):
    PixelMetrics().update(maps, masks)


@pytest.mark.parametrize("metric", [pixel_auroc, aupro, _update])
@pytest.mark.parametrize(
    "masks,maps,match",
    [
        (GOOD_MASKS, GOOD_MAPS[:, :3], r"same shape \[N, H, W\]; got masks \(2, 4, 4\) and maps \(2, 3, 4\)"),
        (GOOD_MASKS[:1], GOOD_MAPS, r"same shape"),
        (GOOD_MASKS, np.where(GOOD_MASKS, np.nan, GOOD_MAPS), r"maps must be finite.*first at index \(0, 1, 1\)"),
        (GOOD_MASKS * 2, GOOD_MAPS, r"masks must be binary.*got values outside \{0, 1\}: 2"),
        (GOOD_MASKS * 0.5, GOOD_MAPS, r"masks must be binary.*0\.5"),
        (GOOD_MASKS[0], GOOD_MAPS[0], r"masks must have shape \[N, H, W\] or \[N, 1, H, W\]; got shape \(4, 4\)"),
        (GOOD_MASKS[:, None].repeat(3, 1), GOOD_MAPS[:, None].repeat(3, 1), r"got shape \(2, 3, 4, 4\)"),
        (GOOD_MASKS[:0], GOOD_MAPS[:0], r"masks is empty \(shape \(0, 4, 4\)\)"),
    ],
)
def test_pixel_metric_errors(metric, masks, maps, match):
    with pytest.raises(ValueError, match=match):
        metric(masks, maps)


@pytest.mark.parametrize("fpr_limit", [0, -0.1, 1.5, "high", None])
def test_fpr_limit_must_be_in_unit_interval(fpr_limit):
    with pytest.raises(ValueError, match="fpr_limit must be"):
        aupro(GOOD_MASKS, GOOD_MAPS, fpr_limit)
