"""Exact pixel_auroc and aupro against scikit-learn and the brute-force reference."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from _metrics_reference import random_case, reference_aupro
from defectscope.metrics import MetricUndefinedError, aupro, pixel_auroc


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_matches_sklearn(seed, ties):
    masks, maps = random_case(seed, ties=ties)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # [N, 1, H, W], 0/1 integer masks and torch tensors give the same value.
    assert pixel_auroc(masks[:, None].astype(np.uint8), maps[:, None]) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force(seed, ties, fpr_limit):
    masks, maps = random_case(seed, ties=ties)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(reference_aupro(masks, maps, fpr_limit), abs=1e-10)


def test_perfect_detector_scores_one():
    masks, _ = random_case(5)
    maps = masks.astype(np.float32)
    assert pixel_auroc(masks, maps) == 1.0
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)


def test_inverted_detector_scores_zero():
    masks, _ = random_case(5)
    maps = (~masks).astype(np.float32)
    assert pixel_auroc(masks, maps) == 0.0
    assert aupro(masks, maps) == 0.0


def test_constant_maps_are_all_ties():
    masks, _ = random_case(6)
    maps = np.full(masks.shape, 0.25)
    assert pixel_auroc(masks, maps) == 0.5
    # The curve is one straight segment from (0, 0) to (1, 1): area to 0.3 is 0.3**2 / 2.
    assert aupro(masks, maps) == pytest.approx(0.5 * 0.3, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_is_a_mean_over_regions_not_over_pixels():
    # One large region found perfectly, one small region scored below every normal pixel.
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, 2:12, 2:12] = True  # 100 pixels
    masks[0, 16:18, 16:18] = True  # 4 pixels
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.1, 0.9, masks.shape)
    maps[0, 2:12, 2:12] = 1.0
    maps[0, 16:18, 16:18] = 0.0
    # Up to FPR 0.3 half of the regions are found: PRO = 0.5 (pixel-pooled would be 100/104).
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)
    assert reference_aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)
    # Same when the two regions are in different images.
    split_masks = np.stack([masks[0] & (np.arange(20) < 14)[:, None], masks[0] & (np.arange(20) >= 14)[:, None]])
    split_maps = np.stack([maps[0], maps[0]])
    assert aupro(split_masks, split_maps) == pytest.approx(reference_aupro(split_masks, split_maps), abs=1e-12)


def test_regions_are_8_connected_and_per_image():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region of 2 pixels
    masks[0, 8, 8:10] = True  # second region of 2 pixels
    maps = np.full(masks.shape, 0.5) + np.linspace(0, 0.1, 200).reshape(2, 10, 10)
    maps[0, 0, 0] = 2.0  # only half of the diagonal region is found
    maps[0, 1, 1] = maps[0, 8, 8:10] = -1.0
    # With 8-connectivity the top PRO is mean(1/2, 0) = 0.25 (4-connectivity: mean(1, 0, 0) = 1/3).
    assert aupro(masks, maps) == pytest.approx(0.25, abs=1e-12)
    # The same place in two images is two regions: 4 pixels found + 12 missed -> mean(1, 0).
    stacked = np.zeros((2, 6, 6), dtype=bool)
    stacked[0, 1:3, 1:3] = True
    stacked[1, 0:4, 0:3] = True
    maps = np.where(stacked, 0.0, 0.5)
    maps[0, 1:3, 1:3] = 1.0
    assert aupro(stacked, maps) == pytest.approx(0.5, abs=1e-12)


def test_images_without_defects_count_as_normal_pixels():
    masks, maps = random_case(7, n=3)
    assert not masks[-1].any()
    extra_masks = np.concatenate([masks, np.zeros_like(masks[:1])])
    extra_maps = np.concatenate([maps, maps[:1] + 0.3])
    assert aupro(extra_masks, extra_maps) == pytest.approx(reference_aupro(extra_masks, extra_maps), abs=1e-10)
    assert aupro(extra_masks, extra_maps) != pytest.approx(aupro(masks, maps), abs=1e-6)


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_undefined_without_defective_or_normal_pixels(metric):
    maps = np.random.default_rng(0).random((2, 5, 5))
    with pytest.raises(MetricUndefinedError, match="no defective pixels"):
        metric(np.zeros((2, 5, 5), dtype=bool), maps)
    with pytest.raises(MetricUndefinedError, match="no normal pixels"):
        metric(np.ones((2, 5, 5), dtype=bool), maps)
