"""The packaged ELPV solar-cell split."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from defectscope.data import AnomalyDataset, DataError, elpv_split, load_image


def _labels():
    folder = Path(next(iter(importlib.util.find_spec("elpv_dataset").submodule_search_locations))) / "data"
    rows = [line.split() for line in (folder / "labels.csv").read_text().splitlines() if line.strip()]
    return {(folder / path).resolve(): (float(p), kind) for path, p, kind in rows}


def test_package_counts_match_the_spec():
    counts = Counter((kind, round(p * 3)) for p, kind in _labels().values())
    assert [counts["mono", k] for k in range(4)] == [588, 117, 56, 313]
    assert [counts["poly", k] for k in range(4)] == [920, 178, 50, 402]


@pytest.mark.parametrize(
    "cell_type, n_train, n_good_test, n_defect", [("mono", 441, 147, 263), ("poly", 690, 230, 352)]
)
def test_split_counts_and_labels(cell_type, n_train, n_good_test, n_defect):
    labels = _labels()
    split = elpv_split(cell_type)
    assert split.name == f"elpv_{cell_type}"
    good_test = [s for s in split.test if s.label == 0]
    defects = [s for s in split.test if s.label == 1]
    assert (len(split.train), len(good_test), len(defects)) == (n_train, n_good_test, n_defect)
    assert len(split.train) + len(good_test) == {"mono": 588, "poly": 920}[cell_type]
    for sample in split.train + good_test:
        assert labels[sample.path.resolve()] == (0.0, cell_type)
    for sample in defects:
        assert labels[sample.path.resolve()] == (1.0, cell_type) and sample.mask_path is None
    assert not {s.path for s in split.train} & {s.path for s in split.test}
    assert any("pixel AUROC" in n for n in split.notes)


def test_seeded_split():
    first, again, other = elpv_split("mono", seed=0), elpv_split("mono", seed=0), elpv_split("mono", seed=1)
    assert [s.path for s in first.train] == [s.path for s in again.train]
    assert [s.path for s in first.test] == [s.path for s in again.test]
    assert {s.path for s in first.test if s.label == 0} != {s.path for s in other.test if s.label == 0}
    assert len(other.train) == len(first.train)


def test_cells_load_as_rgb():
    split = elpv_split("mono")
    image = load_image(split.train[0].path)
    assert image.mode == "RGB" and image.size == (300, 300)
    item = AnomalyDataset(split.test, image_size=64)[len(split.test) - 1]
    assert item["image"].shape == (3, 64, 64) and int(item["label"]) == 1 and not bool(item["has_mask"])


def test_bad_arguments():
    with pytest.raises(DataError, match="mono"):
        elpv_split("amorphous")
    with pytest.raises(DataError, match="test_normal_fraction"):
        elpv_split("mono", test_normal_fraction=1.5)


@pytest.mark.parametrize("cell_type", ["mono", "poly"])
def test_labelled_defects_are_nested_and_the_test_set_never_changes(cell_type):
    labels = _labels()
    splits = {n: elpv_split(cell_type, train_defects=n) for n in (0, 5, 10, 25, 50)}
    test_sets = {n: [s.path for s in split.test] for n, split in splits.items()}
    assert all(paths == test_sets[0] for paths in test_sets.values())
    previous: set = set()
    for n, split in splits.items():
        defects = [s for s in split.train if s.label == 1]
        assert len(defects) == n and len(split.train) == {"mono": 441, "poly": 690}[cell_type] + n
        for sample in defects:
            assert labels[sample.path.resolve()] == (1.0, cell_type)
            assert sample.mask_path is None  # ELPV has image labels only: weak supervision
        paths = {s.path for s in defects}
        assert previous <= paths  # the 5 are among the 10, ...
        assert not paths & set(test_sets[0])
        previous = paths
    # All probability-1 cells are either tested or in the pool of 50.
    n_defects = {"mono": 313, "poly": 402}[cell_type]
    assert sum(s.label for s in splits[0].test) == n_defects - 50


def test_more_than_the_pool_shrinks_the_test_set_with_a_note():
    split = elpv_split("mono", train_defects=60)
    assert sum(s.label for s in split.train) == 60 and sum(s.label for s in split.test) == 313 - 60
    assert any("not comparable" in n for n in split.notes)
    with pytest.raises(DataError, match="at most 312"):
        elpv_split("mono", train_defects=313)
    with pytest.raises(DataError, match="train_defects"):
        elpv_split("mono", train_defects=-1)
