"""The synthetic MVTec-layout generator: layout, determinism, exact masks, visible defects."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from defectscope.data import DataError, make_synthetic_mvtec, mvtec_split
from defectscope.data import synthetic as synth


def _files(base):
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def _clean_texture(category, seed, index, size):
    """Re-create the clean texture a defect image was painted on (same per-image stream)."""
    rng = synth._image_rng(seed, category, "test_defect", index)
    texture = category if category in synth.TEXTURES else None
    assert texture is not None
    return synth._to_uint8(synth._TEXTURE_MAKERS[texture](rng, size))


def test_layout_and_counts(tmp_path):
    base = make_synthetic_mvtec(tmp_path, "stone", image_size=48, n_train=5, n_test_good=2, n_test_defect=7)
    assert base == tmp_path / "stone"
    assert len(list((base / "train" / "good").glob("*.png"))) == 5
    assert len(list((base / "test" / "good").glob("*.png"))) == 2
    counts = {t: len(list((base / "test" / t).glob("*.png"))) for t in synth.DEFECT_TYPES}
    assert counts == {"scratch": 3, "stain": 2, "hole": 2}
    for kind in synth.DEFECT_TYPES:
        for image in (base / "test" / kind).glob("*.png"):
            mask = Image.open(base / "ground_truth" / kind / f"{image.stem}_mask.png")
            assert mask.mode == "L" and mask.size == (48, 48)
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
            with Image.open(image) as im:
                assert im.mode == "RGB" and im.size == (48, 48)


def test_same_seed_gives_byte_identical_files(tmp_path):
    args = dict(category="fabric", image_size=48, n_train=3, n_test_good=2, n_test_defect=4, seed=7)
    first = _files(make_synthetic_mvtec(tmp_path / "a", **args))
    second = _files(make_synthetic_mvtec(tmp_path / "b", **args))
    assert first.keys() == second.keys() and first == second
    other = _files(make_synthetic_mvtec(tmp_path / "c", **{**args, "seed": 8}))
    assert other.keys() == first.keys()
    assert all(other[k] != first[k] for k in first if k.endswith(".png") and "/good/" in k)


def test_rewriting_own_folder_is_allowed_but_foreign_folder_is_kept(tmp_path):
    base = make_synthetic_mvtec(tmp_path, "wood", image_size=32, n_train=4, n_test_good=1, n_test_defect=3)
    before = _files(base)
    (base / "train" / "good" / "stale.png").write_bytes(b"old")
    assert (
        _files(
            make_synthetic_mvtec(tmp_path, "wood", image_size=32, n_train=4, n_test_good=1, n_test_defect=3)
        )
        == before
    )
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine"):
        make_synthetic_mvtec(tmp_path, "mine")
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("category", synth.TEXTURES)
def test_mask_is_exactly_the_changed_pixels(tmp_path, category):
    size, seed, n = 64, 5, 9
    base = make_synthetic_mvtec(
        tmp_path, category, image_size=size, n_train=1, n_test_good=1, n_test_defect=n, seed=seed
    )
    for index in range(n):
        kind = synth.DEFECT_TYPES[index % 3]
        stem = f"{index // 3:03d}"
        image = np.asarray(Image.open(base / "test" / kind / f"{stem}.png")).astype(np.int16)
        mask = np.asarray(Image.open(base / "ground_truth" / kind / f"{stem}_mask.png")) > 0
        clean = _clean_texture(category, seed, index, size).astype(np.int16)
        changed = (image != clean).any(axis=2)
        assert np.array_equal(mask, changed), f"{kind}/{stem}: mask differs from the changed pixels"
        # At least one region, each clearly different from the surface but a small part of the image.
        _, n_regions = ndimage.label(mask)
        assert n_regions >= 1
        assert mask.mean() < 0.15
        contrast = np.abs(image - clean).max(axis=2)[mask].mean()
        assert contrast >= 12, f"{kind}/{stem}: defect too faint ({contrast:.1f} grey levels)"


def test_good_images_vary_but_share_a_texture(synthetic_set):
    images = [
        np.asarray(Image.open(p)).astype(float)
        for p in sorted((synthetic_set / "train" / "good").glob("*.png"))
    ]
    assert len(images) == 10
    assert all(np.abs(a - images[0]).mean() > 1.0 for a in images[1:])  # no duplicates
    means = np.array([a.mean(axis=(0, 1)) for a in images])
    assert means.std(axis=0).max() < 20  # same family of colours


def test_generated_set_reads_back(synthetic_set):
    split = mvtec_split(synthetic_set.parent, synthetic_set.name)
    assert not split.notes
    assert len(split.train) == 10 and len(split.test) == 13
