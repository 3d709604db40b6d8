"""A torch Dataset over samples: resized, normalised images and aligned masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .images import DataError, _check_file, _limit, _wide_range, load_image, load_mask
from .samples import Sample

__all__ = ["AnomalyDataset"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# How many bad files validate() spells out before it only counts the rest.
_MAX_LISTED = 20


def _as_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    else:
        size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise DataError(
            f"image_size must be a positive int or a (height, width) pair of positive ints, got "
            f"{image_size!r}. Fix: pass e.g. 256 or (256, 320)."
        )
    return size  # type: ignore[return-value]


def _as_triplet(values: Sequence[float] | None, name: str) -> torch.Tensor | None:
    if values is None:
        return None
    tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
    if tensor.numel() != 3:
        raise DataError(f"{name} needs one value per RGB channel (3), got {values!r}.")
    return tensor.view(3, 1, 1)


class AnomalyDataset(Dataset):
    """Images (and masks) of a list of :class:`Sample` s, ready for a model.

    Each item is a dict:

    - ``image``: float32 ``[3, H, W]``; RGB resized to ``image_size`` (bilinear, antialiased),
      scaled to [0, 1], then normalised with ``mean``/``std`` (pass ``mean=None, std=None`` to skip).
    - ``mask``: float32 ``[1, H, W]`` in {0, 1}, resized with nearest-exact so it stays binary
      and aligned with the image; all zeros for good images and for defects without a mask.
    - ``label``: int64 scalar, 0 good / 1 defect.
    - ``has_mask``: bool scalar, True when ``mask`` is pixel-level truth: a good image (known to be
      defect-free everywhere) or a defect with a mask file. False only for defects with an image
      label alone, so pixel losses and metrics can skip exactly those.
    - ``path``: the image file as a str; ``index``: the item's position in ``samples``.

    ``image_size`` is an int or ``(height, width)``. ``wide_range`` (``"fixed"`` or
    ``"stretch"``; default :data:`defectscope.data.images.WIDE_RANGE`, ``"fixed"``) says how 16-bit
    and wider grey images become 0..255, and ``max_pixels`` (default
    :data:`defectscope.data.images.MAX_PIXELS`, 100 megapixels) is the largest image accepted;
    both are passed to :func:`~defectscope.data.images.load_image`.
    Call :meth:`validate` before a long run to find every unreadable file at once.
    """

    def __init__(
        self,
        samples: list[Sample],
        image_size: int | tuple[int, int] = 256,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        wide_range: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.samples = list(samples)
        if not self.samples:
            raise DataError("AnomalyDataset got no samples. Fix: check the split that produced the list.")
        for sample in self.samples:
            if not isinstance(sample, Sample):
                raise DataError(
                    f"AnomalyDataset needs Sample objects, got {type(sample).__name__}: {sample!r}."
                )
        self.image_size = _as_hw(image_size)
        self.mean = _as_triplet(mean, "mean")
        self.std = _as_triplet(std, "std")
        if (self.mean is None) != (self.std is None):
            raise DataError("Pass both mean and std, or neither (None, None) to skip normalisation.")
        if self.std is not None and bool((self.std <= 0).any()):
            raise DataError(f"std must be positive per channel, got {std!r}.")
        # Checked now (a bad value fails here, not in a data-loader worker); None keeps following
        # the module settings.
        self.wide_range = None if wide_range is None else _wide_range(wide_range)
        self.max_pixels = None if max_pixels is None else _limit(max_pixels)

    def __len__(self) -> int:
        return len(self.samples)

    def _image_tensor(self, image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [H, W, 3]
        tensor = pixels.permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0)
        if tuple(tensor.shape[-2:]) != self.image_size:
            tensor = F.interpolate(
                tensor, size=self.image_size, mode="bilinear", align_corners=False, antialias=True
            )
            tensor = tensor.clamp_(0.0, 1.0)
        tensor = tensor[0]
        if self.mean is not None:
            tensor = (tensor - self.mean) / self.std
        return tensor.contiguous()

    def _mask_tensor(self, mask: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
        if tuple(tensor.shape[-2:]) != self.image_size:
            # nearest-exact samples pixel centres, matching the bilinear resize of the image.
            tensor = F.interpolate(tensor, size=self.image_size, mode="nearest-exact")
        return tensor[0]

    def __getitem__(self, index: int) -> dict:
        index = range(len(self.samples))[index]  # negative indices -> their position; IndexError past the end
        sample = self.samples[index]
        box = getattr(sample, "box", None)  # a tile of a larger image (data/tiling.py TiledSample)
        if box is None:
            image = load_image(sample.path, wide_range=self.wide_range, max_pixels=self.max_pixels)
        else:
            from .tiling import load_cached

            image = load_cached(sample.path, wide_range=self.wide_range, max_pixels=self.max_pixels)
        if sample.label == 1 and sample.mask_path is not None:
            mask = load_mask(sample.mask_path, image.size, max_pixels=self.max_pixels)
            mask = self._mask_tensor(mask if box is None else mask[box[1] : box[3], box[0] : box[2]])
        else:
            mask = torch.zeros((1, *self.image_size), dtype=torch.float32)
        if box is not None:
            image = image.crop(box)
        return {
            "image": self._image_tensor(image),
            "mask": mask,
            "label": torch.tensor(sample.label, dtype=torch.long),
            "has_mask": torch.tensor(sample.label == 0 or sample.mask_path is not None),
            "path": str(sample.path),
            "index": index,
        }

    def _sample_problems(self, sample: Sample) -> list[str]:
        """Every problem with one sample's image and mask files (empty when it can be used)."""
        has_mask = sample.label == 1 and sample.mask_path is not None
        try:
            image = load_image(sample.path, wide_range=self.wide_range, max_pixels=self.max_pixels)
        except DataError as err:
            problems = [str(err)]
            if has_mask:
                try:  # the mask cannot be size-checked without its image, but it must be a file
                    _check_file(Path(sample.mask_path), "Mask")
                except DataError as mask_err:
                    problems.append(str(mask_err))
            return problems
        if has_mask:
            try:
                load_mask(sample.mask_path, image.size, max_pixels=self.max_pixels)
            except DataError as err:
                return [str(err)]
        return []

    def validate(self) -> None:
        """Decode every image and mask (checking mask sizes) and raise one :class:`DataError`
        listing every bad file, so a run cannot crash half-way through an epoch.

        Every path is first checked to be an existing regular file (folders, named pipes,
        devices, broken links and link loops are reported without being opened), then decoded
        with the data set's ``wide_range`` and ``max_pixels``; conversions are said as
        :class:`~defectscope.data.images.DataNotice` s once per file."""
        problems: list[str] = []
        bad_samples = 0
        for sample in self.samples:
            found = self._sample_problems(sample)
            problems.extend(found)
            bad_samples += bool(found)
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED])
            more = len(problems) - _MAX_LISTED
            tail = f"\n  ... and {more} more." if more > 0 else ""
            raise DataError(
                f"{bad_samples} of {len(self.samples)} samples cannot be used:\n{listed}{tail}\n"
                "Fix: repair or remove these files, then run again."
            )
