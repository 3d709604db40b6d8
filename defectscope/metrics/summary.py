"""All evaluation metrics of a test set in one call."""

from __future__ import annotations

import math

import numpy as np

from ._validation import check_binary, check_fpr_limit, check_labels_scores, check_masks_maps
from .errors import MetricUndefinedError, require_both_pixel_classes
from .image import f1_max, image_auroc
from .pixel import aupro, pixel_auroc
from .streaming import PixelMetrics


def compute_metrics(labels, scores, masks=None, maps=None, *, fpr_limit: float = 0.3, exact: bool = False) -> dict:
    """Image- and pixel-level metrics of a test set.

    Args:
        labels: [N] 0/1 per image (1 = defective).
        scores: [N] finite image anomaly scores.
        masks: optional [N, H, W] or [N, 1, H, W] ground-truth masks (bool or 0/1).
        maps: optional anomaly maps of the same shape as ``masks``.
        fpr_limit: AUPRO integration limit, in (0, 1].
        exact: compute the pixel metrics by sorting all pixels (exact, but about 50
            bytes per pixel) instead of with :class:`PixelMetrics` (~25 MiB peak,
            error bounded as documented there; typically < 1e-4).

    Returns:
        ``{"image_auroc", "image_f1_max", "image_threshold", "pixel_auroc",
        "aupro"}`` as floats, plus ``"notes"``: a list of strings. A metric that
        cannot be computed for this test set (one class only, no masks, no
        defective pixels) is ``float("nan")`` and a note says which and why.

    Raises:
        ValueError: invalid input (shapes, NaN, non-binary labels or masks,
            masks/maps given for a different number of images than labels).
    """
    nan = math.nan
    result = {"image_auroc": nan, "image_f1_max": nan, "image_threshold": nan, "pixel_auroc": nan, "aupro": nan}
    notes: list[str] = []
    labels, scores = check_labels_scores(labels, scores)
    fpr_limit = check_fpr_limit(fpr_limit)

    try:
        result["image_auroc"] = image_auroc(labels, scores)
    except MetricUndefinedError as err:
        notes.append(str(err))
    if not (labels == 0).any():
        # F1 would be 1 at the lowest score: a number that says nothing about telling images apart.
        notes.append(
            f"image F1-max needs good test images to tell apart from defects; all {labels.size} test images are "
            "defective, so it is not reported"
        )
    else:
        try:
            result["image_f1_max"], result["image_threshold"] = f1_max(labels, scores)
        except MetricUndefinedError as err:
            notes.append(str(err))

    missing = [name for name, value in (("masks", masks), ("maps", maps)) if value is None]
    if missing:
        notes.append(
            f"pixel AUROC and AUPRO need ground-truth masks and anomaly maps; "
            f"{' and '.join(missing)} {'was' if len(missing) == 1 else 'were'} not given"
        )
    else:
        masks, maps = check_masks_maps(masks, maps, convert_masks=False)
        if masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"masks and maps must have one image per label; got {labels.shape[0]} labels "
                f"and {masks.shape[0]} masks"
            )
        result.update(_pixel_metrics(masks, maps, fpr_limit, exact, notes))
    result["notes"] = notes
    return result


def _pixel_metrics(masks, maps, fpr_limit: float, exact: bool, notes: list[str]) -> dict[str, float]:
    """Pixel AUROC and AUPRO; an undefined metric is left out and explained in ``notes``."""
    try:
        if not exact:
            accumulator = PixelMetrics(fpr_limit=fpr_limit)
            accumulator.update(maps, masks)
            return accumulator.compute()
        masks = check_binary(masks, "masks", "False/0 = normal pixel, True/1 = defective pixel")
        n_defective = int(np.count_nonzero(masks))
        require_both_pixel_classes(masks.size - n_defective, n_defective, masks.shape[0], "pixel AUROC and AUPRO")
        return {"pixel_auroc": pixel_auroc(masks, maps), "aupro": aupro(masks, maps, fpr_limit)}
    except MetricUndefinedError as err:
        notes.append(str(err))
        return {}
