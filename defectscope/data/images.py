"""Reading image files and defect masks, with errors that name the file.

Everything that opens a file in defectscope goes through :func:`load_image` or :func:`load_mask`,
so a broken file is reported the same way everywhere: which file, what is wrong with it, and what
to do about it (a :class:`DataError`).

Nothing is converted silently either: every change made to a picture on the way to 8-bit RGB
(CMYK to RGB, alpha dropped, palette looked up, 16-bit / 32-bit / float grey scaled, 1-bit
expanded, only the first frame of a multi-page file used, a tiny image upscaled, the EXIF
orientation applied) is said once per file as a :class:`DataNotice`, a :class:`UserWarning`
issued with :func:`warnings.warn`: the command line prints them, Python shows them like any
warning, ``warnings.simplefilter("error", DataNotice)`` makes them errors and
``warnings.simplefilter("ignore", DataNotice)`` silences them.

Module settings (read at each call; the arguments of :func:`load_image` override them):

- :data:`MAX_PIXELS`: largest image accepted, checked from the header before decoding;
- :data:`WIDE_RANGE`: how 16-bit, 32-bit and float grey become 0..255 (``"fixed"`` or ``"stretch"``).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import stat
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DataError",
    "DataNotice",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "WIDE_RANGE",
    "WIDE_RANGES",
    "SMALL_SIDE",
    "list_images",
    "load_image",
    "load_mask",
    "reset_notices",
]

#: File extensions read as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Largest image accepted, in pixels (width x height): 100 megapixels. The size is read from the
#: file's header and checked *before* any pixel is decoded, so a "decompression bomb" (a small
#: file that claims, say, 30000x30000 pixels and would take gigabytes once decoded) is refused
#: instead of filling the memory. Raise it for genuine large scans, per call with
#: ``load_image(path, max_pixels=N)`` / ``AnomalyDataset(..., max_pixels=N)`` or for the whole
#: process with ``defectscope.data.images.MAX_PIXELS = N``. Pillow's own limit
#: (``PIL.Image.MAX_IMAGE_PIXELS``) is not used: this one replaces it.
MAX_PIXELS: int = 100_000_000

#: How grey pixels wider than 8 bits (16-bit ``I;16``, 32-bit ``I``, float ``F``; also uint16
#: arrays given to ``predict``) become 0..255:
#:
#: - ``"fixed"`` (default): one scale for every image. 16-bit: 0..65535 -> 0..255 (value / 257);
#:   32-bit integers: the same, and values outside 0..65535 are refused; float: read as 0..1,
#:   and anything outside 0..1 is refused as ambiguous.
#: - ``"stretch"``: each image's own min..max is stretched to 0..255.
#:
#: Fixed is the default because stretching each image to its own range hides exactly what an
#: anomaly detector must see: a cell that is uniformly too dark or too bright, a weak lamp or an
#: over-exposed frame comes out looking like every other image, and one hot pixel changes the
#: contrast of the whole picture. Use ``"stretch"`` only when the absolute level means nothing
#: (e.g. raw sensor data whose exposure varies on purpose) and say so when you report results.
WIDE_RANGE: str = "fixed"
WIDE_RANGES: tuple[str, ...] = ("fixed", "stretch")

#: Images smaller than this (pixels) on either side get a notice: the model upscales them to
#: its input size, so it cannot see detail finer than their pixels.
SMALL_SIDE: int = 32

# Modes that hold one integer or float channel wider than 8 bits.
_WIDE_GREY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}

_ORIENTATIONS = {
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "mirrored top-bottom",
    5: "mirrored and rotated 90 degrees",
    6: "rotated 90 degrees clockwise",
    7: "mirrored and rotated 90 degrees",
    8: "rotated 90 degrees counter-clockwise",
}


class DataError(ValueError):
    """A data set, image or mask that cannot be used as it is.

    The message always names the file or folder, the problem and the fix.
    """


class DataNotice(UserWarning):
    """A change defectscope made to a picture on its own (a mode conversion, alpha dropped, a
    16-bit range scaled, a tiny image upscaled, ...): the picture is used, but not exactly as
    stored. Each notice names the file (or the array) and is said once per file and process."""


_said: set[str] = set()
_said_lock = threading.Lock()
# Pillow's decompression-bomb limit is a module global: changed only under this lock.
_pillow_limit_lock = threading.Lock()


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_TORCH_SPEC = importlib.util.find_spec("torch")
_TORCH_DIR = str(Path(_TORCH_SPEC.origin).parent) if _TORCH_SPEC and _TORCH_SPEC.origin else _PACKAGE_DIR


def _notice(message: str) -> None:
    """Issue ``message`` as a :class:`DataNotice` unless this process already said it, attributed
    to the first caller outside defectscope (the user's line, as for any warning)."""
    with _said_lock:
        if message in _said:
            return
        _said.add(message)
    for skipped in ((_PACKAGE_DIR, _TORCH_DIR), (_PACKAGE_DIR,)):  # torch: decorators, data loaders
        level, frame = 1, sys._getframe(0)
        while frame is not None and frame.f_code.co_filename.startswith(skipped):
            frame, level = frame.f_back, level + 1
        if frame is not None:
            break
    warnings.warn(message, DataNotice, stacklevel=level)


def reset_notices() -> None:
    """Forget which notices were already said, so each is said again (tests use this)."""
    with _said_lock:
        _said.clear()


def _show(path: Path) -> str:
    """A path as the user gave it, plus where it points when it was relative."""
    text = str(path)
    if not path.is_absolute():
        text += f" (resolved: {Path.cwd() / path})"
    return text


def _is_image_file(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _link_problem(path: Path, err: OSError) -> str:
    """Why ``os.stat`` failed on ``path``, in words (broken link, link loop, ...)."""
    if err.errno == errno.ELOOP:
        return "a symbolic link loop (following it leads back to itself)"
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"a broken symbolic link (it points to {target}, which does not exist)"
    return err.strerror or str(err)


def _scan_folder(folder: Path) -> tuple[list[Path], list[str]]:
    """Regular image files directly inside ``folder`` (sorted), and the entries with an image
    name that cannot be read (broken links, link loops, pipes, devices), each as ``"name (why)"``.
    Hidden entries, other extensions and sub-folders are ignored."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        raise DataError(
            f"Cannot list the folder {_show(folder)}: {err.strerror or err}. Fix: check its permissions."
        ) from err
    images: list[Path] = []
    problems: list[str] = []
    for entry in entries:
        if not _is_image_file(entry):
            continue
        try:
            mode = os.stat(entry).st_mode
        except OSError as err:
            problems.append(f"{entry.name} ({_link_problem(entry, err)})")
            continue
        if stat.S_ISREG(mode):
            images.append(entry)
        elif not stat.S_ISDIR(mode):
            problems.append(f"{entry.name} ({_file_kind(mode)}, not a regular file)")
    return images, problems


def _image_files(folder: Path) -> list[Path]:
    """Like :func:`list_images` for folders that may hold no image (test and defect folders):
    the readable image files, with a notice naming any broken link, loop or pipe skipped."""
    images, problems = _scan_folder(folder)
    if problems:
        _notice(
            f"{len(problems)} entries in {_show(folder)} have an image name but cannot be read and "
            f"are skipped: {'; '.join(problems[:10])}"
            + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            + ". Fix: repair or remove them."
        )
    return images


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files directly inside ``folder`` (hidden files and sub-folders ignored).

    Entries with an image name that cannot be read (a broken symbolic link, a link loop, a named
    pipe or device) are never skipped silently: they get a :class:`DataNotice` naming them when
    the folder has other images, and are listed in the :class:`DataError` when it has none.

    Raises :class:`DataError` when the folder is missing, is not a folder, or holds no readable
    file with one of :data:`IMAGE_EXTENSIONS`.
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
    images, problems = _scan_folder(folder)
    if not images and problems:
        listed = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataError(
            f"No usable images in {_show(folder)}: {len(problems)} entries have an image name but "
            f"cannot be read: {listed}. Fix: repair the links (or copy the files themselves there) "
            "or remove them."
        )
    if not images:
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        found = (
            f"it holds {len(others)} other entries, e.g. {', '.join(others[:3])}" if others else "it is empty"
        )
        raise DataError(
            f"No images in {_show(folder)}: {found}. Accepted extensions (any case): "
            f"{' '.join(IMAGE_EXTENSIONS)}. Fix: put the images there or point at the right folder."
        )
    if problems:
        _image_files(folder)  # says the notice
    return images


def _sniff(head: bytes) -> str | None:
    """What the first bytes of a file that Pillow cannot read look like, if recognisable."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "an HEIC/HEIF photo (Pillow reads it only with the pillow-heif plug-in)"
        if brand in (b"avif", b"avis"):
            return "an AVIF image (this Pillow cannot read it)"
        return "a video file (MP4/MOV container)"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "a video file (AVI)"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "a video file (Matroska/WebM)"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3") or head[:3] == b"FLV":
        return "a video file (MPEG/FLV)"
    if head[:4] == b"%PDF":
        return "a PDF document"
    if head[:4] == b"PK\x03\x04":
        return "a ZIP archive"
    if head[:2] == b"\x1f\x8b":
        return "a gzip archive"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return None


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(64)
    except OSError:
        return b""


def _check_file(path: Path, what: str, extension: bool = True) -> None:
    """Refuse, without opening it, anything that is not a non-empty regular file with an image
    extension: missing files, broken links, link loops, folders, pipes, devices, sockets (opening
    a pipe would block forever), other extensions and empty files."""
    try:
        info = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP or path.is_symlink():
            raise DataError(
                f"{what} {_show(path)} is {_link_problem(path, err)}. Fix: point the link at the "
                "real file, or remove it."
            ) from err
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(
                f"{what} not found: {_show(path)}. Fix: check the path or remove it from the list."
            ) from err
        raise DataError(
            f"Cannot read {what.lower()} {_show(path)}: {err.strerror or err}. Fix: check its permissions."
        ) from err
    if stat.S_ISDIR(info.st_mode):
        raise DataError(
            f"Expected a file but {_show(path)} is a folder. Fix: pass the {what.lower()} file itself."
        )
    if not stat.S_ISREG(info.st_mode):
        raise DataError(
            f"{what} {_show(path)} is {_file_kind(info.st_mode)}, not a regular file; it was not "
            "opened (reading from it could wait forever). Fix: pass the image file itself."
        )
    if extension and path.suffix.lower() not in IMAGE_EXTENSIONS:
        looks = _sniff(_read_head(path)) if info.st_size else None
        raise DataError(
            f"{_show(path)} is not an image: its extension {path.suffix or '(none)'} is not one of "
            f"{' '.join(IMAGE_EXTENSIONS)} (any case)"
            + (f"; the file looks like {looks}" if looks else "")
            + ". Fix: convert it to PNG (for a video, extract its frames, e.g. "
            "ffmpeg -i video.mp4 frame_%05d.png) or, if it is an image with the wrong extension, "
            "rename it."
        )
    if info.st_size == 0:
        raise DataError(
            f"{what} {_show(path)} is empty (0 bytes). Fix: copy it again from its source or delete it."
        )


def _limit(max_pixels: int | None) -> int:
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0:
        raise DataError(
            f"max_pixels must be a positive number of pixels, got {limit!r}. Fix: pass e.g. "
            f"{MAX_PIXELS} (the default, 100 megapixels)."
        )
    return int(limit)


def _wide_range(wide_range: str | None) -> str:
    value = WIDE_RANGE if wide_range is None else wide_range
    if value not in WIDE_RANGES:
        raise DataError(
            f"wide_range must be one of {', '.join(map(repr, WIDE_RANGES))}, got {value!r}. Fix: "
            "pass 'fixed' (the default: 16-bit 0..65535 -> 0..255 for every image) or 'stretch' "
            "(each image's own min..max)."
        )
    return value


def _pil_open(path: Path) -> Image.Image:
    """``Image.open`` with Pillow's decompression-bomb check replaced by ours (see MAX_PIXELS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            pass
    # Over twice Pillow's own limit: open the header again without it, to apply ours.
    with _pillow_limit_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _frame_count(image: Image.Image) -> int:
    try:
        return int(getattr(image, "n_frames", 1) or 1)
    except Exception:  # a broken later frame: the first one is still checked by load()
        return 1


def _open_decoded(path: Path, what: str, max_pixels: int | None = None) -> tuple[Image.Image, str]:
    """Open ``path`` and decode every pixel of its first frame, so a truncated file fails here
    and not mid-training. Refuses non-regular files and images over ``max_pixels`` unopened /
    undecoded, and says when only the first of several frames is used. Returns the image and
    the decoder's raw mode (e.g. ``"RGB;16B"``: 16 bits per channel read as 8)."""
    limit = _limit(max_pixels)
    _check_file(path, what)
    try:
        image = _pil_open(path)
    except UnidentifiedImageError as err:
        looks = _sniff(_read_head(path))
        raise DataError(
            f"{what} {_show(path)}: the extension says image, the contents are not an image Pillow "
            "can read" + (f"; the file looks like {looks}" if looks else "") + ". Fix: re-export it as "
            "PNG/JPEG/BMP/TIFF (for a video, extract its frames, e.g. ffmpeg -i video.mp4 "
            "frame_%05d.png) or delete it."
        ) from err
    except OSError as err:
        raise DataError(
            f"Cannot read {what.lower()} {_show(path)}: {err}. Fix: check its permissions."
        ) from err
    width, height = image.size
    if width * height > limit:
        image.close()
        raise DataError(
            f"{what} {_show(path)} claims {width}x{height} pixels ({width * height / 1e6:.1f} "
            f"megapixels), over the limit of {limit / 1e6:g} megapixels (max_pixels={limit}); it was "
            "refused before decoding, as a possible decompression bomb. Fix: if the image is genuine, "
            "raise the limit (command line: --max-pixels N; Python: load_image(..., max_pixels=N), "
            "AnomalyDataset(..., max_pixels=N) or defectscope.data.images.MAX_PIXELS = N) or downscale it "
            "first; otherwise delete it."
        )
    frames = _frame_count(image)
    try:
        if frames > 1:
            image.seek(0)
        rawmode = _rawmode(image)
        image.load()
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... by format
        image.close()
        raise DataError(
            f"{what} {_show(path)} is corrupt or truncated ({type(err).__name__}: {err}). "
            "Fix: copy the file again from its source or delete it."
        ) from err
    if frames > 1:
        _notice(
            f"{what} {_show(path)} has {frames} frames (pages); only the first frame of {frames} is "
            "used. Fix: save each page you want scored as its own file."
        )
    return image, rawmode


def _orient(image: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation (as photo viewers do), with a notice when it changes the image."""
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:  # unreadable EXIF: use the pixels as stored
        return image
    if orientation not in _ORIENTATIONS:
        return image
    turned = ImageOps.exif_transpose(image)
    width, height = turned.size
    _notice(
        f"{name}: EXIF orientation {orientation} applied ({_ORIENTATIONS[orientation]}), so it is read "
        f"as {width}x{height}, the way photo viewers show it; its mask must match that orientation."
    )
    return turned


def _wide_to_uint8(values: np.ndarray, name: str, wide_range: str | None = None) -> np.ndarray:
    """Grey (or colour) values wider than 8 bits -> uint8, by the rules of :data:`WIDE_RANGE`.

    Integers (uint16, and 32-bit ones within 0..65535): ``round(value / 257)`` in ``"fixed"``
    mode, so 16-bit data equal to 8-bit data x 257 give exactly the 8-bit values. Floats: read as
    0..1 (``round(value * 255)``); outside 0..1 is ambiguous and refused. NaN / infinity are
    always refused. ``"stretch"``: the values' own min..max -> 0..255.
    """
    mode = _wide_range(wide_range)
    is_float = values.dtype.kind == "f"
    if is_float:
        bad = ~np.isfinite(values)
        if bad.any():
            n_nan = int(np.isnan(values).sum())
            raise DataError(
                f"{name} has {int(bad.sum())} of {values.size} pixels that are not numbers ({n_nan} NaN, "
                f"{int(bad.sum()) - n_nan} infinite). Fix: replace them (e.g. numpy.nan_to_num) and "
                "save again; defectscope does not guess what a missing value should look like."
            )
    kind = "float" if is_float else "16-bit" if values.dtype.itemsize <= 2 else "32-bit integer"
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if mode == "stretch":
        if high > low:
            scaled = (values - low) * (255.0 / (high - low))
        elif is_float and 0.0 <= low <= 1.0:
            scaled = np.full(values.shape, low * 255.0)
        else:  # flat image: keep its level on the 16-bit scale
            scaled = np.full(values.shape, np.clip(low, 0, 65535) / 257.0)
        _notice(
            f"{name}: {kind} values stretched from their own range {low:g}..{high:g} to 0..255 "
            "(wide_range='stretch'); brightness is no longer comparable between images."
        )
    elif is_float:
        if low < 0.0 or high > 1.0:
            raise DataError(
                f"{name} holds float values {low:g}..{high:g}, but float pixels are read as 0..1: "
                "this range is ambiguous (0..255? 0..65535? physical units?). Fix: save it as 8-bit "
                "or 16-bit integers, scale it to 0..1 yourself, or pass wide_range='stretch' to "
                "stretch each image's own min..max to 0..255."
            )
        scaled = values * 255.0
        _notice(f"{name}: float values read as 0..1 and scaled to 0..255.")
    else:
        if low < 0 or high > 65535:
            raise DataError(
                f"{name} holds 32-bit integer values {low:g}..{high:g}, outside the 16-bit range "
                "0..65535 that is scaled to 0..255. Fix: save it as 16-bit (0..65535) or 8-bit "
                "integers, or pass wide_range='stretch' to stretch each image's own min..max."
            )
        scaled = values / 257.0
        _notice(
            f"{name}: {kind} values scaled to 8 bits with the fixed range 0..65535 -> 0..255 "
            "(value / 257), the same for every image. Pass wide_range='stretch' to stretch each "
            "image's own min..max instead."
        )
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _rawmode(image: Image.Image) -> str:
    """The decoder's raw mode of the first tile ('' when unknown or already decoded)."""
    try:
        args = image.tile[0][3]
    except Exception:
        return ""
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _to_rgb(image: Image.Image, name: str, wide_range: str | None, deep_colour: bool = False) -> Image.Image:
    """A decoded image in any Pillow mode -> 8-bit RGB, with a notice for every change that is
    not a plain grey or RGB copy. ``deep_colour``: the file held 16 bits per colour channel,
    which Pillow reads as 8 (the high byte)."""
    mode = image.mode
    try:
        if mode in _WIDE_GREY_MODES:
            return Image.fromarray(_wide_to_uint8(np.asarray(image), name, wide_range), mode="L").convert("RGB")
        if deep_colour and mode in ("RGB", "RGBA"):
            _notice(
                f"{name}: 16 bits per colour channel read as 8 bits (the high byte: the fixed range "
                "0..65535 -> 0..255); wide_range='stretch' applies to grey images only."
            )
        if mode == "RGB":
            return image.copy()
        if mode == "L":
            return image.convert("RGB")
        if mode == "RGBX":
            return image.convert("RGB")
        if mode == "1":
            _notice(f"{name}: 1-bit black-and-white image read as 0 (black) and 255 (white).")
            return image.convert("RGB")
        if mode in ("P", "PA"):
            colours = len(image.getpalette() or []) // 3
            transparent = mode == "PA" or "transparency" in image.info
            _notice(
                f"{name}: palette image ({colours} colours); each pixel's colour is looked up in the "
                "palette" + ("; its transparency is dropped, not composited" if transparent else "") + "."
            )
            # Via RGBA so palette transparency is read (and then dropped) without Pillow's warning.
            return image.convert("RGBA").convert("RGB")
        if mode in ("RGBA", "RGBa", "LA", "La"):
            see_through = float((np.asarray(image.getchannel("A")) < 255).mean()) * 100
            detail = (
                f"the colours stored under transparent pixels are used ({see_through:.3g}% of the "
                "pixels are not fully opaque)"
                if see_through
                else "every pixel is fully opaque, so nothing is lost"
            )
            _notice(f"{name}: {mode} image; its alpha (transparency) channel is dropped, not composited: {detail}.")
            if mode in ("LA", "La"):
                return image.convert("L").convert("RGB")
            return image.convert("RGB")
        if mode == "CMYK":
            _notice(
                f"{name}: CMYK image converted to RGB with Pillow's plain formula (no colour profile), "
                "so colours may differ from what a print viewer shows."
            )
            return image.convert("RGB")
        _notice(f"{name}: pixel mode {mode!r} converted to RGB.")
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(
            f"{name} has pixel mode {mode!r}, which cannot be converted to RGB "
            f"({err}). Fix: re-export it as 8-bit RGB or grey PNG."
        ) from err


def _small_notice(name: str, width: int, height: int) -> None:
    if min(width, height) < SMALL_SIDE:
        _notice(
            f"{name} is only {width}x{height} pixels (under {SMALL_SIDE} on a side); it is upscaled "
            "to the model's input size, so it cannot show detail finer than its own pixels. Fix: "
            "use larger images or crops if you have them."
        )


def pil_to_rgb(image: Image.Image, name: str = "The PIL image", wide_range: str | None = None) -> Image.Image:
    """An in-memory PIL image -> 8-bit RGB by the same rules as a file read by :func:`load_image`
    (EXIF orientation, mode conversions, notices). For a multi-frame image the current frame is used."""
    frames = _frame_count(image)
    try:
        image.load()
    except Exception as err:
        raise DataError(
            f"{name} cannot be decoded ({type(err).__name__}: {err}). Fix: check the file it was opened from."
        ) from err
    if frames > 1:
        _notice(f"{name} has {frames} frames; only the current one (frame {image.tell() + 1} of {frames}) is used.")
    image = _orient(image, name)
    result = _to_rgb(image, name, wide_range)
    _small_notice(name, *result.size)
    return result


def load_image(
    path: str | os.PathLike, *, wide_range: str | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Read an image file as an 8-bit RGB :class:`PIL.Image.Image`, fully decoded.

    Only regular, non-empty files with one of :data:`IMAGE_EXTENSIONS` are opened; folders, named
    pipes, devices, sockets, broken links and images over ``max_pixels`` (default
    :data:`MAX_PIXELS`, 100 megapixels, checked before decoding) are refused.

    Conversions, each said once per file as a :class:`DataNotice`: the EXIF orientation is
    applied; only the first frame of a multi-page TIFF is used; grey (``L``) and RGB are copied
    as they are; ``1``-bit, palette (``P``/``PA``), ``CMYK`` and the other Pillow colour modes are
    converted to RGB; alpha (``RGBA``, ``LA``, ``PA``) is dropped, not composited; 16-bit,
    32-bit and float grey (``I;16``, ``I``, ``F``) become 0..255 by ``wide_range`` (default
    :data:`WIDE_RANGE`, ``"fixed"``: 0..65535 -> 0..255 for integers, 0..1 for floats; see
    :data:`WIDE_RANGE` for why fixed is the default and what ``"stretch"`` does); images under
    :data:`SMALL_SIDE` pixels on a side are flagged, since the model upscales them.

    Raises :class:`DataError` naming the file when it is missing, not an image, empty, corrupt or
    truncated, too large, holds NaN / infinite or out-of-range wide values, or is in a mode that
    cannot be converted.
    """
    path = Path(path)
    wide_range = _wide_range(wide_range)
    image, rawmode = _open_decoded(path, "Image", max_pixels)
    name = f"Image {_show(path)}"
    with image:
        deep_colour = "16" in rawmode and image.mode in ("RGB", "RGBA")
        oriented = _orient(image, name)
        result = _to_rgb(oriented, name, wide_range, deep_colour=deep_colour)
    _small_notice(name, *result.size)
    return result


def load_mask(path: str | os.PathLike, size: tuple[int, int], *, max_pixels: int | None = None) -> np.ndarray:
    """Read a defect mask as a bool array ``[H, W]`` (True = defect).

    ``size`` is ``(width, height)`` of the image the mask belongs to (PIL's ``Image.size``, after
    the image's EXIF orientation); the mask's own EXIF orientation is applied the same way, so
    the two stay aligned. A mask of another size raises :class:`DataError`. A mask with at most
    two levels is read as "non-zero = defect" (0/255, 0/1 and 1-bit masks all work). A mask with
    more grey levels (JPEG artefacts, anti-aliased drawing) is thresholded at half its maximum,
    with a :class:`DataNotice` naming it. NaN / infinite values raise :class:`DataError`.
    """
    path = Path(path)
    image, _ = _open_decoded(path, "Mask", max_pixels)
    name = f"Mask {_show(path)}"
    with image:
        image = _orient(image, name)
        if image.size != tuple(size):
            mw, mh = image.size
            iw, ih = size
            raise DataError(
                f"Mask {_show(path)} is {mw}x{mh} (width x height) but its image is {iw}x{ih}. "
                "Fix: save the mask at the image's size (or check that the mask belongs to this "
                "image); masks are never resized silently because that would move defect borders."
            )
        return _binary_mask(image, name, (
            "Mask {path} has {levels} grey levels, expected 2 (0 and 255); thresholded at half its maximum "
            "({threshold:g}). This happens with JPEG-saved or anti-aliased masks. Fix: save masks as PNG "
            "holding only 0 and 255."), path)


def _binary_mask(image: Image.Image, name: str, grey_levels_notice: str, path: Path) -> np.ndarray:
    """An opened mask image (oriented) -> bool ``[H, W]``: non-zero when it has at most two
    levels (0/255, 0/1, 1-bit), else above half its maximum, with ``grey_levels_notice``
    (formatted with ``path``, ``levels``, ``threshold``) as a :class:`DataNotice`. NaN /
    infinite values raise :class:`DataError` naming ``name``. Defect masks and ROI masks."""
    if image.mode in _WIDE_GREY_MODES:
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise DataError(f"{name} has NaN or infinite values. Fix: save it as 8-bit PNG holding only 0 and 255.")
    elif image.mode == "1":
        values = np.asarray(image).astype(np.uint8)
    else:
        values = np.asarray(image.convert("L"))
    levels = np.unique(values)
    if levels.size <= 2:
        return values != 0
    threshold = float(levels.max()) / 2.0
    _notice(grey_levels_notice.format(path=_show(path), levels=levels.size, threshold=threshold))
    return values > threshold
