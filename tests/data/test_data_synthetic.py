"""The synthetic MVTec-layout generator: layout, determinism, exact masks, visible defects."""

from __future__ import annotations

import hashlib

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


# --- Opt-in surfaces and defect kinds (grass / gravel; crack / patch / smudge) -----------------


# sha256 over (relative path, bytes) of every file, sorted by path, written by the generator
# BEFORE the opt-in surfaces and defect kinds were added (git HEAD of 2026-11-30, computed with
# _tree_digest below on `make_synthetic_mvtec(tmp, name, image_size=48, n_train=2,
# n_test_good=2, n_test_defect=6, seed=11)` and, for "default", `make_synthetic_mvtec(tmp,
# "synthetic")`). The defaults must keep reproducing these bytes.
_DEFAULT_DIGESTS = {
    "fabric": "671407ae5257b806defec3a90232aa8285a50dc4f5dbc23c5a8c3866f2b3503f",
    "wood": "b8439d59e2ceb262d7631ab370bd37060447f7ca290b2e965be7b617604a8c88",
    "stone": "682e6d0fd8e7030fe1dae1a2dffb4815dcc078acafd4b28d0481cd77554fa5ca",
    "synthetic": "069d6687890b6b609274c34af0c75619d39f5e70067a265e42cdbe4a37ab224b",
    "default": "b4c97cfe2c998b4820c696107f49d779bc3b1734145a1ac2c3e473b1a3d7c811",
}


