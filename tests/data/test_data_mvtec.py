"""MVTec-layout reader and AnomalyDataset on the generated synthetic set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from defectscope.data import AnomalyDataset, DataError, load_image, load_mask, mvtec_split, summarise


def test_counts_labels_and_masks(synthetic_set):
    split = mvtec_split(synthetic_set.parent, "synthetic")
    assert split.name == "synthetic"
    assert len(split.train) == 10 and all(s.label == 0 and s.defect_type == "good" for s in split.train)
    good = [s for s in split.test if s.label == 0]
    defects = [s for s in split.test if s.label == 1]
    assert len(good) == 4 and all(s.mask_path is None for s in good)
    assert sorted({s.defect_type for s in defects}) == ["hole", "scratch", "stain"]
    assert {t: sum(s.defect_type == t for s in defects) for t in ("hole", "scratch", "stain")} == {
        "hole": 3,
        "scratch": 3,
        "stain": 3,
    }
    for s in defects:
        assert s.path.parent.name == s.defect_type
        assert s.mask_path == synthetic_set / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"
    assert split.notes == []
    line = summarise(split)
    assert "\n" not in line and "train 10" in line and "test 13" in line and "masks 9/9" in line


def test_dataset_items_are_aligned_tensors(synthetic_set):
    split = mvtec_split(synthetic_set.parent, "synthetic")
    raw = AnomalyDataset(split.test, image_size=64, mean=None, std=None)  # native size: no resampling
    for index, sample in enumerate(split.test):
        item = raw[index]
        assert item["path"] == str(sample.path) and item["index"] == index
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        expected = np.asarray(load_image(sample.path)).transpose(2, 0, 1) / 255.0
        assert torch.allclose(item["image"], torch.from_numpy(expected).float(), atol=1e-6)
        assert item["mask"].shape == (1, 64, 64) and item["mask"].dtype == torch.float32
        assert (
            item["label"].dtype == torch.long
            and item["label"].ndim == 0
            and int(item["label"]) == sample.label
        )
        assert item["has_mask"].dtype == torch.bool and bool(item["has_mask"])
        if sample.label:
            mask = load_mask(sample.mask_path, (64, 64))
            assert torch.equal(item["mask"][0], torch.from_numpy(mask).float())
            assert item["mask"].sum() > 0
        else:
            assert item["mask"].sum() == 0


def test_resized_and_normalised(synthetic_set):
    split = mvtec_split(synthetic_set.parent, "synthetic")
    dataset = AnomalyDataset(split.test, image_size=(32, 48))
    item = dataset[len(dataset) - 1]
    assert item["image"].shape == (3, 32, 48) and item["mask"].shape == (1, 32, 48)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    unnormalised = item["image"] * std + mean
    assert unnormalised.min() >= -1e-5 and unnormalised.max() <= 1 + 1e-5
    # The resized mask still sits on the defect: up-sample it back and compare with the original.
    original = torch.from_numpy(load_mask(split.test[-1].mask_path, (64, 64))).float()
    back = torch.nn.functional.interpolate(item["mask"][None], size=(64, 64), mode="nearest-exact")[0, 0]
    iou = (back * original).sum() / ((back + original) > 0).sum()
    assert iou > 0.5
    assert dataset[-1]["index"] == len(dataset) - 1
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataloader_batches(synthetic_set):
    split = mvtec_split(synthetic_set.parent, "synthetic")
    batch = next(iter(DataLoader(AnomalyDataset(split.test, image_size=32), batch_size=5)))
    assert batch["image"].shape == (5, 3, 32, 32) and batch["mask"].shape == (5, 1, 32, 32)
    assert batch["label"].shape == (5,) and batch["has_mask"].dtype == torch.bool
    assert len(batch["path"]) == 5


def test_validate_passes_on_good_data(synthetic_set):
    AnomalyDataset(mvtec_split(synthetic_set.parent, "synthetic").test, image_size=32).validate()


def test_missing_mask_is_a_note_not_an_error(synthetic_copy):
    gone = synthetic_copy / "ground_truth" / "scratch" / "001_mask.png"
    gone.unlink()
    split = mvtec_split(synthetic_copy.parent, synthetic_copy.name)
    sample = next(s for s in split.test if s.defect_type == "scratch" and s.path.stem == "001")
    assert sample.label == 1 and sample.mask_path is None
    assert any("001.png" in n and "no mask" in n and "scratch" in n for n in split.notes)
    assert any("pixel AUROC" in n for n in split.notes)  # 8 of 9 defects still have masks
    dataset = AnomalyDataset(split.test, image_size=32)
    item = dataset[split.test.index(sample)]
    assert int(item["label"]) == 1 and not bool(item["has_mask"]) and item["mask"].sum() == 0
    dataset.validate()


def test_unused_mask_is_noted(synthetic_copy):
    (synthetic_copy / "test" / "hole" / "000.png").unlink()
    split = mvtec_split(synthetic_copy.parent, synthetic_copy.name)
    assert any("000_mask.png" in n and "match no image" in n for n in split.notes)


@pytest.mark.parametrize("missing", ["", "train/good", "test"])
def test_missing_folders_name_the_expected_path(synthetic_copy, missing):
    import shutil

    if missing:
        shutil.rmtree(synthetic_copy / missing)
        category = synthetic_copy.name
    else:
        category = "no_such_category"
    with pytest.raises(DataError) as info:
        mvtec_split(synthetic_copy.parent, category)
    message = str(info.value)
    expected = synthetic_copy.parent / category / missing if missing else synthetic_copy.parent / category
    assert str(expected) in message
    assert "train/good" in message and "ground_truth" in message  # the layout is spelled out


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        mvtec_split(tmp_path / "nowhere", "bottle")


def test_empty_train_folder_names_the_folder(synthetic_copy):
    for image in (synthetic_copy / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(DataError) as info:
        mvtec_split(synthetic_copy.parent, synthetic_copy.name)
    assert str(synthetic_copy / "train" / "good") in str(info.value) and ".png" in str(info.value)


def test_mask_of_another_size_is_reported_by_validate(synthetic_copy):
    mask_file = synthetic_copy / "ground_truth" / "stain" / "000_mask.png"
    Image.open(mask_file).resize((40, 30), Image.NEAREST).save(mask_file)
    split = mvtec_split(synthetic_copy.parent, synthetic_copy.name)
    with pytest.raises(DataError) as info:
        AnomalyDataset(split.test, image_size=32).validate()
    message = str(info.value)
    assert str(mask_file) in message and "40x30" in message and "64x64" in message and "Fix" in message


def test_only_good_test_images_gives_a_metrics_note(synthetic_copy):
    import shutil

    for kind in ("scratch", "stain", "hole"):
        shutil.rmtree(synthetic_copy / "test" / kind)
    split = mvtec_split(synthetic_copy.parent, synthetic_copy.name)
    assert all(s.label == 0 for s in split.test)
    note = next(n for n in split.notes if "only good" in n)
    assert "image AUROC" in note and "F1" in note and "AUPRO" in note
    assert any("Mask folders" in n for n in split.notes)


def test_train_defect_fraction_moves_defects_with_masks(synthetic_set):
    plain = mvtec_split(synthetic_set.parent, synthetic_set.name)
    split = mvtec_split(synthetic_set.parent, synthetic_set.name, train_defect_fraction=0.34, seed=0)
    moved = [s for s in split.train if s.label == 1]
    assert moved and all(s.mask_path is not None for s in moved)
    assert {s.path for s in moved} | {s.path for s in split.test} == {s.path for s in plain.test}
    assert not {s.path for s in moved} & {s.path for s in split.test}
    # Every defect type keeps test images.
    types = {s.defect_type for s in plain.test if s.label == 1}
    assert types == {s.defect_type for s in split.test if s.label == 1}
    assert any("moved to training" in n for n in split.notes)
    with pytest.raises(DataError, match="train_defect_fraction"):
        mvtec_split(synthetic_set.parent, synthetic_set.name, train_defect_fraction=-0.1)
