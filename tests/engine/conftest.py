"""Shared fixtures for the engine tests: a tiny two-category synthetic set and one reference run."""

from __future__ import annotations

from pathlib import Path

import pytest
from _engine_helpers import CATEGORIES, build_model, make_engine, one_thread, read_results, trained_state

from defectscope.data import make_synthetic_mvtec, mvtec_split


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Read-only MVTec-layout root with two tiny categories (64 px, 8 train, 4 + 4 test)."""
    root = tmp_path_factory.mktemp("mvtec")
    for i, category in enumerate(CATEGORIES):
        make_synthetic_mvtec(root, category=category, image_size=64, n_train=8, n_test_good=4, n_test_defect=4, seed=i)
    return root


@pytest.fixture(scope="session")
def splits(synthetic_root):
    return {category: mvtec_split(synthetic_root, category) for category in CATEGORIES}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, splits):
    """One uninterrupted run (seed 0): trained on the first category, tested on both."""
    with one_thread():
        results = tmp_path_factory.mktemp("results")
        engine = make_engine(results, "reference")
        model = engine.fit(build_model(), splits[CATEGORIES[0]].train)
        state = trained_state(model)
        first = engine.test(model, splits[CATEGORIES[0]].test, category=CATEGORIES[0])
        csv_after_first = read_results(engine.run_dir / "results.csv")
        first_threshold = float(model.threshold)
        second = engine.test(model, splits[CATEGORIES[1]].test, category=CATEGORIES[1])
    return dict(
        engine=engine, run_dir=engine.run_dir, model=model, state=state, metrics=[first, second],
        csv_after_first=csv_after_first, first_threshold=first_threshold,
    )
