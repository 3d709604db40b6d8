"""Exact pixel-level metrics on whole arrays: pixel AUROC and AUPRO.

These sort every pixel, so they need several times the memory of the maps
(about 50 bytes per pixel, measured). For a full test set use
:class:`defectscope.metrics.PixelMetrics`, which streams batches into
histograms with a small, reported error.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._curves import area_up_to, cumulative_at_thresholds, with_origin
from ._validation import check_fpr_limit, check_masks_maps
from .errors import require_both_pixel_classes
from .image import binary_auroc

# 8-connectivity inside each image, no connection between images of the stack.
_IN_PLANE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8_CONNECTED[1] = True


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Weight ``1 / region size`` for every defective pixel.

    Regions are the 8-connected components of each image's mask.

    Args:
        masks: bool [N, H, W].

    Returns:
        ``(weights, n_regions)``: ``weights`` float64 [masks.sum()] in the order
        of ``masks[masks]`` (C order); the weights of one region sum to 1, so
        summing them over the pixels at or above a threshold and dividing by
        ``n_regions`` gives the mean per-region overlap.
    """
    regions, n_regions = ndimage.label(masks, structure=_IN_PLANE_8_CONNECTED)
    region_of_pixel = regions[masks]
    sizes = np.bincount(region_of_pixel, minlength=n_regions + 1)
    return 1.0 / sizes[region_of_pixel], int(n_regions)


def pixel_auroc(masks, maps) -> float:
    """Exact pixel-level AUROC over all pixels of all images.

    Args:
        masks: [N, H, W] or [N, 1, H, W] ground truth, bool or 0/1 (1 = defective).
        maps: same shape, finite anomaly scores.

    Returns:
        AUROC in [0, 1] (ties count one half, as in ``sklearn.metrics.roc_auc_score``).

    Raises:
        MetricUndefinedError: the masks have no defective pixels, or no normal ones.
        ValueError: invalid input.
    """
    masks, maps = check_masks_maps(masks, maps)
    n_defective = int(np.count_nonzero(masks))
    require_both_pixel_classes(masks.size - n_defective, n_defective, masks.shape[0], "pixel AUROC")
    return binary_auroc(masks.ravel(), maps.ravel())


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-region-overlap curve, without input checks.

    Args:
        masks: bool [N, H, W] with at least one normal and one defective pixel.
        maps: [N, H, W] finite scores.

    Returns:
        ``(fpr, pro)`` float64 [T + 1] for the T distinct scores in descending
        order, starting at (0, 0). ``fpr`` is the fraction of normal pixels at
        or above the threshold; ``pro`` the mean over ground-truth regions of
        the fraction of the region's pixels at or above it.
    """
    flat_masks = masks.ravel()
    weights, n_regions = region_weights(masks)
    pro_weight = np.zeros(flat_masks.size)
    pro_weight[flat_masks] = weights / n_regions
    _, (false_pos, pro) = cumulative_at_thresholds(maps.ravel(), ~flat_masks, pro_weight)
    return with_origin(false_pos / false_pos[-1], pro)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Exact normalised area under the per-region-overlap (PRO) curve.

    For every threshold t (a pixel is defective when ``score >= t``):
    FPR(t) is the fraction of normal pixels at or above t, and PRO(t) is the
    mean, over the 8-connected regions of every image's ground-truth mask, of
    the fraction of the region's pixels at or above t. Each region counts the
    same however large it is. The curve PRO(FPR), linear between consecutive
    distinct thresholds and starting at (0, 0), is integrated from FPR 0 to
    ``fpr_limit`` (its point at exactly ``fpr_limit`` is interpolated) and
    divided by ``fpr_limit``, so a perfect detector scores 1.0.

    Args:
        masks: [N, H, W] or [N, 1, H, W] ground truth, bool or 0/1.
        maps: same shape, finite anomaly scores.
        fpr_limit: upper integration limit, in (0, 1].

    Returns:
        AUPRO in [0, 1].

    Raises:
        MetricUndefinedError: the masks have no defective pixels, or no normal ones.
        ValueError: invalid input.
    """
    masks, maps = check_masks_maps(masks, maps)
    fpr_limit = check_fpr_limit(fpr_limit)
    n_defective = int(np.count_nonzero(masks))
    require_both_pixel_classes(masks.size - n_defective, n_defective, masks.shape[0], "AUPRO")
    fpr, pro = pro_curve(masks, maps)
    return area_up_to(fpr, pro, fpr_limit) / fpr_limit
