"""Engine: the verdict threshold comes from held-out training images, is recorded with the
model, and test reports on it without changing it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _engine_helpers import CATEGORIES, build_model, make_engine

from defectscope.data import DataError, hold_out_validation
from defectscope.models import SuperSimpleNet


def test_threshold_is_set_on_held_out_good_images_by_the_rank_rule(splits, tmp_path):
    train = splits[CATEGORIES[0]].train
    engine = make_engine(tmp_path, "val", max_epochs=1, val_fraction=0.5, max_false_reject=0.4)
    model = engine.fit(build_model(), train)
    held_out, trained_on = model.data_info["validation_images"], model.data_info["train_images"]
    assert len(held_out) == 4 and len(trained_on) == 4
    assert sorted(held_out + trained_on) == sorted(str(s.path) for s in train)
    assert model.training_info["train_size"] == 4
    # By hand: 4 held-out scores, k = ceil(5 * 0.6) = 3: between the 3rd and 4th lowest.
    scores = np.sort([model.predict(path)[0] for path in held_out])
    threshold = float(model.threshold)
    assert scores[2] < threshold <= scores[3] + 1e-6
    info = model.threshold_info
    assert info["source"] == "held-out training images" and info["rule"] == "false_reject"
    assert info["n_good"] == 4 and info["max_false_reject"] == 0.4
    assert info["expected_false_reject"] == pytest.approx(2 / 5)
    # Recorded on disk with the model.
    params = json.loads((engine.model_dir / "params.json").read_text())
    assert params["threshold"] == pytest.approx(threshold) and params["threshold_info"]["n_good"] == 4
    assert SuperSimpleNet.load_from_path(engine.run_dir).threshold_info == params["threshold_info"]


def test_the_split_depends_on_seed_and_names_not_on_order(splits):
    train = list(splits[CATEGORIES[0]].train)
    a = {s.path for s in hold_out_validation(train, 0.25, seed=0)[1]}
    assert len(a) == 2 and a == {s.path for s in hold_out_validation(train[::-1], 0.25, seed=0)[1]}
    assert a != {s.path for s in hold_out_validation(train, 0.25, seed=5)[1]}
    with pytest.raises(DataError, match="validation fraction"):
        hold_out_validation(train, 1.0)


def test_f1_rule_holds_out_labelled_defects(splits, tmp_path):
    train = list(splits[CATEGORIES[0]].train) + [s for s in splits[CATEGORIES[0]].test if s.label == 1][:4]
    engine = make_engine(tmp_path, "f1", max_epochs=1, threshold_rule="f1")
    model = engine.fit(build_model(), train)
    info = model.threshold_info
    assert info["rule"] == "f1" and info["n_defect"] == 1 and info["n_good"] == 2
    assert len(model.data_info["validation_images"]) == 3
    with pytest.raises(DataError, match="needs held-out labelled defects"):
        make_engine(tmp_path, "f1-none", max_epochs=1, threshold_rule="f1").fit(build_model(), splits[CATEGORIES[0]].train)


def test_test_reports_and_only_update_threshold_changes_the_model(reference_run, splits, tmp_path):
    import shutil

    run_dir = tmp_path / "proj" / "grp" / "copy"
    shutil.copytree(reference_run["run_dir"], run_dir)
    params_path = run_dir / "models" / "0" / "params.json"
    before = params_path.read_bytes()
    engine = make_engine(tmp_path, "copy")
    model = SuperSimpleNet.load_from_path(run_dir)
    threshold = float(model.threshold)
    test = splits[CATEGORIES[0]].test
    metrics = engine.test(model, test, category=CATEGORIES[0], save_images=False)
    assert float(model.threshold) == threshold and params_path.read_bytes() == before
    assert metrics["threshold"] == threshold
    updated = engine.test(model, test, category=CATEGORIES[0], save_images=False, update_threshold=True)
    assert float(model.threshold) != threshold
    saved = json.loads(params_path.read_text())
    assert saved["threshold"] == pytest.approx(float(model.threshold))
    assert "set by --update-threshold" in saved["threshold_info"]["source"]
    assert any("threshold updated on these test images" in note for note in updated["notes"])


def test_training_images_are_never_scored_as_test_images(reference_run, splits, tmp_path):
    model = reference_run["model"]
    engine = make_engine(tmp_path, "leak")
    test = splits[CATEGORIES[0]].test
    mixed = list(splits[CATEGORIES[0]].train) + list(test)
    metrics = engine.test(model, mixed, category="leak-check", save_images=False)
    assert metrics["n_test"] == len(test)
    assert any("8 test image(s) were used in training or to set the threshold" in n for n in metrics["notes"])
    with pytest.raises(DataError, match="All 8 test images were used to train"):
        engine.test(model, splits[CATEGORIES[0]].train, category="leak-check", save_images=False)


def test_a_test_set_without_good_images_reports_no_f1_and_no_false_rejects(reference_run, splits, tmp_path):
    import math

    defects = [s for s in splits[CATEGORIES[1]].test if s.label == 1]
    metrics = make_engine(tmp_path, "defects").test(reference_run["model"], defects, category="defects-only", save_images=False)
    assert math.isnan(metrics["image_f1_max"]) and math.isnan(metrics["false_reject_rate"])
    assert not math.isnan(metrics["escape_rate"])
    assert any("F1-max needs good test images" in n for n in metrics["notes"])
