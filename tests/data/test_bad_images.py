"""Every bad image file answered: a DataError naming the file, the problem and the fix; every
silent conversion said as a DataNotice (once per file).

Each case has a pytest id naming the bad input; the files are tiny (a few hundred bytes) except
where a header claims a huge size without the pixels to back it.
"""

from __future__ import annotations

import os
import socket
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.data import AnomalyDataset, DataError, Sample, list_images, load_image, load_mask, mvtec_split
from defectscope.data import images as images_module
from defectscope.data.images import DataNotice, reset_notices

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (36, 40, 3), dtype=np.uint8)  # 40x36 (width x height): not "tiny"
GREY = RGB[..., 1].copy()


@pytest.fixture(autouse=True)
def fresh_notices():
    """Each test sees every notice again (they are said once per file and process)."""
    reset_notices()
    yield
    reset_notices()


# ---------------------------------------------------------------- helpers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bytes(width: int, height: int, raw: bytes = b"\x00", bit_depth: int = 8, colour: int = 0) -> bytes:
    """A PNG whose IHDR says ``width`` x ``height``, with whatever pixel data ``raw`` holds."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


def _rgb_png(tmp: Path, name: str = "good.png") -> Path:
    return _save(tmp / name, Image.fromarray(RGB))


def _tiff(tmp: Path, values: np.ndarray, mode: str, name: str = "wide.tif") -> Path:
    return _save(tmp / name, Image.fromarray(values, mode))


def _fifo(tmp: Path, name: str = "pipe.png") -> Path:
    os.mkfifo(tmp / name)
    return tmp / name


def _socket(tmp: Path, name: str = "s.png") -> Path:
    path = tmp / name
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
    finally:
        server.close()  # the socket file stays
    return path


def _broken_link(tmp: Path, name: str = "broken.png") -> Path:
    (tmp / name).symlink_to(tmp / "gone" / "target.png")
    return tmp / name


def _loop(tmp: Path, name: str = "loop.png") -> Path:
    (tmp / name).symlink_to(tmp / f"other_{name}")
    (tmp / f"other_{name}").symlink_to(tmp / name)
    return tmp / name


def _said(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DataNotice)]


def _video_head(brand: bytes = b"isom") -> bytes:
    return b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x02\x00" + bytes(64)


# ---------------------------------------------------------------- refused image files

# (id, builder(tmp) -> (path, load_image keyword arguments), key phrases of the message)
REFUSED = [
    ("empty-0-bytes-png", lambda t: (_write(t / "empty.png", b""), {}), ["is empty (0 bytes)"]),
    ("text-renamed-png", lambda t: (_write(t / "notes.png", b"hello, not an image\n" * 4), {}),
     ["the extension says image, the contents are not an image Pillow can read", "text file"]),
    ("mp4-renamed-png", lambda t: (_write(t / "clip.png", _video_head()), {}),
     ["the contents are not an image Pillow can read", "looks like a video file (MP4/MOV"]),
    ("mov-renamed-jpg", lambda t: (_write(t / "clip.jpg", _video_head(b"qt  ")), {}), ["looks like a video file"]),
    ("avi-renamed-png", lambda t: (_write(t / "clip.png", b"RIFF\x10\x00\x00\x00AVI LIST" + bytes(40)), {}),
     ["looks like a video file (AVI)"]),
    ("mkv-renamed-tif", lambda t: (_write(t / "clip.tif", b"\x1a\x45\xdf\xa3" + bytes(40)), {}),
     ["looks like a video file (Matroska/WebM)"]),
    ("mpeg-renamed-bmp", lambda t: (_write(t / "clip.bmp", b"\x00\x00\x01\xba" + bytes(40)), {}),
     ["looks like a video file (MPEG"]),
    ("heic-renamed-jpg", lambda t: (_write(t / "phone.jpg", _video_head(b"heic")), {}), ["HEIC/HEIF photo"]),
    ("pdf-renamed-png", lambda t: (_write(t / "doc.png", b"%PDF-1.7\n" + bytes(40)), {}), ["looks like a PDF document"]),
    ("zip-renamed-png", lambda t: (_write(t / "pack.png", b"PK\x03\x04" + bytes(40)), {}), ["looks like a ZIP archive"]),
    ("random-bytes-png", lambda t: (_write(t / "noise.png", bytes(range(1, 200))), {}),
     ["the contents are not an image Pillow can read"]),
    ("mp4-extension", lambda t: (_write(t / "clip.mp4", _video_head()), {}),
     ["is not an image: its extension .mp4 is not one of .png .jpg", "looks like a video file (MP4/MOV"]),
    ("avi-extension", lambda t: (_write(t / "clip.AVI", b"RIFF\x10\x00\x00\x00AVI LIST" + bytes(40)), {}),
     ["is not an image: its extension .AVI is not one of", "video file (AVI)"]),
    ("txt-extension", lambda t: (_write(t / "notes.txt", b"some text\n"), {}),
     ["is not an image: its extension .txt is not one of"]),
    ("gif-extension", lambda t: (_save(t / "anim.gif", Image.fromarray(GREY)), {}),
     ["is not an image: its extension .gif is not one of"]),
    ("no-extension", lambda t: (_save(t / "picture", Image.fromarray(RGB), format="PNG"), {}),
     ["is not an image: its extension (none) is not one of"]),
    ("truncated-png", lambda t: (_write(t / "cut.png", _rgb_png(t, "whole.png").read_bytes()[:200]), {}),
     ["is corrupt or truncated"]),
    ("bad-crc-png", lambda t: (_write(t / "flipped.png", _flip_idat(_rgb_png(t, "whole.png").read_bytes())), {}),
     ["is corrupt or truncated"]),
    ("missing-file", lambda t: (t / "gone.png", {}), ["not found"]),
    ("missing-parent-folder", lambda t: (t / "nowhere" / "gone.png", {}), ["not found"]),
    ("file-as-parent-folder", lambda t: (_rgb_png(t) / "inner.png", {}), ["not found"]),
    ("folder", lambda t: (t, {}), ["is a folder"]),
    ("folder-named-png", lambda t: ((t / "sub.png").mkdir() or t / "sub.png", {}), ["is a folder"]),
    ("fifo-named-png", lambda t: (_fifo(t), {}), ["is a named pipe (FIFO), not a regular file", "not opened"]),
    ("char-device-dev-null", lambda t: (Path("/dev/null"), {}), ["is a character device, not a regular file"]),
    ("unix-socket-named-png", lambda t: (_socket(t), {}), ["is a socket, not a regular file"]),
    ("broken-symlink", lambda t: (_broken_link(t), {}), ["is a broken symbolic link", "gone/target.png"]),
    ("symlink-loop", lambda t: (_loop(t), {}), ["is a symbolic link loop"]),
    ("symlink-to-fifo", lambda t: ((t / "link.png").symlink_to(_fifo(t)) or t / "link.png", {}),
     ["named pipe (FIFO)"]),
    ("bomb-header-30000x30000", lambda t: (_write(t / "bomb.png", _png_bytes(30000, 30000)), {}),
     ["claims 30000x30000 pixels (900.0 megapixels)", "max_pixels=100000000", "decompression bomb",
      "MAX_PIXELS"]),
    ("bomb-header-12000x12000", lambda t: (_write(t / "bomb.png", _png_bytes(12000, 12000)), {}),
     ["claims 12000x12000 pixels (144.0 megapixels)", "max_pixels"]),
    ("over-max-pixels-argument", lambda t: (_rgb_png(t), {"max_pixels": 1000}),
     ["claims 40x36 pixels", "max_pixels=1000", "raise the limit"]),
    ("float-tiff-nan", lambda t: (_tiff(t, _with(GREY / 255.0, np.nan), "F"), {}), ["1 NaN"]),
    ("float-tiff-inf", lambda t: (_tiff(t, _with(GREY / 255.0, np.inf), "F"), {}), ["1 infinite"]),
    ("float-tiff-nan-stretch", lambda t: (_tiff(t, _with(GREY / 255.0, np.nan), "F"), {"wide_range": "stretch"}),
     ["NaN"]),
    ("float-tiff-0-255", lambda t: (_tiff(t, GREY.astype(np.float32), "F"), {}),
     ["float values 0..255", "ambiguous", "wide_range='stretch'"]),
    ("float-tiff-negative", lambda t: (_tiff(t, GREY.astype(np.float32) / 255 - 0.5, "F"), {}), ["ambiguous"]),
    ("int32-tiff-over-65535", lambda t: (_tiff(t, GREY.astype(np.int32) * 1000, "I"), {}),
     ["outside the 16-bit range 0..65535"]),
    ("int32-tiff-negative", lambda t: (_tiff(t, GREY.astype(np.int32) - 100, "I"), {}),
     ["outside the 16-bit range"]),
    ("unknown-wide-range", lambda t: (_rgb_png(t), {"wide_range": "auto"}), ["wide_range must be one of"]),
    ("zero-max-pixels", lambda t: (_rgb_png(t), {"max_pixels": 0}), ["max_pixels must be a positive"]),
]


def _with(values: np.ndarray, bad: float) -> np.ndarray:
    values = values.astype(np.float32)
    values[3, 4] = bad
    return values


def _flip_idat(data: bytes) -> bytes:
    at = data.index(b"IDAT") + 20
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.timeout(30)  # a pipe that were opened would block forever
@pytest.mark.parametrize("build, phrases", [pytest.param(b, p, id=i) for i, b, p in REFUSED])
def test_bad_image_file_is_refused_naming_it(tmp_path, build, phrases):
    path, options = build(tmp_path)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as info:
            load_image(path, **options)
    message = str(info.value)
    bad_argument = options.get("wide_range") == "auto" or options.get("max_pixels") == 0
    if not bad_argument:  # a bad argument is named instead of the file
        assert str(path) in message, message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in: {message}"
    assert "Fix" in message, message
    # Pillow's own decompression-bomb warning never leaks, and its global limit is left alone.
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == pillow_limit


def test_module_max_pixels_setting_applies_and_can_be_raised(tmp_path, monkeypatch):
    path = _rgb_png(tmp_path)
    monkeypatch.setattr(images_module, "MAX_PIXELS", 1000)
    with pytest.raises(DataError, match="max_pixels=1000"):
        load_image(path)
    assert load_image(path, max_pixels=40 * 36).size == (40, 36)  # the argument wins; the limit is inclusive


# ---------------------------------------------------------------- refused masks

# (id, builder(tmp) -> mask path, load_mask keyword arguments, key phrase)
MASKS = [
    ("mask-fifo", lambda t: _fifo(t, "m_mask.png"), {}, "named pipe (FIFO)"),
    ("mask-broken-symlink", lambda t: _broken_link(t, "m_mask.png"), {}, "broken symbolic link"),
    ("mask-empty", lambda t: _write(t / "m_mask.png", b""), {}, "is empty (0 bytes)"),
    ("mask-video", lambda t: _write(t / "m_mask.png", _video_head()), {}, "looks like a video file"),
    ("mask-over-max-pixels", lambda t: _save(t / "m_mask.png", Image.fromarray(GREY)), {"max_pixels": 100},
     "max_pixels=100"),
    ("mask-float-nan", lambda t: _tiff(t, _with(np.zeros((36, 40)), np.nan), "F", "m_mask.tif"), {},
     "NaN or infinite"),
    ("mask-wrong-size-after-exif", lambda t: _exif_png(t / "m_mask.png", GREY, 6), {}, "is 36x40"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("build, options, phrase", [pytest.param(b, o, p, id=i) for i, b, o, p in MASKS])
def test_bad_mask_is_refused_naming_it(tmp_path, build, options, phrase):
    path = build(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataNotice)
        with pytest.raises(DataError) as info:
            load_mask(path, (40, 36), **options)
    message = str(info.value)
    assert path.name in message and phrase in message and "Fix" in message, message


# ---------------------------------------------------------------- folders


def test_folder_of_only_broken_links_is_an_error_listing_them(tmp_path):
    _broken_link(tmp_path, "a.png")
    _loop(tmp_path, "b.png")
    _fifo(tmp_path, "c.png")
    (tmp_path / "readme.txt").write_text("not an image")
    with pytest.raises(DataError) as info:
        list_images(tmp_path)
    message = str(info.value)
    assert "No usable images" in message and str(tmp_path) in message
    assert "a.png (a broken symbolic link" in message
    assert "b.png (a symbolic link loop" in message and "c.png (a named pipe (FIFO)" in message
    assert "other_b.png" in message  # the loop's other half has an image name too
    assert "Fix" in message


@pytest.mark.parametrize(
    "bad_entry, phrase",
    [
        pytest.param(_broken_link, "broken.png (a broken symbolic link", id="folder-broken-symlink"),
        pytest.param(_loop, "loop.png (a symbolic link loop", id="folder-symlink-loop"),
        pytest.param(_fifo, "pipe.png (a named pipe (FIFO)", id="folder-fifo"),
        pytest.param(_socket, "s.png (a socket", id="folder-socket"),
    ],
)
def test_unreadable_entry_beside_good_images_is_a_notice(tmp_path, bad_entry, phrase):
    good = _rgb_png(tmp_path)
    bad_entry(tmp_path)
    (tmp_path / "sub.png").mkdir()  # a folder with an image name is not a problem: sub-folders are ignored
    with pytest.warns(DataNotice) as caught:
        assert list_images(tmp_path) == [good]
    said = _said(caught)
    assert len(said) == 1 and phrase in said[0] and str(tmp_path) in said[0] and "sub.png" not in said[0]


def test_mvtec_defect_folder_with_a_broken_link_says_so(synthetic_copy):
    crack = sorted(p for p in (synthetic_copy / "test").iterdir() if p.is_dir() and p.name != "good")[0]
    _broken_link(crack, "zz_lost.png")
    with pytest.warns(DataNotice, match="zz_lost.png \\(a broken symbolic link"):
        split = mvtec_split(synthetic_copy.parent, synthetic_copy.name)
    assert all(s.path.name != "zz_lost.png" for s in split.test)


# ---------------------------------------------------------------- AnomalyDataset


@pytest.mark.timeout(30)
def test_validate_lists_every_bad_file_without_opening_pipes(tmp_path):
    good = _rgb_png(tmp_path)
    bad = {
        "pipe.png": _fifo(tmp_path),
        "broken.png": _broken_link(tmp_path),
        "sub.png": (tmp_path / "sub.png").mkdir() or tmp_path / "sub.png",
        "empty.png": _write(tmp_path / "empty.png", b""),
        "clip.png": _write(tmp_path / "clip.png", _video_head()),
        "bomb.png": _write(tmp_path / "bomb.png", _png_bytes(30000, 30000)),
        "clip.mp4": _write(tmp_path / "clip.mp4", _video_head()),
    }
    samples = [Sample(good, 0)] + [Sample(p, 0) for p in bad.values()]
    samples.append(Sample(tmp_path / "missing.png", 1, tmp_path / "missing_mask.png", "crack"))
    with pytest.raises(DataError) as info:
        AnomalyDataset(samples, image_size=16).validate()
    message = str(info.value)
    assert message.startswith(f"{len(bad) + 1} of {len(samples)} samples")
    for name in [*bad, "missing.png", "missing_mask.png"]:
        assert name in message, name
    for phrase in ("named pipe", "broken symbolic link", "is a folder", "is empty (0 bytes)",
                   "looks like a video file", "megapixels", "is not an image: its extension .mp4"):
        assert phrase in message, phrase


def test_dataset_passes_wide_range_and_max_pixels(tmp_path):
    path = _save(tmp_path / "deep.png", Image.fromarray((GREY.astype(np.uint16) * 10 + 1000)))
    sample = [Sample(path, 0)]
    with pytest.warns(DataNotice, match="fixed range"):
        fixed = AnomalyDataset(sample, image_size=(36, 40), mean=None, std=None)[0]["image"]
    with pytest.warns(DataNotice, match="stretched"):
        stretched = AnomalyDataset(sample, image_size=(36, 40), mean=None, std=None, wide_range="stretch")[0]["image"]
    assert float(fixed.max()) < 0.2 and float(stretched.min()) == 0.0 and float(stretched.max()) == 1.0
    with pytest.raises(DataError, match="max_pixels=100"):
        AnomalyDataset(sample, max_pixels=100)[0]
    with pytest.raises(DataError, match="wide_range must be one of"):
        AnomalyDataset(sample, wide_range="auto")
    with pytest.raises(DataError, match="max_pixels must be a positive"):
        AnomalyDataset(sample, max_pixels=-5)


# ---------------------------------------------------------------- conversions said as notices


def _exif_png(path: Path, array: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(path, Image.fromarray(array), exif=exif)


def _palette(t: Path, transparency: bool) -> Path:
    image = Image.fromarray(RGB).quantize(colors=16)
    return _save(t / "p.png", image, **({"transparency": 0} if transparency else {}))


def _multipage(t: Path) -> Path:
    pages = [Image.fromarray(np.full((36, 40), 60 * i, np.uint8)) for i in range(3)]
    return _save(t / "pages.tif", pages[0], save_all=True, append_images=pages[1:])


def _rgba(alpha: int) -> np.ndarray:
    return np.concatenate([RGB, np.full((36, 40, 1), alpha, np.uint8)], axis=2)


def _48_bit_png(t: Path) -> Path:
    rows = b"".join(b"\x00" + (RGB[y].astype(">u2") * 257).tobytes() for y in range(36))
    return _write(t / "deep_rgb.png", _png_bytes(40, 36, rows, bit_depth=16, colour=2))


def _same(expected: np.ndarray):
    def check(image):
        assert np.array_equal(np.asarray(image), expected)

    return check


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


# (id, builder(tmp) -> (path, load_image options), phrases: one per expected notice, check(image))
CONVERSIONS = [
    ("cmyk-jpeg", lambda t: (_save(t / "k.jpg", Image.fromarray(RGB).convert("CMYK"), quality=95), {}),
     ["CMYK image converted to RGB"], lambda im: np.abs(np.asarray(im).astype(int) - RGB).mean() < 40),
    ("rgba-half-transparent", lambda t: (_save(t / "a.png", Image.fromarray(_rgba(0))), {}),
     ["alpha (transparency) channel is dropped, not composited", ], _same(RGB)),
    ("rgba-opaque", lambda t: (_save(t / "a.png", Image.fromarray(_rgba(255))), {}),
     ["every pixel is fully opaque, so nothing is lost"], _same(RGB)),
    ("grey-alpha-la", lambda t: (_save(t / "la.png", Image.fromarray(np.stack([GREY, GREY], 2), "LA")), {}),
     ["LA image; its alpha"], _same(_grey3(GREY))),
    ("palette", lambda t: (_palette(t, False), {}), ["palette image (16 colours)"], None),
    ("palette-transparent", lambda t: (_palette(t, True), {}), ["its transparency is dropped"], None),
    ("16-bit-png-fixed", lambda t: (_save(t / "d.png", Image.fromarray(GREY.astype(np.uint16) * 257)), {}),
     ["16-bit values scaled to 8 bits with the fixed range 0..65535 -> 0..255"], _same(_grey3(GREY))),
    ("16-bit-tiff-fixed", lambda t: (_save(t / "d.tif", Image.fromarray(GREY.astype(np.uint16) * 257)), {}),
     ["fixed range 0..65535"], _same(_grey3(GREY))),
    ("16-bit-png-stretch", lambda t: (_save(t / "d.png", Image.fromarray(GREY.astype(np.uint16) + 5000)),
                                      {"wide_range": "stretch"}),
     [f"stretched from their own range {int(GREY.min()) + 5000}..{int(GREY.max()) + 5000}"],
     lambda im: np.asarray(im).min() == 0 and np.asarray(im).max() == 255),
    ("int32-tiff-in-16-bit-range", lambda t: (_tiff(t, GREY.astype(np.int32) * 257, "I"), {}),
     ["fixed range 0..65535"], _same(_grey3(GREY))),
    ("float-tiff-0-1", lambda t: (_tiff(t, GREY.astype(np.float32) / 255, "F"), {}),
     ["float values read as 0..1"], _same(_grey3(GREY))),
    ("float-tiff-0-1000-stretch", lambda t: (_tiff(t, GREY.astype(np.float32) * 4, "F"), {"wide_range": "stretch"}),
     ["float values stretched"], lambda im: np.asarray(im).max() == 255),
    ("1-bit", lambda t: (_save(t / "bits.png", Image.fromarray(GREY > 127)), {}),
     ["1-bit black-and-white"], _same(_grey3(np.where(GREY > 127, 255, 0).astype(np.uint8)))),
    ("multipage-tiff", lambda t: (_multipage(t), {}), ["only the first frame of 3 is used"],
     _same(np.zeros((36, 40, 3), np.uint8))),
    ("tiny-1x1", lambda t: (_save(t / "dot.png", Image.fromarray(RGB[:1, :1])), {}),
     ["is only 1x1 pixels (under 32 on a side); it is upscaled"], _same(RGB[:1, :1])),
    ("tiny-31x40", lambda t: (_save(t / "thin.png", Image.fromarray(RGB[:, :31])), {}),
     ["is only 31x36 pixels"], None),
    ("tiny-rgba-1x1", lambda t: (_save(t / "dot.png", Image.fromarray(_rgba(0)[:1, :1])), {}),
     ["alpha", "1x1 pixels"], None),
    ("exif-orientation-6", lambda t: (_exif_png(t / "turned.png", RGB, 6), {}),
     ["EXIF orientation 6 applied (rotated 90 degrees clockwise), so it is read as 36x40"],
     _same(np.rot90(RGB, k=-1))),
    ("exif-orientation-3", lambda t: (_exif_png(t / "turned.png", RGB, 3), {}),
     ["EXIF orientation 3 applied (rotated 180 degrees)"], _same(RGB[::-1, ::-1])),
    ("48-bit-rgb-png", lambda t: (_48_bit_png(t), {}), ["16 bits per colour channel read as 8 bits"], _same(RGB)),
    ("plain-rgb", lambda t: (_rgb_png(t), {}), [], _same(RGB)),
    ("plain-grey", lambda t: (_save(t / "g.png", Image.fromarray(GREY)), {}), [], _same(_grey3(GREY))),
    ("exactly-32x32", lambda t: (_save(t / "sq.png", Image.fromarray(RGB[:32, :32])), {}), [], _same(RGB[:32, :32])),
    ("exif-orientation-1", lambda t: (_exif_png(t / "upright.png", RGB, 1), {}), [], _same(RGB)),
]


@pytest.mark.parametrize("build, phrases, check", [pytest.param(b, p, c, id=i) for i, b, p, c in CONVERSIONS])
def test_every_conversion_is_said_once(tmp_path, build, phrases, check):
    path, options = build(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(path, **options)
        load_image(path, **options)  # the same file again: nothing new to say
    assert image.mode == "RGB"
    said = _said(caught)
    others = [str(w.message) for w in caught if not issubclass(w.category, DataNotice)]
    assert not others, others  # e.g. no Pillow warning about palette transparency
    assert len(said) == len(phrases), said
    for phrase in phrases:
        assert sum(phrase in text for text in said) == 1, (phrase, said)
    assert all(str(path) in text for text in said), said
    if check is not None:
        result = check(image)
        assert result is None or result


def test_module_wide_range_setting(tmp_path, monkeypatch):
    path = _save(tmp_path / "d.png", Image.fromarray(GREY.astype(np.uint16) + 5000))
    monkeypatch.setattr(images_module, "WIDE_RANGE", "stretch")
    with pytest.warns(DataNotice, match="stretched"):
        assert np.asarray(load_image(path)).max() == 255
    with pytest.warns(DataNotice, match="fixed range"):
        assert np.asarray(load_image(path, wide_range="fixed")).max() < 40


def test_mask_follows_its_exif_orientation_like_the_image(tmp_path):
    truth = np.zeros((36, 40), bool)
    truth[5:12, 20:35] = True
    image_path = _exif_png(tmp_path / "part.png", RGB, 6)
    mask_path = _exif_png(tmp_path / "part_mask.png", truth.astype(np.uint8) * 255, 6)
    with pytest.warns(DataNotice) as caught:
        image = load_image(image_path)
        mask = load_mask(mask_path, image.size)
    assert image.size == (36, 40) and mask.shape == (40, 36)
    assert np.array_equal(mask, np.rot90(truth, k=-1))
    said = _said(caught)
    assert len(said) == 2 and all("EXIF orientation 6" in text for text in said)
    assert any("Mask" in text and "part_mask.png" in text for text in said)
    # In a data set, image and mask reach the model aligned.
    item = AnomalyDataset([Sample(image_path, 1, mask_path, "scratch")], image_size=(40, 36))[0]
    assert torch.equal(item["mask"][0].bool(), torch.from_numpy(np.rot90(truth, k=-1).copy()))
