"""The Python API's value ranges: one picture gives the same score and map however it is passed,
and every ambiguous input is refused with a DataError that says how to pass it.

Rules under test (defectscope/data/arrays.py): uint8 0..255; uint16 0..65535 read as 16-bit files
are; floats in [0, 1]; numpy HxW / HxWxC, tensors [C,H,W] / [B,C,H,W], C in 1, 3, 4.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.data import DataError
from defectscope.data.arrays import InputTypeError, to_batch
from defectscope.data.images import DataNotice, reset_notices

H, W = 40, 48  # not the model's 64x64, and not "tiny" (>= 32 on a side)
_y, _x = np.mgrid[0:H, 0:W]
RGB = np.stack([(_x * 5) % 256, (_y * 6) % 256, ((_x + 2 * _y) * 3) % 256], axis=-1).astype(np.uint8)
RGB[12:22, 20:30] = np.random.default_rng(3).integers(0, 256, (10, 10, 3))  # a "defect"
GREY = RGB[..., 2].copy()


@pytest.fixture(autouse=True)
def fresh_notices():
    reset_notices()
    yield
    reset_notices()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("value_ranges")
    Image.fromarray(RGB).save(folder / "rgb.png")
    Image.fromarray(RGB).save(folder / "rgb.bmp")
    Image.fromarray(RGB).save(folder / "rgb.tif")
    Image.fromarray(GREY).save(folder / "grey.png")
    Image.fromarray(GREY.astype(np.uint16) * 257).save(folder / "grey16.png")
    Image.fromarray(GREY.astype(np.uint16) * 257).save(folder / "grey16.tif")
    Image.fromarray(GREY.astype(np.float32) / 255, "F").save(folder / "greyf.tif")
    return folder


@pytest.fixture(scope="module")
def model(pretrained_ssn):
    return pretrained_ssn


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def _rgba(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array, np.full((*array.shape[:2], 1), 255, np.uint8)], axis=2)


# (id, make(files folder) -> input, phrases of the notices it must give)
RGB_FORMS = [
    ("png-path-str", lambda f: str(f / "rgb.png"), []),
    ("bmp-path", lambda f: f / "rgb.bmp", []),
    ("tiff-path", lambda f: f / "rgb.tif", []),
    ("pil-rgb", lambda f: Image.fromarray(RGB), []),
    ("pil-rgba-opaque", lambda f: Image.fromarray(_rgba(RGB)), ["alpha"]),
    ("numpy-uint8-hwc", lambda f: RGB.copy(), []),
    ("numpy-uint8-hwc-noncontiguous", lambda f: np.asfortranarray(RGB), []),
    ("numpy-uint8-hwc4-opaque-alpha", lambda f: _rgba(RGB), ["4 channels"]),
    ("numpy-float32-hwc", lambda f: RGB.astype(np.float32) / 255, []),
    ("numpy-float64-hwc", lambda f: RGB.astype(np.float64) / 255, []),
    ("numpy-uint16-hwc-x257", lambda f: RGB.astype(np.uint16) * 257, ["fixed range 0..65535"]),
    ("tensor-uint8-chw", lambda f: _tensor(RGB), []),
    ("tensor-float32-chw", lambda f: _tensor(RGB).float() / 255, []),
    ("tensor-float64-chw", lambda f: _tensor(RGB).double() / 255, []),
    ("tensor-uint8-chw4-opaque-alpha", lambda f: _tensor(_rgba(RGB)), ["4 channels"]),
    ("tensor-float-requires-grad", lambda f: (_tensor(RGB).float() / 255).requires_grad_(), []),
]

GREY_FORMS = [
    ("grey-png-path", lambda f: f / "grey.png", []),
    ("grey16-png-path-x257", lambda f: f / "grey16.png", ["fixed range 0..65535"]),
    ("grey16-tiff-path-x257", lambda f: f / "grey16.tif", ["fixed range 0..65535"]),
    ("float-tiff-path-0-1", lambda f: f / "greyf.tif", ["float values read as 0..1"]),
    ("pil-l", lambda f: Image.fromarray(GREY), []),
    ("pil-i16-x257", lambda f: Image.fromarray(GREY.astype(np.uint16) * 257), ["fixed range 0..65535"]),
    ("pil-i32-x257", lambda f: Image.fromarray(GREY.astype(np.int32) * 257, "I"), ["fixed range 0..65535"]),
    ("pil-f-0-1", lambda f: Image.fromarray(GREY.astype(np.float32) / 255, "F"), ["float values read as 0..1"]),
    ("pil-la-opaque", lambda f: Image.fromarray(np.stack([GREY, np.full_like(GREY, 255)], 2), "LA"), ["alpha"]),
    ("numpy-uint8-hw", lambda f: GREY.copy(), []),
    ("numpy-uint8-hw1", lambda f: GREY[:, :, None].copy(), []),
    ("numpy-uint8-hw3", lambda f: np.repeat(GREY[:, :, None], 3, axis=2), []),
    ("numpy-uint16-hw-x257", lambda f: GREY.astype(np.uint16) * 257, ["fixed range 0..65535"]),
    ("numpy-float32-hw", lambda f: GREY.astype(np.float32) / 255, []),
    ("tensor-uint8-1hw", lambda f: torch.from_numpy(GREY)[None], []),
    ("tensor-float-hw", lambda f: torch.from_numpy(GREY).float() / 255, []),
]


def _predict(model, image):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score, anomaly_map = model.predict(image)
    said = [str(w.message) for w in caught if issubclass(w.category, DataNotice)]
    others = [str(w.message) for w in caught if not issubclass(w.category, DataNotice)]
    assert not others, others
    return float(np.asarray(score).reshape(-1)[0]), np.asarray(anomaly_map).reshape(H, W), said


@pytest.fixture(scope="module")
def references(model, files):
    reset_notices()
    rgb = _predict(model, files / "rgb.png")[:2]
    grey = _predict(model, files / "grey.png")[:2]
    assert rgb[1].std() > 0 and abs(rgb[0] - grey[0]) > 1e-4  # real maps, two different pictures
    return {"rgb": rgb, "grey": grey}


def _check_same(model, files, references, which, make, phrases):
    score, anomaly_map, said = _predict(model, make(files))
    ref_score, ref_map = references[which]
    assert score == pytest.approx(ref_score, abs=1e-5)
    np.testing.assert_allclose(anomaly_map, ref_map, atol=1e-5)
    assert len(said) == len(phrases), said
    for phrase in phrases:
        assert sum(phrase in text for text in said) == 1, (phrase, said)


@pytest.mark.parametrize("make, phrases", [pytest.param(m, p, id=i) for i, m, p in RGB_FORMS])
def test_same_rgb_picture_same_score_however_passed(model, files, references, make, phrases):
    _check_same(model, files, references, "rgb", make, phrases)


@pytest.mark.parametrize("make, phrases", [pytest.param(m, p, id=i) for i, m, p in GREY_FORMS])
def test_same_grey_picture_same_score_however_passed(model, files, references, make, phrases):
    _check_same(model, files, references, "grey", make, phrases)


def test_batch_of_one_matches_the_single_image(model, references):
    scores, maps = model.predict(_tensor(RGB)[None])
    assert scores.shape == (1,) and maps.shape == (1, H, W)
    assert scores[0] == pytest.approx(references["rgb"][0], abs=1e-5)
    np.testing.assert_allclose(maps[0], references["rgb"][1], atol=1e-5)


def test_16_bit_pil_image_file_and_uint16_array_agree_on_any_data(model, tmp_path):
    """Not only multiples of 257: a 16-bit PIL image, its file and its uint16 array are read alike."""
    values = (np.random.default_rng(5).integers(0, 65536, (H, W))).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "raw16.png")
    results = [
        _predict(model, form)[:2]
        for form in (values, Image.fromarray(values), tmp_path / "raw16.png", np.rint(values / 257).astype(np.uint8))
    ]
    for score, anomaly_map in results[1:]:
        assert score == pytest.approx(results[0][0], abs=1e-5)
        np.testing.assert_allclose(anomaly_map, results[0][1], atol=1e-5)


def test_stretch_option_applies_to_arrays_as_to_files():
    values = (GREY.astype(np.uint16) + 3000)[:, :, None]
    with pytest.warns(DataNotice, match="fixed range"):
        fixed = to_batch(values)
    with pytest.warns(DataNotice, match="stretched"):
        stretched = to_batch(values, wide_range="stretch")
    assert float(fixed.max()) < 0.1 and float(stretched.min()) == 0.0 and float(stretched.max()) == 1.0
    assert fixed.shape == stretched.shape == (1, 3, H, W)


# ---------------------------------------------------------------- notices for in-memory conversions


def _exif_image() -> Image.Image:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(RGB).save(buffer, format="PNG", exif=exif)
    buffer.seek(0)
    return Image.open(buffer)


def _animated_gif() -> Image.Image:
    buffer = io.BytesIO()
    frames = [Image.fromarray(np.full((H, W), 80 * i, np.uint8)) for i in range(3)]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    buffer.seek(0)
    return Image.open(buffer)


NOTICES = [
    ("numpy-rgba-transparent", lambda: np.concatenate([RGB, np.zeros((H, W, 1), np.uint8)], 2), ["4 channels"], (H, W)),
    ("tensor-rgba", lambda: _tensor(_rgba(RGB)).float() / 255, ["4 channels"], (H, W)),
    ("numpy-tiny-8x8", lambda: RGB[:8, :8].copy(), ["is only 8x8 pixels"], (8, 8)),
    ("tensor-tiny-1x1", lambda: torch.rand(3, 1, 1), ["is only 1x1 pixels"], (1, 1)),
    ("pil-tiny-5x40", lambda: Image.fromarray(RGB[:5]), ["is only 48x5 pixels"], (5, W)),
    ("pil-cmyk", lambda: Image.fromarray(RGB).convert("CMYK"), ["CMYK"], (H, W)),
    ("pil-palette", lambda: Image.fromarray(RGB).quantize(8), ["palette image (8 colours)"], (H, W)),
    ("pil-pa", lambda: Image.fromarray(RGB).quantize(8).convert("PA"), ["palette image (8 colours); each pixel's colour is looked up in the palette; its transparency is dropped"],
     (H, W)),
    ("pil-1-bit", lambda: Image.fromarray(GREY > 100), ["1-bit"], (H, W)),
    ("pil-exif-orientation-6", _exif_image, ["EXIF orientation 6 applied"], (W, H)),
    ("pil-animated-gif", _animated_gif, ["only the current one (frame 1 of 3)", "palette image"], (H, W)),
    ("pil-i16-offset-fixed-range", lambda: Image.fromarray(GREY.astype(np.uint16) + 9000), ["fixed range"], (H, W)),
]


@pytest.mark.parametrize("make, phrases, shape", [pytest.param(m, p, s, id=i) for i, m, p, s in NOTICES])
def test_in_memory_conversions_are_said(model, make, phrases, shape):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score, anomaly_map = model.predict(make())
    said = [str(w.message) for w in caught if issubclass(w.category, DataNotice)]
    assert len(said) == len(phrases), said
    for phrase in phrases:
        assert sum(phrase in text for text in said) == 1, (phrase, said)
    assert isinstance(score, float) and anomaly_map.shape == shape


# ---------------------------------------------------------------- refused inputs

FLOAT_FIX = "float arrays must be in [0, 1]; for 0..255 data pass uint8 or divide by 255"
INT_FIX = "convert it to uint8 (0..255) or"

# (id, make() -> input, key phrases of the DataError)
REFUSED = [
    ("numpy-float-0-255", lambda: RGB.astype(np.float32), [FLOAT_FIX, "0..255"]),
    ("numpy-float-slightly-over-1", lambda: _set(RGB.astype(np.float64) / 255, 1.5), [FLOAT_FIX]),
    ("numpy-float-negative", lambda: RGB.astype(np.float32) / 255 - 0.5, [FLOAT_FIX]),
    ("numpy-float16-0-255", lambda: RGB.astype(np.float16), [FLOAT_FIX]),
    ("tensor-float-0-255", lambda: _tensor(RGB).float(), [FLOAT_FIX]),
    ("tensor-imagenet-normalised", lambda: (_tensor(RGB).float() / 255 - 0.45) / 0.225, [FLOAT_FIX, "undo the normalisation"]),
    ("tensor-bfloat16-0-255", lambda: _tensor(RGB).to(torch.bfloat16), [FLOAT_FIX]),
    ("numpy-float-nan", lambda: _set(RGB.astype(np.float32) / 255, np.nan), ["1 NaN", "nan_to_num"]),
    ("numpy-float-inf", lambda: _set(RGB.astype(np.float32) / 255, np.inf), ["1 infinite"]),
    ("tensor-float-nan", lambda: _tensor(_set(RGB.astype(np.float32) / 255, np.nan)), ["1 NaN"]),
    ("tensor-all-nan", lambda: torch.full((3, H, W), float("nan")), ["NaN"]),
    ("numpy-bool", lambda: GREY > 100, ["bool array", "astype(np.uint8) * 255"]),
    ("tensor-bool", lambda: torch.from_numpy(GREY > 100)[None], ["bool tensor"]),
    ("numpy-int64", lambda: RGB.astype(np.int64), [INT_FIX, "int64"]),
    ("numpy-int32", lambda: RGB.astype(np.int32), [INT_FIX]),
    ("numpy-int16", lambda: RGB.astype(np.int16), [INT_FIX]),
    ("numpy-int8", lambda: (RGB // 2).astype(np.int8), [INT_FIX]),
    ("numpy-uint32", lambda: RGB.astype(np.uint32), [INT_FIX]),
    ("numpy-uint64", lambda: RGB.astype(np.uint64), [INT_FIX]),
    ("tensor-int64", lambda: _tensor(RGB).long(), ["torch.int64 tensor", "convert it to uint8"]),
    ("tensor-int32", lambda: _tensor(RGB).int(), ["convert it to uint8"]),
    ("tensor-uint16", lambda: _tensor(RGB.astype(np.int32)).to(torch.uint16), ["numpy uint16"]),
    ("numpy-complex", lambda: RGB.astype(np.complex64), ["not a picture"]),
    ("numpy-object", lambda: RGB.astype(object), ["not a picture"]),
    ("tensor-complex", lambda: _tensor(RGB).to(torch.complex64), ["not a picture"]),
    ("numpy-chw-3", lambda: _tensor(RGB).numpy(), ["looks channels-first", "np.transpose(array, (1, 2, 0))"]),
    ("numpy-chw-1", lambda: GREY[None].copy(), ["looks channels-first"]),
    ("numpy-chw-4-float", lambda: _tensor(_rgba(RGB)).numpy() / 255.0, ["looks channels-first"]),
    ("tensor-hwc-3", lambda: torch.from_numpy(RGB), ["looks channels-last", "tensor.permute(2, 0, 1)"]),
    ("tensor-bhwc", lambda: torch.from_numpy(RGB)[None], ["looks channels-last", "tensor.permute(0, 3, 1, 2)"]),
    ("numpy-2-channels", lambda: RGB[:, :, :2].copy(), ["2 channels", "1, 3 or 4"]),
    ("numpy-5-channels", lambda: np.concatenate([RGB, RGB[:, :, :2]], 2), ["5 channels"]),
    ("tensor-5-channels", lambda: torch.zeros(2, 5, H, W), ["5 channels"]),
    ("numpy-batch-4d", lambda: RGB[None].copy(), ["a numpy array is one image", "tensor [B, C, H, W]"]),
    ("numpy-1d", lambda: GREY.ravel(), ["expected an image HxW or HxWxC"]),
    ("numpy-0d", lambda: np.array(0.5), ["expected an image HxW or HxWxC"]),
    ("tensor-1d", lambda: torch.rand(10), ["expected an image tensor"]),
    ("tensor-5d", lambda: torch.rand(1, 1, 3, H, W), ["expected an image tensor"]),
    ("numpy-0x0", lambda: np.zeros((0, 0), np.uint8), ["is empty (shape (0, 0))"]),
    ("numpy-0xN", lambda: np.zeros((0, W, 3), np.uint8), ["is empty"]),
    ("tensor-3x0x5", lambda: torch.zeros(3, 0, 5), ["is empty"]),
    ("tensor-empty-batch", lambda: torch.zeros(0, 3, H, W), ["is empty"]),
    ("pil-0x0", lambda: Image.new("RGB", (0, 0)), ["is empty"]),
    ("pil-i32-over-65535", lambda: Image.fromarray(GREY.astype(np.int32) * 1000, "I"), ["outside the 16-bit range"]),
    ("pil-f-nan", lambda: Image.fromarray(_set(GREY.astype(np.float32) / 255, np.nan), "F"), ["NaN"]),
    ("pil-f-0-255", lambda: Image.fromarray(GREY.astype(np.float32), "F"), ["ambiguous"]),
]


def _set(array: np.ndarray, value: float) -> np.ndarray:
    array = array.copy()
    array.flat[7] = value
    return array


@pytest.mark.parametrize("make, phrases", [pytest.param(m, p, id=i) for i, m, p in REFUSED])
def test_ambiguous_input_is_refused_with_the_fix(model, make, phrases):
    image = make()
    with pytest.raises(DataError) as info:
        model.predict(image)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in: {message}"
    assert "Fix" in message, message


@pytest.mark.parametrize(
    "image, phrase",
    [
        pytest.param([RGB], "stack them into one tensor", id="list-of-arrays"),
        pytest.param(b"\x89PNG...", "PIL.Image.open(io.BytesIO(data))", id="encoded-bytes"),
        pytest.param(None, "got NoneType", id="none"),
        pytest.param(3.5, "got float", id="number"),
    ],
)
def test_wrong_type_is_a_data_error_and_a_type_error(model, image, phrase):
    with pytest.raises(InputTypeError) as info:
        model.predict(image)
    assert isinstance(info.value, DataError) and isinstance(info.value, TypeError)
    assert "predict takes a path, PIL image, numpy array or tensor" in str(info.value)
    assert phrase in str(info.value)


@pytest.mark.parametrize(
    "make, phrase",
    [
        pytest.param(lambda t: t / "missing.png", "not found", id="path-missing"),
        pytest.param(lambda t: t, "is a folder", id="path-folder"),
        pytest.param(lambda t: (t / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(20)) and t / "clip.mp4",
                     "its extension .mp4 is not one of", id="path-video"),
        pytest.param(lambda t: (t / "empty.png").write_bytes(b"") or t / "empty.png", "is empty (0 bytes)",
                     id="path-empty"),
    ],
)
def test_bad_path_is_refused_naming_it(model, tmp_path, make, phrase):
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        model.predict(str(path))
    assert str(path) in str(info.value) and phrase in str(info.value)


def test_unknown_wide_range_is_refused():
    with pytest.raises(DataError, match="wide_range must be one of"):
        to_batch(GREY, wide_range="percentile")
