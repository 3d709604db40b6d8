"""Evaluation metrics for anomaly / defect detection (numpy + scipy).

Image level (one score and one 0/1 label per image):
    image_auroc(labels, scores) -> float
    f1_max(labels, scores) -> (best_f1, threshold)

Pixel level (masks and maps [N, H, W] or [N, 1, H, W]):
    pixel_auroc(masks, maps) -> float                 exact, sorts all pixels
    aupro(masks, maps, fpr_limit=0.3) -> float        exact, sorts all pixels
    PixelMetrics                                      streaming, ~10 MiB of state

Everything at once:
    compute_metrics(labels, scores, masks=None, maps=None) -> dict

Inputs may be numpy arrays, lists or torch tensors. Invalid inputs raise
ValueError; valid inputs for which a metric has no value (e.g. AUROC with only
good images) raise MetricUndefinedError, a ValueError subclass.
"""

from .errors import MetricUndefinedError
from .image import f1_max, image_auroc
from .pixel import aupro, pixel_auroc
from .streaming import PixelMetrics
from .summary import compute_metrics

__all__ = [
    "MetricUndefinedError",
    "PixelMetrics",
    "aupro",
    "compute_metrics",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
]
