"""What the Python API accepts as a picture, and how its values are read.

``model.predict(image)`` (through :meth:`AnomalyModel.preprocess`) turns every input into a
float batch ``[B, 3, H, W]`` in [0, 1] with :func:`to_batch`. The rules are explicit, anything
ambiguous is refused with a :class:`~defectscope.data.images.DataError` that says how to pass it,
and the same picture gives the same score however it is passed:

========================  ==========================================================================
input                     read as
========================  ==========================================================================
path (``str``/``Path``)   :func:`~defectscope.data.images.load_image`: 8-bit RGB, all its notices
PIL image                 the same conversions as a file (EXIF orientation, mode, 16-bit range, ...);
                          of a multi-frame image, the current frame
numpy ``uint8``           0..255
numpy ``uint16``          0..65535, reduced to 8 bits exactly as a 16-bit file is (``round(v / 257)``
                          with :data:`~defectscope.data.images.WIDE_RANGE` ``"fixed"``), so a 16-bit
                          file, the PIL image and its array give the same score
numpy / tensor float      must lie in [0, 1] (any float dtype); NaN and infinity are refused
tensor ``uint8``          0..255
========================  ==========================================================================

Refused, with the fix in the message: ``bool`` arrays (True/False is not a brightness), other
integer dtypes (``int8/16/32/64``, ``uint32/64``; a ``uint16`` tensor: convert it to a numpy
array), complex and object arrays, float values outside [0, 1] (0..255 data: pass ``uint8`` or
divide by 255; mean/std-normalised data: undo it, ``predict`` normalises by itself), and empty
arrays.

Layouts: numpy ``HxW``, ``HxWx1``, ``HxWx3``, ``HxWx4`` (channels last; one image); tensors
``HxW``, ``CxHxW`` or ``BxCxHxW`` (channels first) with C in 1, 3, 4. One channel is grey
(repeated to RGB); a fourth channel is alpha and is dropped, with a notice. A numpy array that
looks channels-first (``3xHxW``) and a tensor that looks channels-last (``HxWx3``) are refused
with the transpose that fixes them; so is a numpy batch. Pictures under
:data:`~defectscope.data.images.SMALL_SIDE` pixels on a side get a notice: they are upscaled.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import DataError, _notice, _small_notice, _wide_range, _wide_to_uint8, load_image, pil_to_rgb

__all__ = ["InputTypeError", "to_batch"]

_CHANNELS = (1, 3, 4)
_RANGE_FIX = (
    "float arrays must be in [0, 1]; for 0..255 data pass uint8 or divide by 255. Fix: "
    "array.astype(np.uint8) or array / 255 for 0..255 data; for mean/std-normalised data, undo "
    "the normalisation (predict normalises by itself)"
)
_INT_FIX = (
    "Fix: convert it to uint8 (0..255) or uint16 (0..65535) after checking its range, e.g. "
    "array.astype(np.uint8), or to float in [0, 1]."
)


class InputTypeError(DataError, TypeError):
    """An input of a type ``predict`` does not take (a :class:`DataError` and a :class:`TypeError`)."""


def _float_check(values: np.ndarray | torch.Tensor, name: str) -> None:
    """Refuse NaN / infinity and values outside [0, 1] in a float array or tensor."""
    if isinstance(values, torch.Tensor):
        values = values.detach()
        finite = torch.isfinite(values)
        n_bad = int((~finite).sum())
        n_nan = int(torch.isnan(values).sum())
        low = float(values[finite].min()) if n_bad < values.numel() else 0.0
        high = float(values[finite].max()) if n_bad < values.numel() else 0.0
    else:
        finite = np.isfinite(values)
        n_bad = int((~finite).sum())
        n_nan = int(np.isnan(values).sum())
        low = float(values[finite].min()) if n_bad < values.size else 0.0
        high = float(values[finite].max()) if n_bad < values.size else 0.0
    if n_bad:
        raise DataError(
            f"{name} has {n_bad} values that are not numbers ({n_nan} NaN, {n_bad - n_nan} infinite). "
            "Fix: replace them (e.g. numpy.nan_to_num / torch.nan_to_num) before predict; "
            "defectscope does not guess what a missing value should look like."
        )
    if low < 0.0 or high > 1.0:
        raise DataError(f"{name} holds float values {low:g}..{high:g}, but {_RANGE_FIX}.")


def _check_size(shape: tuple[int, ...], name: str) -> None:
    if any(int(s) == 0 for s in shape):
        raise DataError(
            f"{name} is empty (shape {tuple(int(s) for s in shape)}): an image needs at least one "
            "pixel. Fix: check the crop or slicing that produced it."
        )


def _drop_alpha(channels: int, name: str) -> None:
    if channels == 4:
        _notice(
            f"{name} has 4 channels; the 4th is read as alpha (transparency) and dropped, not "
            "composited: the colours under transparent pixels are used as they are."
        )


def _from_numpy(array: np.ndarray, name: str, wide_range: str | None) -> torch.Tensor:
    """numpy HxW / HxWxC -> float tensor [1, 3, H, W] in [0, 1]."""
    kind = array.dtype.kind
    if kind == "b":
        raise DataError(
            f"{name} is a bool array: True/False is not a brightness. Fix: for a black-and-white "
            "picture pass array.astype(np.uint8) * 255; for a defect mask, it is not an input to predict."
        )
    if kind not in "uif" or (kind in "ui" and array.dtype not in (np.uint8, np.uint16)):
        what = f"a {array.dtype} array"
        if kind in "ui":
            raise DataError(
                f"{name} is {what}: only uint8 (0..255) and uint16 (0..65535) integer arrays are "
                f"read, since the range of other integer types is ambiguous. {_INT_FIX}"
            )
        raise DataError(
            f"{name} is {what}, not a picture. Fix: pass uint8 (0..255), uint16 (0..65535) or float "
            "values in [0, 1]."
        )
    if array.ndim == 4:
        raise DataError(
            f"{name} has shape {array.shape}: a numpy array is one image (HxW or HxWxC). Fix: call "
            "predict once per image, or pass a batch as a tensor [B, C, H, W] "
            "(torch.from_numpy(array).permute(0, 3, 1, 2) for NHWC)."
        )
    if array.ndim not in (2, 3):
        raise DataError(
            f"{name} has shape {array.shape}: expected an image HxW or HxWxC with C in 1, 3 or 4 "
            "channels. Fix: reshape it to HxW (grey) or HxWx3 (RGB)."
        )
    _check_size(array.shape, name)
    if array.ndim == 3 and array.shape[-1] not in _CHANNELS:
        if array.shape[0] in _CHANNELS:
            raise DataError(
                f"{name} has shape {array.shape}, which looks channels-first (CxHxW), but numpy "
                "images are read channels-last (HxWxC). Fix: pass np.transpose(array, (1, 2, 0)), "
                "or pass it as a torch tensor (tensors are read CxHxW)."
            )
        raise DataError(
            f"{name} has shape {array.shape}: {array.shape[-1]} channels, expected an image HxW or "
            "HxWxC with C in 1, 3 or 4 channels (grey, RGB, RGBA). Fix: pass the grey or RGB channels."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    _drop_alpha(array.shape[-1], name)
    array = array[:, :, :3]
    if kind == "f":
        _float_check(array, name)
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    else:
        if array.dtype == np.uint16:
            array = _wide_to_uint8(array, name, wide_range)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32).div_(255.0)
    return tensor.permute(2, 0, 1)[None]


def _from_tensor(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """tensor HxW / CxHxW / BxCxHxW -> float tensor [B, 3, H, W] in [0, 1]."""
    tensor = tensor.detach()
    dtype = tensor.dtype
    if dtype == torch.bool:
        raise DataError(
            f"{name} is a bool tensor: True/False is not a brightness. Fix: pass "
            "tensor.to(torch.uint8) * 255 for a black-and-white picture."
        )
    if dtype.is_complex:
        raise DataError(f"{name} is a {dtype} tensor, not a picture. Fix: pass uint8 (0..255) or float in [0, 1].")
    if not dtype.is_floating_point and dtype != torch.uint8:
        raise DataError(
            f"{name} is a {dtype} tensor: only uint8 (0..255) and float (0..1) tensors are read, "
            "since the range of other integer types is ambiguous. Fix: convert it to uint8 "
            "(0..255) or to float in [0, 1] after checking its range (16-bit data: pass it as a "
            "numpy uint16 array)."
        )
    shape = tuple(tensor.shape)
    if tensor.dim() not in (2, 3, 4):
        raise DataError(
            f"{name} has shape {shape}: expected an image tensor [C, H, W] or a batch [B, C, H, W] "
            "with 1, 3 or 4 channels (or [H, W] grey). Fix: reshape it to one of these."
        )
    _check_size(shape, name)
    if tensor.dim() == 2:
        tensor = tensor[None]
    channel_axis = tensor.dim() - 3
    if tensor.shape[channel_axis] not in _CHANNELS:
        if tensor.shape[-1] in _CHANNELS:
            fix = "tensor.permute(2, 0, 1)" if tensor.dim() == 3 else "tensor.permute(0, 3, 1, 2)"
            raise DataError(
                f"{name} has shape {shape}, which looks channels-last (HxWxC), but tensors are read "
                f"channels-first ([C, H, W] or [B, C, H, W]). Fix: pass {fix}, or pass it as a numpy "
                "array (numpy images are read HxWxC)."
            )
        raise DataError(
            f"{name} has shape {shape}: {tensor.shape[channel_axis]} channels, expected an image "
            "tensor [C, H, W] or [B, C, H, W] with 1, 3 or 4 channels (grey, RGB, RGBA). Fix: pass "
            "the grey or RGB channels, e.g. tensor[:3] (or tensor[:, :3] for a batch)."
        )
    if tensor.dim() == 3:
        tensor = tensor[None]
    _drop_alpha(tensor.shape[1], name)
    tensor = tensor[:, :3]
    if dtype == torch.uint8:
        return tensor.to(torch.float32).div_(255.0)
    _float_check(tensor, name)
    return tensor.to(torch.float32)


def _rgb_tensor(rgb: Image.Image) -> torch.Tensor:
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].to(torch.float32).div_(255.0)


def to_batch(image, *, wide_range: str | None = None, name: str | None = None) -> torch.Tensor:
    """A path, PIL image, numpy array or tensor -> float32 ``[B, 3, H, W]`` in [0, 1], by the
    rules in this module's docstring. ``wide_range`` is the rule for 16-bit and wider grey
    (default :data:`~defectscope.data.images.WIDE_RANGE`). Grey inputs are repeated to RGB.

    Raises :class:`DataError` (and, for an input of the wrong type, :class:`InputTypeError`,
    which is also a :class:`TypeError`) with the problem and the fix.
    """
    wide_range = _wide_range(wide_range)
    if isinstance(image, (str, os.PathLike)):
        return _rgb_tensor(load_image(Path(image), wide_range=wide_range))  # says its own notices
    if isinstance(image, Image.Image):
        name = name or f"The PIL image (mode {image.mode}, {image.size[0]}x{image.size[1]})"
        _check_size(image.size, name)
        return _rgb_tensor(pil_to_rgb(image, name, wide_range))
    if isinstance(image, np.ndarray):
        name = name or f"The numpy array (shape {image.shape}, {image.dtype})"
        batch = _from_numpy(image, name, wide_range)
    elif isinstance(image, torch.Tensor):
        name = name or f"The tensor (shape {tuple(image.shape)}, {image.dtype})"
        batch = _from_tensor(image, name)
    else:
        hint = ""
        if isinstance(image, (bytes, bytearray, memoryview)):
            hint = " For encoded file bytes, open them first: PIL.Image.open(io.BytesIO(data))."
        elif isinstance(image, (list, tuple)):
            hint = " For several images, call predict on each, or stack them into one tensor [B, C, H, W]."
        raise InputTypeError(
            f"predict takes a path, PIL image, numpy array or tensor, got {type(image).__name__}.{hint}"
        )
    _small_notice(name, int(batch.shape[-1]), int(batch.shape[-2]))
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    return batch
