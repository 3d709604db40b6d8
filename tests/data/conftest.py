"""Shared fixtures for the data tests: one synthetic MVTec-layout set per session."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

# Run from a plain checkout too (no `pip install -e .`): make the repository importable.
_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from defectscope.data import make_synthetic_mvtec  # noqa: E402

SYNTHETIC = dict(category="synthetic", image_size=64, n_train=10, n_test_good=4, n_test_defect=9, seed=3)


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory) -> Path:
    """A read-only synthetic set (category folder); copy it before changing anything."""
    return make_synthetic_mvtec(tmp_path_factory.mktemp("synthetic"), **SYNTHETIC)


@pytest.fixture
def synthetic_copy(synthetic_set, tmp_path) -> Path:
    """A private, writable copy of the synthetic set (category folder)."""
    target = tmp_path / "root" / synthetic_set.name
    shutil.copytree(synthetic_set, target)
    return target
