"""Image and mask reading: every colour mode, and every bad file reported by name."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from defectscope.data import (
    IMAGE_EXTENSIONS,
    AnomalyDataset,
    DataError,
    Sample,
    list_images,
    load_image,
    load_mask,
)
from defectscope.data.images import DataNotice

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def _rgb_png(path, array=RGB):
    Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------- list_images


def test_list_images_sorted_case_insensitive_ignoring_hidden_and_others(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.TiFf", "d.bmp", "e.jpeg", "f.tif", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.TiFf", "d.bmp", "e.jpeg", "f.tif"]
    assert set(IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(DataError) as info:
        list_images(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value) and "not found" in str(info.value)


def test_list_images_not_a_folder(tmp_path):
    file = _rgb_png(tmp_path / "one.png")
    with pytest.raises(DataError, match="is a file"):
        list_images(file)


def test_list_images_empty_folder_says_which_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / ".DS_Store").write_text("")
    with pytest.raises(DataError) as info:
        list_images(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "readme.txt" in message
    assert all(ext in message for ext in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------- load_image: bad files


def test_text_file_renamed_png(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    with pytest.raises(DataError) as info:
        load_image(fake)
    assert str(fake) in str(info.value) and "not an image" in str(info.value)


def test_truncated_png(tmp_path):
    whole = _rgb_png(tmp_path / "whole.png", RNG.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError) as info:
        load_image(cut)
    assert str(cut) in str(info.value) and "truncated" in str(info.value)


def test_missing_image_file(tmp_path):
    with pytest.raises(DataError, match="gone.png"):
        load_image(tmp_path / "gone.png")


# ---------------------------------------------------------------- load_image: colour modes


def _check_rgb8(image, size):
    assert image.mode == "RGB" and image.size == size
    return np.asarray(image)


def test_rgb_roundtrip(tmp_path):
    assert np.array_equal(_check_rgb8(load_image(_rgb_png(tmp_path / "c.png")), (30, 20)), RGB)


def test_grey_image(tmp_path):
    grey = RGB[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    out = _check_rgb8(load_image(tmp_path / "g.png"), (30, 20))
    assert all(np.array_equal(out[..., c], grey) for c in range(3))


def test_rgba_drops_alpha(tmp_path):
    alpha = np.zeros((20, 30, 1), dtype=np.uint8)  # fully transparent: compositing would give black
    Image.fromarray(np.concatenate([RGB, alpha], axis=2), "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(_check_rgb8(load_image(tmp_path / "a.png"), (30, 20)), RGB)


def test_grey_with_alpha(tmp_path):
    Image.fromarray(np.stack([RGB[..., 1], RGB[..., 2]], axis=2), "LA").save(tmp_path / "la.png")
    out = _check_rgb8(load_image(tmp_path / "la.png"), (30, 20))
    assert np.array_equal(out[..., 0], RGB[..., 1])


def test_palette_image(tmp_path):
    palette_image = Image.fromarray(RGB).quantize(colors=16)
    palette_image.info["transparency"] = 0
    palette_image.save(tmp_path / "p.png", transparency=0)
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _check_rgb8(load_image(tmp_path / "p.png"), (30, 20))
    # No Pillow warning about palette transparency: only our own notices (palette, tiny image).
    assert caught and all(issubclass(w.category, DataNotice) for w in caught), [str(w.message) for w in caught]
    assert np.array_equal(out, np.asarray(palette_image.convert("RGB")))
    assert np.abs(out.astype(int) - RGB).mean() < 40  # 16 colours still resemble the original


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_fixed_range_by_default_stretch_on_request(tmp_path, suffix):
    values = np.linspace(1000, 3000, 20 * 30).reshape(20, 30).astype(np.uint16)
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    with pytest.warns(DataNotice, match="fixed range 0..65535"):
        out = _check_rgb8(load_image(path), (30, 20))
    # Fixed: 0..65535 -> 0..255 for every image, so a dark image stays dark (here 4..12).
    assert np.array_equal(out[..., 0], np.rint(values / 257.0).astype(np.uint8))
    with pytest.warns(DataNotice, match="stretched from their own range 1000..3000"):
        out = _check_rgb8(load_image(path, wide_range="stretch"), (30, 20))
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)  # order of grey levels kept
    expected = np.rint((values.astype(float) - 1000) / 2000 * 255)
    assert np.abs(out[..., 0] - expected).max() <= 1


def test_32_bit_and_float_grey_stretched(tmp_path):
    values = np.arange(600, dtype=np.int32).reshape(20, 30) * 1000
    Image.fromarray(values, "I").save(tmp_path / "i.tif")
    out = _check_rgb8(load_image(tmp_path / "i.tif", wide_range="stretch"), (30, 20))
    assert out.min() == 0 and out.max() == 255
    Image.fromarray(values.astype(np.float32) / 7.0, "F").save(tmp_path / "f.tif")
    assert np.array_equal(_check_rgb8(load_image(tmp_path / "f.tif", wide_range="stretch"), (30, 20)), out)
    with pytest.raises(DataError, match="outside the 16-bit range"):  # fixed: refused, not guessed
        load_image(tmp_path / "i.tif")
    with pytest.raises(DataError, match="ambiguous"):
        load_image(tmp_path / "f.tif")


def test_cmyk_jpeg_and_bmp(tmp_path):
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "k.jpg", quality=95)
    out = _check_rgb8(load_image(tmp_path / "k.jpg"), (30, 20))
    assert np.abs(out.astype(int) - RGB).mean() < 40
    Image.fromarray(RGB).save(tmp_path / "b.bmp")
    assert np.array_equal(_check_rgb8(load_image(tmp_path / "b.bmp"), (30, 20)), RGB)


def test_one_bit_image(tmp_path):
    Image.fromarray(RGB[..., 0] > 127).save(tmp_path / "bits.png")
    out = _check_rgb8(load_image(tmp_path / "bits.png"), (30, 20))
    assert set(np.unique(out).tolist()) == {0, 255}


# ---------------------------------------------------------------- load_mask


def _mask(path, array, mode="L"):
    Image.fromarray(array, mode).save(path)
    return path


def test_binary_masks(tmp_path):
    truth = np.zeros((20, 30), dtype=bool)
    truth[5:9, 10:20] = True
    for name, array in (("a.png", truth.astype(np.uint8) * 255), ("b.png", truth.astype(np.uint8))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mask = load_mask(_mask(tmp_path / name, array), (30, 20))
        assert mask.dtype == bool and mask.shape == (20, 30) and np.array_equal(mask, truth)
    Image.fromarray(truth).save(tmp_path / "c.png")
    assert np.array_equal(load_mask(tmp_path / "c.png", (30, 20)), truth)
    assert not load_mask(_mask(tmp_path / "z.png", np.zeros((20, 30), np.uint8)), (30, 20)).any()


def test_mask_of_another_size(tmp_path):
    path = _mask(tmp_path / "m_mask.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError) as info:
        load_mask(path, (30, 20))
    message = str(info.value)
    assert str(path) in message and "12x10" in message and "30x20" in message and "Fix" in message


def test_grey_level_mask_is_thresholded_with_a_warning(tmp_path):
    truth = np.zeros((40, 40), dtype=bool)
    truth[10:30, 12:25] = True
    path = tmp_path / "soft_mask.jpg"
    Image.fromarray(truth.astype(np.uint8) * 255).save(path, quality=70)
    with pytest.warns(UserWarning, match="soft_mask.jpg"):
        mask = load_mask(path, (40, 40))
    assert (mask != truth).mean() < 0.02


def test_bad_mask_file_is_named(tmp_path):
    fake = tmp_path / "fake_mask.png"
    fake.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="fake_mask.png"):
        load_mask(fake, (4, 4))


# ---------------------------------------------------------------- validate


def test_validate_lists_every_bad_file(tmp_path):
    good = _rgb_png(tmp_path / "good.png")
    text = tmp_path / "text.png"
    text.write_text("nope")
    cut = tmp_path / "cut.png"
    cut.write_bytes(
        _rgb_png(tmp_path / "big.png", RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).read_bytes()[:300]
    )
    small_mask = _mask(tmp_path / "good_mask.png", np.zeros((5, 5), np.uint8))
    samples = [
        Sample(good, 0),
        Sample(text, 0),
        Sample(cut, 1),
        Sample(good, 1, small_mask, "crack"),
        Sample(tmp_path / "missing.png", 0),
    ]
    dataset = AnomalyDataset(samples, image_size=16)
    with pytest.raises(DataError) as info:
        dataset.validate()
    message = str(info.value)
    assert message.startswith("4 of 5 samples")
    for name in ("text.png", "cut.png", "good_mask.png", "missing.png"):
        assert name in message
    with pytest.raises(DataError, match="text.png"):
        dataset[1]


def test_validate_caps_the_list(tmp_path):
    samples = []
    for i in range(25):
        (tmp_path / f"bad{i:02d}.png").write_text("x")
        samples.append(Sample(tmp_path / f"bad{i:02d}.png", 0))
    with pytest.raises(DataError) as info:
        AnomalyDataset(samples).validate()
    message = str(info.value)
    assert "bad19.png" in message and "bad20.png" not in message and "and 5 more" in message


def test_sample_and_dataset_arguments(tmp_path):
    sample = Sample(str(tmp_path / "x.png"), 1, str(tmp_path / "x_mask.png"), "crack")
    assert sample.path == tmp_path / "x.png" and sample.mask_path == tmp_path / "x_mask.png"
    with pytest.raises(DataError, match="label"):
        Sample(tmp_path / "x.png", 2)
    with pytest.raises(DataError, match="no samples"):
        AnomalyDataset([])
    with pytest.raises(DataError, match="image_size"):
        AnomalyDataset([sample], image_size=0)
