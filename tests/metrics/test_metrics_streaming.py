"""PixelMetrics (streaming histograms) against the exact values and the brute-force reference."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from _metrics_reference import random_case, reference_aupro
from defectscope.metrics import MetricUndefinedError, PixelMetrics, aupro, pixel_auroc

TOLERANCE = 1e-3  # stated tolerance vs the exact values; the computed bound is usually far smaller


def _stream(masks, maps, batch_sizes, **kwargs) -> PixelMetrics:
    metrics = PixelMetrics(**kwargs)
    start = 0
    for size in batch_sizes:
        metrics.update(maps[start : start + size], masks[start : start + size])
        start += size
    assert start == len(masks)
    return metrics


def _assert_close_to_exact(metrics: PixelMetrics, exact_auroc: float, exact_aupro: float, tol: float = TOLERANCE):
    values, bounds = metrics.compute(), metrics.error_bounds()
    assert abs(values["pixel_auroc"] - exact_auroc) <= bounds["pixel_auroc"] + 1e-12
    assert abs(values["aupro"] - exact_aupro) <= bounds["aupro"] + 1e-12
    assert abs(values["pixel_auroc"] - exact_auroc) <= tol
    assert abs(values["aupro"] - exact_aupro) <= tol


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_matches_brute_force_reference(seed, ties):
    masks, maps = random_case(seed, n=6, ties=ties)
    metrics = _stream(masks, maps, [1, 3, 2])
    _assert_close_to_exact(metrics, pixel_auroc(masks, maps), reference_aupro(masks, maps))
    assert max(metrics.error_bounds().values()) < TOLERANCE


def test_batching_and_range_growth_do_not_change_the_result():
    masks, maps = random_case(3, n=6)
    maps[0] = 0.5  # first batch: one constant value, the grid starts tiny
    maps[2] -= 5.0  # later batches extend the range downwards and upwards
    maps[4] *= 40.0
    one_shot = _stream(masks, maps, [6]).compute()
    for sizes in ([1, 1, 1, 1, 1, 1], [2, 4], [1, 2, 3]):
        streamed = _stream(masks, maps, sizes)
        assert streamed.compute() == pytest.approx(one_shot, abs=1e-12)
        _assert_close_to_exact(streamed, pixel_auroc(masks, maps), aupro(masks, maps))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_bins", [4, 64])
def test_error_bound_holds_with_coarse_bins(seed, num_bins):
    masks, maps = random_case(seed, n=5)
    metrics = _stream(masks, maps, [2, 3], num_bins=num_bins, fpr_limit=0.2)
    values, bounds = metrics.compute(), metrics.error_bounds()
    assert abs(values["pixel_auroc"] - pixel_auroc(masks, maps)) <= bounds["pixel_auroc"] + 1e-12
    assert abs(values["aupro"] - aupro(masks, maps, 0.2)) <= bounds["aupro"] + 1e-12


def test_torch_4d_float16_and_varying_image_sizes():
    masks_a, maps_a = random_case(8, n=3, size=16)
    masks_b, maps_b = random_case(9, n=2, size=24)
    maps_a = maps_a.astype(np.float16)
    metrics = PixelMetrics()
    metrics.update(torch.from_numpy(maps_a)[:, None], torch.from_numpy(masks_a)[:, None].float())
    metrics.update(maps_b, masks_b.astype(np.uint8))
    all_masks, all_maps = [*masks_a, *masks_b], [*maps_a, *maps_b]
    exact_auroc = roc_auc_score(
        np.concatenate([m.ravel() for m in all_masks]), np.concatenate([m.ravel() for m in all_maps]).astype(float)
    )
    _assert_close_to_exact(metrics, exact_auroc, reference_aupro(all_masks, all_maps))


def test_perfect_and_constant_maps():
    masks, _ = random_case(4, n=4)
    perfect = _stream(masks, masks.astype(np.float32), [2, 2])
    assert perfect.compute() == {"pixel_auroc": 1.0, "aupro": pytest.approx(1.0, abs=1e-12)}
    assert perfect.error_bounds() == {"pixel_auroc": 0.0, "aupro": 0.0}
    constant = _stream(masks, np.full(masks.shape, 3.0), [1, 3])
    assert constant.compute() == pytest.approx({"pixel_auroc": 0.5, "aupro": 0.15}, abs=1e-12)


def test_rejected_batch_leaves_state_unchanged():
    masks, maps = random_case(1, n=4)
    metrics = _stream(masks, maps, [4])
    before = metrics.compute()
    bad_maps = maps.copy()
    bad_maps[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="maps must be finite"):
        metrics.update(bad_maps, masks)
    with pytest.raises(ValueError, match="masks must be binary"):
        metrics.update(maps, masks * 2.0 - 0.5)
    assert metrics.compute() == before


def test_errors_before_data_and_without_defects():
    metrics = PixelMetrics()
    with pytest.raises(ValueError, match="call update"):
        metrics.compute()
    metrics.update(np.random.default_rng(0).random((2, 8, 8)), np.zeros((2, 8, 8), dtype=bool))
    with pytest.raises(MetricUndefinedError, match="no defective pixels"):
        metrics.compute()
    metrics.reset()
    with pytest.raises(ValueError, match="call update"):
        metrics.compute()


@pytest.mark.parametrize(
    "kwargs,match",
    [({"fpr_limit": 0.0}, "fpr_limit"), ({"num_bins": 1}, "num_bins"), ({"chunk_pixels": 0.5}, "chunk_pixels")],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PixelMetrics(**kwargs)
