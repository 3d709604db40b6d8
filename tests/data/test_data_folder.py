"""folder_split on a user's own folders, and the test-set notes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from defectscope.data import (
    DataError,
    DataSplit,
    Sample,
    check_test_classes,
    folder_split,
    resolve_regime,
    summarise,
    training_regime,
)


def _write(folder, names, size=(16, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(folder / name)
    return folder


def _mask(folder, name, size=(16, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), np.uint8)
    array[2:5, 3:9] = 255
    Image.fromarray(array).save(folder / name)


@pytest.fixture
def user_folders(tmp_path):
    normal = _write(tmp_path / "good", [f"n{i:02d}.png" for i in range(10)])
    abnormal = _write(tmp_path / "bad", ["a1.png", "a2.jpg", "a3.png"])
    masks = tmp_path / "masks"
    _mask(masks, "a1_mask.png")  # <stem>_mask
    _mask(masks, "a2.png")  # plain <stem>, other extension than the image
    _mask(masks, "zz_mask.png")  # matches nothing
    return normal, abnormal, masks


def test_full_folder_layout(user_folders):
    normal, abnormal, masks = user_folders
    split = folder_split(normal, abnormal, masks, test_split_ratio=0.2, seed=0)
    assert len(split.train) == 8 and all(s.label == 0 for s in split.train)
    good = [s for s in split.test if s.label == 0]
    defects = {s.path.name: s for s in split.test if s.label == 1}
    assert len(good) == 2 and not {s.path for s in good} & {s.path for s in split.train}
    assert defects["a1.png"].mask_path == masks / "a1_mask.png"
    assert defects["a2.jpg"].mask_path == masks / "a2.png"
    assert defects["a3.png"].mask_path is None and defects["a3.png"].defect_type == "defect"
    assert any("a3.png" in n and "no mask" in n for n in split.notes)
    assert "test 5" in summarise(split)


def test_held_out_share_is_seeded(user_folders):
    normal, _, _ = user_folders

    def held(seed):
        return [s.path.name for s in folder_split(normal, seed=seed).test]

    assert held(0) == held(0)
    assert any(held(0) != held(s) for s in (1, 2, 3))
    assert len(folder_split(normal, test_split_ratio=0.5).test) == 5


def test_normal_test_dir(user_folders, tmp_path):
    normal, abnormal, _ = user_folders
    extra = _write(tmp_path / "good_test", ["t1.png", "t2.png"])
    split = folder_split(normal, abnormal, normal_test_dir=extra)
    assert len(split.train) == 10
    assert sorted(s.path.name for s in split.test if s.label == 0) == ["t1.png", "t2.png"]
    assert any("pixel AUROC" in n for n in split.notes)  # no mask_dir: image labels only
    with pytest.raises(DataError, match="same folder"):
        folder_split(normal, normal_test_dir=normal)


def test_defect_types_from_sub_folders(tmp_path):
    normal = _write(tmp_path / "ok", [f"n{i}.png" for i in range(5)])
    _write(tmp_path / "ng" / "crack", ["c1.png"])
    _write(tmp_path / "ng" / "dent", ["d1.png", "d2.png"])
    _mask(tmp_path / "gt" / "dent", "d1_mask.png")
    split = folder_split(normal, tmp_path / "ng", tmp_path / "gt")
    defects = {s.path.name: s for s in split.test if s.label == 1}
    assert defects["c1.png"].defect_type == "crack" and defects["d2.png"].defect_type == "dent"
    assert defects["d1.png"].mask_path == tmp_path / "gt" / "dent" / "d1_mask.png"


def test_bad_folder_arguments(user_folders, tmp_path):
    normal, abnormal, _ = user_folders
    with pytest.raises(DataError, match="nowhere"):
        folder_split(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        folder_split(normal, tmp_path / "empty")
    with pytest.raises(DataError, match="no_masks"):
        folder_split(normal, abnormal, tmp_path / "no_masks")
    with pytest.raises(DataError, match="test_split_ratio"):
        folder_split(normal, test_split_ratio=1.0)


def test_only_normal_images_gives_a_note(user_folders):
    normal, _, _ = user_folders
    split = folder_split(normal)
    note = next(n for n in split.notes if "only good" in n)
    assert "image AUROC" in note and "F1" in note and "pixel AUROC" in note and "AUPRO" in note


def test_check_test_classes_cases(tmp_path):
    good, bad = Sample(tmp_path / "g.png", 0), Sample(tmp_path / "b.png", 1, tmp_path / "b_mask.png", "x")
    assert check_test_classes(DataSplit("s", [good], [good, bad])) == []
    (only_defects,) = check_test_classes(DataSplit("s", [good], [bad]))
    assert "only defect" in only_defects and "image AUROC cannot be computed" in only_defects
    (empty,) = check_test_classes(DataSplit("s", [good], []))
    assert "empty" in empty
    (no_masks,) = check_test_classes(DataSplit("s", [good], [good, Sample(tmp_path / "c.png", 1)]))
    assert "pixel AUROC and AUPRO cannot be computed" in no_masks


def test_train_abnormal_dir_adds_labelled_defects_with_their_masks(user_folders, tmp_path):
    normal, abnormal, masks = user_folders
    train_bad = _write(tmp_path / "train_bad", ["t1.png", "t2.png"])
    _mask(masks, "t1_mask.png")
    split = folder_split(normal, abnormal, masks, train_abnormal_dir=train_bad)
    defects = {s.path.name: s for s in split.train if s.label == 1}
    assert set(defects) == {"t1.png", "t2.png"}
    assert defects["t1.png"].mask_path == masks / "t1_mask.png" and defects["t2.png"].mask_path is None
    assert training_regime(split.train) == "mixed"
    assert any("2 labelled defective training images" in n and "1 with masks" in n for n in split.notes)
    assert not {s.path for s in split.train} & {s.path for s in split.test}


def test_empty_train_abnormal_dir_means_unsupervised_with_a_note(user_folders, tmp_path):
    normal, abnormal, masks = user_folders
    empty = tmp_path / "train_bad"
    empty.mkdir()
    split = folder_split(normal, abnormal, masks, train_abnormal_dir=empty)
    assert training_regime(split.train) == "unsupervised"
    assert any("has no images" in n and "unsupervised" in n for n in split.notes)
    with pytest.raises(DataError, match="not found"):
        folder_split(normal, abnormal, masks, train_abnormal_dir=tmp_path / "missing")


def test_train_defect_fraction_moves_a_seeded_share_of_each_type(tmp_path):
    normal = _write(tmp_path / "good", [f"n{i:02d}.png" for i in range(6)])
    bad = tmp_path / "bad"
    _write(bad / "crack", [f"c{i}.png" for i in range(4)])
    _write(bad / "hole", [f"h{i}.png" for i in range(2)])
    split = folder_split(normal, bad, train_defect_fraction=0.5, seed=1)
    moved = [s for s in split.train if s.label == 1]
    assert sorted(s.defect_type for s in moved) == ["crack", "crack", "hole"]
    assert not {s.path for s in moved} & {s.path for s in split.test}
    again = folder_split(normal, bad, train_defect_fraction=0.5, seed=1)
    assert [s.path for s in again.train] == [s.path for s in split.train]
    with pytest.raises(DataError, match="train_defect_fraction"):
        folder_split(normal, bad, train_defect_fraction=1.0)


def test_resolve_regime_adjusts_requests_with_notices(user_folders, tmp_path):
    good = [Sample(tmp_path / f"g{i}.png", 0) for i in range(3)]
    with_mask = Sample(tmp_path / "d1.png", 1, tmp_path / "d1_mask.png")
    weak = Sample(tmp_path / "d2.png", 1)
    assert resolve_regime(good, "auto") == (good, "unsupervised", [])
    assert resolve_regime(good + [with_mask], "auto")[1] == "supervised"
    assert resolve_regime(good + [weak], "auto")[1] == "weakly"
    samples, regime, notes = resolve_regime(good + [with_mask, weak], "unsupervised")
    assert (samples, regime) == (good, "unsupervised") and "not used" in notes[0]
    samples, regime, notes = resolve_regime(good + [with_mask], "weakly")
    assert regime == "weakly" and samples[-1].mask_path is None and "masks of 1" in notes[0]
    samples, regime, notes = resolve_regime(good + [with_mask, weak], "supervised")
    assert regime == "mixed" and "1 of 2" in notes[0]
    assert resolve_regime(good, "supervised")[1] == "unsupervised"
    with pytest.raises(DataError, match="auto, unsupervised"):
        resolve_regime(good, "semi")
