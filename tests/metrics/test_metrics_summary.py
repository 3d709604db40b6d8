"""compute_metrics: values, NaN + notes for metrics that cannot be computed."""

import math

import numpy as np
import pytest

from _metrics_reference import random_case
from defectscope.metrics import aupro, compute_metrics, f1_max, image_auroc, pixel_auroc

KEYS = {"image_auroc", "image_f1_max", "image_threshold", "pixel_auroc", "aupro", "notes"}


def _test_set(seed=0):
    masks, maps = random_case(seed, n=6)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    return labels, scores, masks, maps


@pytest.mark.parametrize("exact", [False, True])
def test_all_metrics(exact):
    labels, scores, masks, maps = _test_set()
    result = compute_metrics(labels, scores, masks, maps, exact=exact)
    assert set(result) == KEYS
    assert result["notes"] == []
    assert result["image_auroc"] == image_auroc(labels, scores)
    assert (result["image_f1_max"], result["image_threshold"]) == f1_max(labels, scores)
    tol = 1e-12 if exact else 1e-3
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=tol)
    assert result["aupro"] == pytest.approx(aupro(masks, maps), abs=tol)
    assert compute_metrics(labels, scores, masks, maps, fpr_limit=0.1, exact=exact)["aupro"] == pytest.approx(
        aupro(masks, maps, 0.1), abs=tol
    )


def test_only_good_images():
    labels, scores, masks, maps = _test_set()
    result = compute_metrics(np.zeros_like(labels), scores, np.zeros_like(masks), maps)
    assert set(result) == KEYS
    for key in ("image_auroc", "image_f1_max", "image_threshold", "pixel_auroc", "aupro"):
        assert math.isnan(result[key]), key
    notes = " | ".join(result["notes"])
    assert "image AUROC needs both good and defective test images; the test set has only good images" in notes
    assert "image F1 needs at least one defective test image" in notes
    assert "pixel AUROC and AUPRO need both normal and defective pixels" in notes
    assert "no defective pixels" in notes
    assert len(result["notes"]) == 3


def test_only_defective_images_and_no_masks():
    labels, scores, masks, maps = _test_set()
    result = compute_metrics(np.ones_like(labels), scores)
    assert math.isnan(result["image_auroc"]) and math.isnan(result["pixel_auroc"]) and math.isnan(result["aupro"])
    # F1 would be 1.0 (every image called defective is right), which says nothing: not reported.
    assert math.isnan(result["image_f1_max"]) and math.isnan(result["image_threshold"])
    assert any("all 7 test images are defective, so it is not reported" in note for note in result["notes"]) \
        or any("F1-max needs good test images" in note for note in result["notes"])
    assert any("only defective images" in note and "good (0) is missing" in note for note in result["notes"])
    assert any("masks and maps were not given" in note for note in result["notes"])
    partial = compute_metrics(labels, scores, masks=masks)
    assert any("maps was not given" in note for note in partial["notes"])
    assert math.isnan(partial["aupro"]) and not math.isnan(partial["image_auroc"])


@pytest.mark.parametrize("exact", [False, True])
def test_masks_all_defective(exact):
    labels, scores, masks, maps = _test_set()
    result = compute_metrics(labels, scores, np.ones_like(masks), maps, exact=exact)
    assert math.isnan(result["pixel_auroc"]) and math.isnan(result["aupro"])
    assert result["notes"] == [
        "pixel AUROC and AUPRO need both normal and defective pixels; the ground-truth masks "
        "contain no normal pixels (every pixel is marked defective)"
    ]


def test_invalid_inputs_still_raise():
    labels, scores, masks, maps = _test_set()
    with pytest.raises(ValueError, match="one image per label; got 6 labels and 5 masks"):
        compute_metrics(labels, scores, masks[:5], maps[:5])
    with pytest.raises(ValueError, match="scores must be finite"):
        compute_metrics(labels, np.where(labels == 1, np.nan, scores))
    with pytest.raises(ValueError, match="masks and maps must have the same shape"):
        compute_metrics(labels, scores, masks, maps[:, :-1])
