"""Data for defectscope: reading images and masks, data set layouts, and splits.

- :func:`load_image` / :func:`load_mask` read any PNG/JPEG/BMP/TIFF as 8-bit RGB / bool masks;
- :func:`mvtec_split`, :func:`folder_split`, :func:`elpv_split` turn a data set into a
  :class:`DataSplit` of :class:`Sample` s;
- :class:`AnomalyDataset` turns samples into tensors for a model;
- :func:`make_synthetic_mvtec` writes a small data set with exact masks for tests.

Every problem with a file raises :class:`DataError` naming the file, the problem and the fix.
"""

from .dataset import AnomalyDataset
from .elpv import elpv_split
from .images import IMAGE_EXTENSIONS, DataError, DataNotice, list_images, load_image, load_mask
from .layouts import folder_split, mvtec_split
from .samples import (
    REGIME_CHOICES,
    REGIMES,
    DataSplit,
    Sample,
    check_test_classes,
    describe_regime,
    hold_out_validation,
    resolve_regime,
    summarise,
    training_regime,
)
from .synthetic import make_synthetic_mvtec

__all__ = [
    "DataError",
    "DataNotice",
    "Sample",
    "DataSplit",
    "IMAGE_EXTENSIONS",
    "list_images",
    "load_image",
    "load_mask",
    "AnomalyDataset",
    "mvtec_split",
    "folder_split",
    "elpv_split",
    "make_synthetic_mvtec",
    "summarise",
    "check_test_classes",
    "REGIMES",
    "REGIME_CHOICES",
    "training_regime",
    "resolve_regime",
    "describe_regime",
    "hold_out_validation",
]
