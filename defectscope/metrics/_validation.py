"""Input checks shared by the metric functions.

Every check raises :class:`ValueError` with a message that says what was
expected and what was received. Torch tensors are accepted anywhere an array
is (duck-typed, so torch is not imported here).
"""

from __future__ import annotations

import numpy as np


def as_array(x, name: str) -> np.ndarray:
    """Return ``x`` as a real-valued (or bool) numpy array without copying when possible.

    Accepts numpy arrays, array-likes and torch tensors (moved to CPU; bfloat16
    is widened to float32 because numpy has no bfloat16).
    """
    if x is None:
        raise ValueError(f"{name} is required; got None")
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    try:
        arr = np.asarray(x)
    except ValueError as err:  # ragged nested lists
        raise ValueError(f"{name} must be a rectangular array of numbers; {err}") from None
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        return arr
    raise ValueError(f"{name} must contain real numbers (bool, int or float); got dtype {arr.dtype}")


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise if ``arr`` holds NaN or +-inf.

    Uses min/max (NaN and inf propagate to them), so no array-sized temporary
    is allocated on the happy path.
    """
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return
    if np.isfinite(arr.min()) and np.isfinite(arr.max()):
        return
    bad = ~np.isfinite(arr)
    first = np.unravel_index(int(np.argmax(bad)), arr.shape)
    where = first[0] if arr.ndim == 1 else tuple(int(i) for i in first)
    raise ValueError(
        f"{name} must be finite numbers; got {int(bad.sum())} NaN or infinite value(s), "
        f"the first at index {where}"
    )


def check_binary(arr: np.ndarray, name: str, meaning: str) -> np.ndarray:
    """Return ``arr`` as bool, raising unless every value is 0/1 (or False/True).

    ``meaning`` explains the two values in the error message, e.g.
    "0 = good, 1 = defective".
    """
    if arr.dtype == bool:
        return arr
    is_binary = (arr == 0) | (arr == 1)
    if not is_binary.all():
        bad = np.unique(arr[~is_binary])
        shown = ", ".join(repr(v.item()) for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise ValueError(
            f"{name} must be binary ({meaning}); got values outside {{0, 1}}: {shown}"
        )
    return arr != 0


def check_labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-image labels and scores.

    Returns ``labels`` as bool [N] (True = defective) and ``scores`` as a
    numeric array [N]. Raises on wrong dimensionality, empty input, length
    mismatch, non-binary labels and non-finite scores.
    """
    labels = as_array(labels, "labels")
    scores = as_array(scores, "scores")
    for arr, name in ((labels, "labels"), (scores, "scores")):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array with one value per image; got shape {arr.shape}")
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"labels and scores must have the same length; got {labels.shape[0]} labels "
            f"and {scores.shape[0]} scores"
        )
    if labels.shape[0] == 0:
        raise ValueError("labels and scores are empty; at least one image is required")
    check_finite(labels, "labels")
    check_finite(scores, "scores")
    return check_binary(labels, "labels", "0 = good, 1 = defective"), scores


def as_image_stack(x, name: str) -> np.ndarray:
    """Return ``x`` as an array of shape [N, H, W]; [N, 1, H, W] is squeezed (a view)."""
    arr = as_array(x, name)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape [N, H, W] or [N, 1, H, W]; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); at least one non-empty image is required")
    return arr


def check_masks_maps(masks, maps, *, convert_masks: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validate ground-truth masks and anomaly maps of the same [N, H, W] shape.

    Returns ``(masks, maps)`` with shape [N, H, W]; masks are converted to bool
    unless ``convert_masks`` is False (then only their shape is checked, and
    the caller must check binariness, e.g. chunk by chunk). Maps keep their
    dtype and must be finite.
    """
    masks = as_image_stack(masks, "masks")
    maps = as_image_stack(maps, "maps")
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks and maps must have the same shape [N, H, W]; got masks {masks.shape} "
            f"and maps {maps.shape}"
        )
    check_finite(maps, "maps")
    if convert_masks:
        masks = check_binary(masks, "masks", "False/0 = normal pixel, True/1 = defective pixel")
    return masks, maps


def check_fpr_limit(fpr_limit) -> float:
    """Return ``fpr_limit`` as float, raising unless 0 < fpr_limit <= 1."""
    try:
        value = float(fpr_limit)
    except (TypeError, ValueError):
        raise ValueError(f"fpr_limit must be a number in (0, 1]; got {fpr_limit!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit!r}")
    return value
