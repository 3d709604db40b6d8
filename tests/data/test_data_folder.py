"""folder_split on a user's own folders, and the test-set notes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from defectscope.data import DataError, DataSplit, Sample, check_test_classes, folder_split, summarise


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
