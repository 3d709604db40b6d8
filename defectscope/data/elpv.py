"""The ELPV solar-cell data set, installed with ``pip install elpv-dataset``.

2,624 electroluminescence images of solar-cell crops (300x300, 8-bit grey PNG) with a defect
probability per cell (0, 1/3, 2/3 or 1) and the cell type (mono- or polycrystalline); image labels
only, no pixel masks. Data set by Buerhop-Lutz et al. (2018) and Deitsch et al. (2019), CC BY-NC-SA
4.0 (see the elpv-dataset package for the licence and citation).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .images import DataError
from .layouts import _held_out
from .samples import DataSplit, Sample, check_test_classes

__all__ = ["elpv_split"]

CELL_TYPES = ("mono", "poly")
# Probability-1 cells set aside for labelled training, whether or not a run uses them, so the
# test set is the same for 0, 5, 10, 25 or 50 labelled defects.
DEFECT_POOL = 50


def _elpv_data_folder() -> Path:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The ELPV data set is not installed (Python package 'elpv_dataset' not found); it is an "
            "optional extra (CC BY-NC-SA 4.0, non-commercial). "
            'Fix: pip install "defectscope[elpv]" (or pip install elpv-dataset), or train on other data '
            "with --data mvtec / folder / synthetic"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_labels(data: Path) -> list[tuple[Path, float, str]]:
    labels = data / "labels.csv"
    if not labels.is_file():
        raise DataError(f"ELPV label file missing: {labels}. Fix: pip install --force-reinstall elpv-dataset")
    rows = []
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            path, probability, cell_type = fields
            rows.append((data / path, float(probability), cell_type))
        except ValueError as err:
            raise DataError(
                f"{labels}, line {number}: expected 'path probability type', got {line!r}. "
                "Fix: pip install --force-reinstall elpv-dataset"
            ) from err
    return rows


def elpv_split(
    cell_type: str = "mono", seed: int = 0, test_normal_fraction: float = 0.25, train_defects: int = 0
) -> DataSplit:
    """Train/test split of one ELPV cell type for anomaly detection.

    - train: defect-free cells (probability 0) of ``cell_type``, minus a held-out share, plus
      ``train_defects`` probability-1 cells with image labels only (weak supervision);
    - test: the held-out defect-free cells (label 0) and the probability-1 cells (label 1,
      ``defect_type="defect"``, no mask) outside the labelled-defect pool;
    - cells with probability 1/3 or 2/3 are left out (uncertain labels).

    The held-out share is ``round(n_good * test_normal_fraction)`` cells drawn with
    ``numpy.random.default_rng(seed)`` from the defect-free cells in file order, so a seed always
    gives the same split. A pool of ``DEFECT_POOL`` (50) probability-1 cells, drawn with the same
    seed, never enters the test set; labelled training defects are the first ``train_defects`` of
    it (nested: the 5 are among the 10, ...). So the test set is the same for any
    ``train_defects`` up to 50; more than 50 enlarges the pool and shrinks the test set (a note
    says so). With the defaults (``test_normal_fraction=0.25``):

    ========  ===========  =====  ============================  ====  ================
    cell      prob. 0 / 1  train  test (good + defect = total)  pool  left out (⅓, ⅔)
    ========  ===========  =====  ============================  ====  ================
    mono      588 / 313    441    147 + 263 = 410               50    117 + 56 = 173
    poly      920 / 402    690    230 + 352 = 582               50    178 + 50 = 228
    ========  ===========  =====  ============================  ====  ================

    The notes say what was left out and that pixel metrics cannot be computed (no masks).
    """
    if cell_type not in CELL_TYPES:
        raise DataError(
            f"ELPV cell_type must be 'mono' or 'poly', got {cell_type!r}. Fix: pass one of those."
        )
    if not 0.0 <= float(test_normal_fraction) < 1.0:
        raise DataError(
            f"test_normal_fraction must be in [0, 1), got {test_normal_fraction!r}. Fix: pass e.g. 0.25."
        )
    if isinstance(train_defects, bool) or not isinstance(train_defects, int) or train_defects < 0:
        raise DataError(f"train_defects must be an integer >= 0, got {train_defects!r}. Fix: pass e.g. 10.")
    data = _elpv_data_folder()
    rows = [(path, p) for path, p, kind in _read_labels(data) if kind == cell_type]
    missing = [path for path, _ in rows if not path.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} ELPV images listed in {data / 'labels.csv'} are missing "
            f"(e.g. {missing[0]}). Fix: pip install --force-reinstall elpv-dataset"
        )
    good = sorted(path for path, p in rows if abs(p) < 1e-6)
    defect = sorted(path for path, p in rows if abs(p - 1.0) < 1e-6)
    uncertain = len(rows) - len(good) - len(defect)
    train_paths, held_out = _held_out(good, float(test_normal_fraction), seed, f"ELPV {cell_type} cells")
    pool_size = max(DEFECT_POOL, train_defects)
    if pool_size >= len(defect):
        raise DataError(
            f"train_defects={train_defects} leaves no ELPV {cell_type} defect cells for testing "
            f"({len(defect)} exist). Fix: use at most {len(defect) - 1}."
        )
    order = np.random.default_rng(seed).permutation(len(defect))
    pool = [defect[i] for i in order[:pool_size]]
    in_pool = set(pool)
    train_defect_paths = pool[:train_defects]
    test_defects = [path for path in defect if path not in in_pool]
    notes = [
        f"ELPV {cell_type}: {len(good)} defect-free cells ({len(train_paths)} train, "
        f"{len(held_out)} test, seed {seed}), {len(defect)} probability-1 defect cells "
        f"({len(test_defects)} test, {train_defects} train with image labels, "
        f"{pool_size - train_defects} of the labelled-defect pool unused), "
        f"{uncertain} cells with probability 1/3 or 2/3 left out."
    ]
    if pool_size > DEFECT_POOL:
        notes.append(
            f"train_defects={train_defects} is above the standard pool of {DEFECT_POOL}: the test set "
            f"has {pool_size - DEFECT_POOL} fewer defect cells than the standard split, so results are "
            "not comparable with it."
        )
    split = DataSplit(
        name=f"elpv_{cell_type}",
        train=[Sample(path, 0) for path in train_paths] + [Sample(path, 1, None, "defect") for path in train_defect_paths],
        test=[Sample(path, 0) for path in held_out] + [Sample(path, 1, None, "defect") for path in test_defects],
        notes=notes,
    )
    split.notes.extend(check_test_classes(split))
    return split