def _tree_digest(base):
    h = hashlib.sha256()
    for p in sorted(base.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(base).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("explicit", [False, True])
def test_default_output_is_unchanged(tmp_path, explicit):
    extra = {"textures": synth.TEXTURES, "defect_kinds": synth.DEFECT_TYPES} if explicit else {}
    for name in ("fabric", "wood", "stone", "synthetic"):
        base = make_synthetic_mvtec(
            tmp_path, name, image_size=48, n_train=2, n_test_good=2, n_test_defect=6, seed=11, **extra
        )
        assert _tree_digest(base) == _DEFAULT_DIGESTS[name], name
    if not explicit:
        assert _tree_digest(make_synthetic_mvtec(tmp_path, "synthetic")) == _DEFAULT_DIGESTS["default"]


def _clean_surface(texture, category, seed, index, size):
    rng = synth._image_rng(seed, category, "test_defect", index)
    return synth._to_uint8(synth._TEXTURE_MAKERS[texture](rng, size)).astype(np.int16)


def _skeleton_length(skeleton):
    """Length of an 8-connected skeleton: each neighbouring pair once, diagonal pairs sqrt(2)."""
    s = skeleton.astype(np.int64)
    straight = (s[:, :-1] * s[:, 1:]).sum() + (s[:-1] * s[1:]).sum()
    diagonal = (s[:-1, :-1] * s[1:, 1:]).sum() + (s[:-1, 1:] * s[1:, :-1]).sum()
    return straight + np.sqrt(2) * diagonal


def _crack_width(mask):
    """Mean stroke width: area = width * length, the skeleton being about one width shorter than
    the stroke (half a width lost at each end): solve w**2 + L_skel * w - area = 0."""
    from skimage.morphology import skeletonize

    length = _skeleton_length(skeletonize(mask))
    return (-length + np.sqrt(length**2 + 4 * mask.sum())) / 2


def _extra_set(tmp_path, texture, kind, n=4, size=64, seed=2):
    base = make_synthetic_mvtec(
        tmp_path, texture, image_size=size, n_train=1, n_test_good=0, n_test_defect=n, seed=seed,
        textures=synth.ALL_TEXTURES, defect_kinds=(kind,),
    )
    for index in range(n):
        image = np.asarray(Image.open(base / "test" / kind / f"{index:03d}.png")).astype(np.int16)
        mask = np.asarray(Image.open(base / "ground_truth" / kind / f"{index:03d}_mask.png")) > 0
        yield image, mask, _clean_surface(texture, texture, seed, index, size)


@pytest.mark.parametrize("texture", synth.ALL_TEXTURES)
def test_cracks_are_thin_strokes_and_the_mask_is_the_stroke(tmp_path, texture):
    for image, mask, clean in _extra_set(tmp_path, texture, "crack"):
        changed = (image != clean).any(axis=2)
        assert mask.any() and np.array_equal(mask, changed)
        assert np.abs(image - clean).max(axis=2)[mask].min() >= synth._MIN_CHANGE
        width = _crack_width(mask)
        assert 2.0 <= width <= 4.0, f"crack {width:.2f} px wide"
        assert mask.mean() < 0.1


@pytest.mark.parametrize("texture", synth.ALL_TEXTURES)
def test_patches_are_foreign_texture_in_the_region_only(tmp_path, texture):
    for image, mask, clean in _extra_set(tmp_path, texture, "patch"):
        assert mask.any() and mask.mean() < 0.3
        changed = (image != clean).any(axis=2)
        assert not changed[~mask].any(), "pixels outside the patch changed"
        assert changed[mask].mean() > 0.8, "the patch is mostly the good surface"
        diff = np.abs(image - clean).max(axis=2)[mask].mean()
        assert diff >= 4, f"patch indistinct ({diff:.1f} grey levels)"
        # Low contrast edges: the fill keeps the surface's mean colour.
        shift = np.abs(image[mask].mean(axis=0) - clean[mask].mean(axis=0)).max()
        assert shift <= 10, f"patch shifts the mean colour by {shift:.1f} grey levels"


@pytest.mark.parametrize("texture", synth.ALL_TEXTURES)
def test_smudges_are_soft_low_contrast_and_masked_at_half_their_peak(tmp_path, texture):
    low, high = 0.03, 0.07  # "a few %": the stated peak intensity change, as a fraction
    frac = synth.SMUDGE_MASK_FRACTION
    assert frac == 0.5
    for image, mask, clean in _extra_set(tmp_path, texture, "smudge"):
        assert mask.any() and mask.mean() < 0.3
        diff = np.abs(image - clean)
        assert diff.max() <= 19, "smudge is not low contrast"  # 0.07 * 255 + rounding
        changed = diff.max(axis=2) > 0
        # Soft edge but finite support: changes stay near the mask, none far away.
        assert not (changed & ~ndimage.binary_dilation(mask, iterations=8)).any()
        # The relative change (all channels) is at least `frac` of its peak inside the mask and at
        # most that outside, up to the 8-bit rounding of a pixel (1.5 levels over its sum).
        total = clean.sum(axis=2).astype(np.float64)
        rel = np.abs(image.sum(axis=2) - total) / total
        tol = 1.5 / total
        bright = total >= 240
        peak = (rel + tol)[bright].max()
        assert low - 0.01 <= peak <= high + 0.01
        inside, outside = bright & mask, bright & ~mask
        assert inside.sum() >= 8
        assert (rel[inside] >= frac * (peak - 2 * tol[inside]) - tol[inside]).all()
        assert (rel[outside] <= frac * peak + tol[outside]).all()


@pytest.mark.parametrize("texture", synth.NATURAL_TEXTURES)
def test_natural_surfaces_vary_and_small_training_sets(tmp_path, texture):
    base = make_synthetic_mvtec(
        tmp_path, "field", image_size=64, n_train=40, n_test_good=2, n_test_defect=6, seed=4,
        textures=(texture,), defect_kinds=synth.ALL_DEFECT_TYPES,
    )
    images = [np.asarray(Image.open(p)).astype(float) for p in sorted((base / "train" / "good").glob("*.png"))]
    assert len(images) == 40
    assert all(np.abs(a - images[0]).mean() > 5.0 for a in images[1:])  # stochastic, no repeats
    means = np.array([a.mean(axis=(0, 1)) for a in images])
    assert means.std(axis=0).max() < 20  # one surface
    # Stochastic fine structure: large pixel-to-pixel variation (thin strokes / stone edges).
    assert np.mean([np.abs(np.diff(a, axis=1)).mean() for a in images]) > 8
    split = mvtec_split(base.parent, base.name)
    assert len(split.train) == 40 and len(split.test) == 8
    assert '"defect_kinds"' in (base / synth._MARKER).read_text()


def test_extra_kinds_are_reproducible_and_validated(tmp_path):
    args = {
        "category": "g", "image_size": 48, "n_train": 2, "n_test_good": 1, "n_test_defect": 6, "seed": 9,
        "textures": synth.NATURAL_TEXTURES, "defect_kinds": synth.EXTRA_DEFECT_TYPES,
    }
    first = _files(make_synthetic_mvtec(tmp_path / "a", **args))
    assert first == _files(make_synthetic_mvtec(tmp_path / "b", **args))
    other = _files(make_synthetic_mvtec(tmp_path / "c", **{**args, "seed": 10}))
    assert all(other[k] != first[k] for k in first if k.endswith(".png") and "ground_truth" not in k)
    assert {k.split("/")[1] for k in first if k.startswith("test/")} == {"good", *synth.EXTRA_DEFECT_TYPES}
    for bad in ({"textures": ("moss",)}, {"textures": ()}, {"defect_kinds": ("dent",)},
                {"defect_kinds": ("crack", "crack")}):
        with pytest.raises(DataError):
            make_synthetic_mvtec(tmp_path / "d", "x", **bad)
