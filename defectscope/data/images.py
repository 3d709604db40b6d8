"""Reading image files and defect masks, with errors that name the file.

Everything that opens a file in defectscope goes through :func:`load_image` or :func:`load_mask`,
so a broken file is reported the same way everywhere: which file, what is wrong with it, and what
to do about it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DataError", "IMAGE_EXTENSIONS", "list_images", "load_image", "load_mask"]

#: File extensions read as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Modes that hold one integer or float channel wider than 8 bits.
_WIDE_GREY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class DataError(ValueError):
    """A data set, image or mask that cannot be used as it is.

    The message always names the file or folder, the problem and the fix.
    """


def _show(path: Path) -> str:
    """A path as the user gave it, plus where it points when it was relative."""
    text = str(path)
    if not path.is_absolute():
        text += f" (resolved: {Path.cwd() / path})"
    return text


def _is_image_file(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files directly inside ``folder`` (hidden files and sub-folders ignored).

    Raises :class:`DataError` when the folder is missing, is not a folder, or holds no file with
    one of :data:`IMAGE_EXTENSIONS`.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(
            f"Image folder not found: {_show(folder)}. Fix: check the path and that the data set "
            "is unpacked there."
        )
    if not folder.is_dir():
        raise DataError(
            f"Expected a folder of images but {_show(folder)} is a file. Fix: pass the folder that "
            "holds the images."
        )
    images = sorted(p for p in folder.iterdir() if p.is_file() and _is_image_file(p))
    if not images:
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        found = (
            f"it holds {len(others)} other entries, e.g. {', '.join(others[:3])}" if others else "it is empty"
        )
        raise DataError(
            f"No images in {_show(folder)}: {found}. Accepted extensions (any case): "
            f"{' '.join(IMAGE_EXTENSIONS)}. Fix: put the images there or point at the right folder."
        )
    return images


def _open_decoded(path: Path, what: str) -> Image.Image:
    """Open ``path`` and decode every pixel, so a truncated file fails here and not mid-training."""
    if not path.exists():
        raise DataError(f"{what} not found: {_show(path)}. Fix: check the path or remove it from the list.")
    if path.is_dir():
        raise DataError(
            f"Expected a file but {_show(path)} is a folder. Fix: pass the {what.lower()} file itself."
        )
    try:
        image = Image.open(path)
    except UnidentifiedImageError as err:
        raise DataError(
            f"{what} {_show(path)} is not an image file Pillow can read (the extension says image, "
            "the contents do not). Fix: re-export it as PNG/JPEG/BMP/TIFF or delete it."
        ) from err
    except OSError as err:
        raise DataError(
            f"Cannot read {what.lower()} {_show(path)}: {err}. Fix: check its permissions."
        ) from err
    try:
        image.load()
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... by format
        image.close()
        raise DataError(
            f"{what} {_show(path)} is corrupt or truncated ({type(err).__name__}: {err}). "
            "Fix: copy the file again from its source or delete it."
        ) from err
    return image


def _wide_grey_to_8bit(image: Image.Image) -> np.ndarray:
    """Rescale a 16-bit / 32-bit / float grey image to uint8 using its own min..max range.

    Industrial cameras often use a few hundred of the 65,536 levels, so a fixed /257 would give an
    almost black picture; the image's actual range keeps its contrast.
    """
    values = np.asarray(image).astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    values = np.where(finite, values, 0.0)
    low, high = float(values[finite].min()), float(values[finite].max())
    if high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:  # flat image: keep its level on the 16-bit scale
        scaled = np.full(values.shape, low * 255.0 / 65535.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an 8-bit RGB :class:`PIL.Image.Image`, fully decoded.

    Grey (``1``, ``L``), grey+alpha (``LA``), ``RGBA`` (alpha dropped, not composited), palette
    (``P``/``PA``), ``CMYK`` and the other Pillow colour modes are converted to RGB; 16-bit and
    32-bit grey (``I;16``, ``I``, ``F``) are rescaled to 0..255 by the image's own min..max.

    Raises :class:`DataError` naming the file when it is missing, not an image, corrupt or
    truncated, or in a mode that cannot be converted.
    """
    path = Path(path)
    image = _open_decoded(path, "Image")
    with image:
        mode = image.mode
        try:
            if mode == "RGB":
                return image.copy()
            if mode in _WIDE_GREY_MODES:
                return Image.fromarray(_wide_grey_to_8bit(image), mode="L").convert("RGB")
            if mode in ("P", "PA"):
                # Via RGBA so palette transparency is read (and then dropped) without a warning.
                return image.convert("RGBA").convert("RGB")
            if mode in ("LA", "La"):
                return image.convert("L").convert("RGB")
            return image.convert("RGB")
        except (ValueError, OSError) as err:
            raise DataError(
                f"Image {_show(path)} has pixel mode {mode!r}, which cannot be converted to RGB "
                f"({err}). Fix: re-export it as 8-bit RGB or grey PNG."
            ) from err


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """Read a defect mask as a bool array ``[H, W]`` (True = defect).

    ``size`` is ``(width, height)`` of the image the mask belongs to (PIL's ``Image.size``); a mask
    of another size raises :class:`DataError`. A mask with at most two levels is read as
    "non-zero = defect" (0/255, 0/1 and 1-bit masks all work). A mask with more grey levels (JPEG
    artefacts, anti-aliased drawing) is thresholded at half its maximum, with a warning naming it.
    """
    path = Path(path)
    image = _open_decoded(path, "Mask")
    with image:
        if image.size != tuple(size):
            mw, mh = image.size
            iw, ih = size
            raise DataError(
                f"Mask {_show(path)} is {mw}x{mh} (width x height) but its image is {iw}x{ih}. "
                "Fix: save the mask at the image's size (or check that the mask belongs to this "
                "image); masks are never resized silently because that would move defect borders."
            )
        if image.mode in _WIDE_GREY_MODES:
            values = np.asarray(image).astype(np.float64)
        elif image.mode == "1":
            values = np.asarray(image).astype(np.uint8)
        else:
            values = np.asarray(image.convert("L"))
    levels = np.unique(values)
    if levels.size <= 2:
        return values != 0
    threshold = float(levels.max()) / 2.0
    warnings.warn(
        f"Mask {_show(path)} has {levels.size} grey levels, expected 2 (0 and 255); thresholded at "
        f"half its maximum ({threshold:g}). This happens with JPEG-saved or anti-aliased masks. "
        "Fix: save masks as PNG holding only 0 and 255.",
        UserWarning,
        stacklevel=2,
    )
    return values > threshold
