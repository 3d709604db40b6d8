"""Regions of interest: where on an image defects can be.

A ROI is a mask image, non-zero inside (white on black, as drawn in any editor). There are two
kinds:

- one **per data set** (``--roi mask.png``): it is stored in the model (``AnomalyModel.set_roi``),
  saved and loaded with it, so ``test``, ``predict`` and an exported model apply it;
- one **per image** (``--roi-dir DIR``): ``DIR/<image stem>.<any image extension>``; an image
  without one uses the data-set mask (said once). These are applied after the model's forward, on
  the map and the score (:meth:`RoiSet.batch`).

Outside the ROI the map is zero, the image score ignores it, and SuperSimpleNet / SimpleNet put no
synthetic noise there in training.

A mask of another size than its image is resized (nearest neighbour) with a
:class:`~defectscope.data.images.DataNotice`. A mask with more than two grey levels (JPEG
artefacts) is read as "inside where above half its maximum", with a notice. An empty mask, or one
that cannot be read, raises :class:`~defectscope.data.images.DataError` naming the file and the fix.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import (
    IMAGE_EXTENSIONS,
    DataError,
    _binary_mask,
    _notice,
    _open_decoded,
    _orient,
    _show,
)

__all__ = ["read_roi", "resize_roi", "RoiSet", "roi_tensor", "image_size_of", "configure_roi"]


def read_roi(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """A ROI mask file as a bool array ``[H, W]`` (True = inside, i.e. non-zero pixels).

    Raises :class:`DataError` when the file cannot be read or marks nothing as inside."""
    path = Path(path)
    image, _ = _open_decoded(path, "ROI mask", max_pixels)
    name = f"ROI mask {_show(path)}"
    with image:
        inside = _binary_mask(_orient(image, name), name, (
            "ROI mask {path} has {levels} grey levels, expected 2 (0 outside, 255 inside); inside is taken "
            "where it is above half its maximum ({threshold:g}). Fix: save ROI masks as PNG holding only 0 "
            "and 255."), path)
    if not inside.any():
        raise DataError(
            f"{name} is empty: no pixel is inside the region of interest (all are 0), so nothing would be "
            "inspected. Fix: paint the region where defects can be white (non-zero) on black, or leave out "
            "--roi / the per-image mask."
        )
    return inside


def resize_roi(inside: np.ndarray | torch.Tensor, size: tuple[int, int], name: str | None = None,
               expected: tuple[int, int] | None = None) -> torch.Tensor:
    """A bool / 0-1 ROI ``[H, W]`` -> float ``[1, 1, h, w]`` of 0 and 1 at ``size = (h, w)``
    (nearest neighbour, so it stays binary). With ``expected`` (the images' (h, w)) and a mask
    of another size, a notice naming ``name`` says it was resized."""
    tensor = torch.as_tensor(np.asarray(inside) if not isinstance(inside, torch.Tensor) else inside)
    tensor = tensor.to(torch.float32)
    while tensor.dim() < 4:
        tensor = tensor[None]
    if expected is not None and tuple(tensor.shape[-2:]) != tuple(expected):
        mh, mw = tensor.shape[-2:]
        ih, iw = expected
        _notice(
            f"{name or 'The ROI mask'} is {mw}x{mh} (width x height) but the images are {iw}x{ih}; it is "
            "resized to them (nearest neighbour). Fix: save the ROI at the images' size if its border must "
            "be exact."
        )
    if tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.interpolate(tensor, size=tuple(size), mode="nearest-exact")
    tensor = (tensor > 0.5).to(torch.float32)
    if not bool(tensor.any()):
        raise DataError(
            f"{name or 'The ROI mask'} has no inside pixel left at {size[1]}x{size[0]} (it is too thin to survive "
            "the resize). Fix: draw a larger region of interest."
        )
    return tensor


def image_size_of(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) of an image file from its header (None when it cannot be read: the data
    checks report that file on their own)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees when read
                width, height = height, width
            return int(height), int(width)
    except Exception:
        return None


def roi_tensor(path: str | os.PathLike, size: tuple[int, int], image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a ROI file and return it at ``size`` (h, w) as ``[1, 1, h, w]``; ``image_size`` is the
    (h, w) of the images it belongs to (a mask of another size gets a notice)."""
    path = Path(path)
    return resize_roi(read_roi(path), size, name=f"ROI mask {_show(path)}", expected=image_size)


class RoiSet:
    """Per-image ROI masks in ``folder``, found by image file stem (``a.png`` -> ``folder/a.*``),
    falling back to ``default`` (the data-set mask, a bool ``[H, W]`` array or None = everywhere)
    for images without one; the first such image is said once, with how to fix it.

    :meth:`for_image` gives one image's ROI at a size; :meth:`batch` a batch of them."""

    def __init__(self, folder: str | os.PathLike, default: np.ndarray | None = None,
                 default_name: str | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(
                f"ROI folder {_show(self.folder)} does not exist or is not a folder. Fix: pass the folder holding "
                "one mask per image, named like the images (same file stem)."
            )
        self.files: dict[str, Path] = {}
        for entry in sorted(self.folder.iterdir()):
            if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS:
                self.files.setdefault(entry.stem, entry)
        if not self.files:
            raise DataError(
                f"ROI folder {_show(self.folder)} holds no mask images ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
                "Fix: put one mask per image there, named like the images."
            )
        self.default = default
        self.default_name = default_name
        self._missing_said = False
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}

    def path_for(self, image_path: str | os.PathLike) -> Path | None:
        """The mask file of an image (None: it has none here)."""
        return self.files.get(Path(image_path).stem)

    def for_image(self, image_path: str | os.PathLike, size: tuple[int, int]) -> torch.Tensor:
        """``[1, h, w]`` float 0/1 ROI of ``image_path`` at ``size`` (h, w)."""
        mask_path = self.path_for(image_path)
        # Cached per mask file (not per image): a folder of many images sharing few masks stays small.
        key = (str(mask_path) if mask_path is not None else "", tuple(size))
        if mask_path is None:
            with self._lock:
                say = not self._missing_said
                self._missing_said = True
            if say:
                fallback = self.default_name or ("the data-set ROI" if self.default is not None else "the whole image")
                _notice(
                    f"ROI folder {_show(self.folder)} has no mask for image {_show(Path(image_path))} (looked for "
                    f"'{Path(image_path).stem}.<image extension>'); it and any other image without one use {fallback}. "
                    "Fix: add a mask named like the image if its region differs."
                )
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        if mask_path is not None:
            roi = roi_tensor(mask_path, size, image_size=image_size_of(image_path))[0]
        elif self.default is not None:
            roi = resize_roi(self.default, size)[0]
        else:
            roi = torch.ones(1, *size)
        with self._lock:
            self._cache[key] = roi
        return roi

    def batch(self, image_paths: Sequence[str | os.PathLike], size: tuple[int, int]) -> torch.Tensor:
        """``[B, 1, h, w]`` ROIs of a batch of image files."""
        return torch.stack([self.for_image(p, size) for p in image_paths])


def configure_roi(model, roi: str | os.PathLike | None = None, roi_dir: str | os.PathLike | None = None,
                  samples: Sequence = ()) -> RoiSet | None:
    """What ``--roi`` / ``--roi-dir`` do before training: ``roi`` becomes the model's data-set
    ROI (saved with it; a mask of another size than the first of ``samples`` gets a notice), and
    ``roi_dir`` gives the per-image masks (returned; the engine applies them after the forward, as
    ``engine.image_rois``), which act inside the model's ROI; an image without one uses the
    model's ROI alone (or the whole image when there is none)."""
    if roi is not None:
        first = next((getattr(s, "path", s) for s in samples), None)
        model.set_roi(roi, image_size=image_size_of(first) if first is not None else None)
    if roi_dir is None:
        return None
    fallback = (f"the data-set ROI ({model.roi_info.get('source')})" if getattr(model, "has_roi", False)
                else "the whole image")
    return RoiSet(roi_dir, default_name=fallback)
