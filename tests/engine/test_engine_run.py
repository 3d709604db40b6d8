"""Engine.fit / test / predict: the run folder, results.csv, overlays, predictions."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from _engine_helpers import CATEGORIES, EPOCHS, build_model, make_engine, read_results
from PIL import Image
from sklearn.metrics import roc_auc_score

from defectscope.data import DataError
from defectscope.engine import Engine
from defectscope.models import SuperSimpleNet

METRIC_COLUMNS = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold", "false_reject_rate", "escape_rate"]


def test_run_folder_layout(reference_run):
    run_dir = reference_run["run_dir"]
    assert run_dir.parts[-3:] == ("proj", "grp", "reference")  # <results>/<project>/<group>/<run_name>
    model_dir = run_dir / "models" / "0"
    for name in ("ckpt.pth", "params.json", "last.ckpt"):
        assert (model_dir / name).is_file() and (model_dir / name).stat().st_size > 0, name
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob("*.partial*"))
    assert not (model_dir / "params.pkl").exists()
    state = torch.load(model_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == EPOCHS


def test_tensorboard_has_one_loss_per_epoch(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference_run["run_dir"] / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(EPOCHS))
    assert all(math.isfinite(e.value) and e.value > 0 for e in losses)
    assert len(events.Scalars("train/lr")) == EPOCHS


def test_results_csv_rows_and_values(reference_run):
    run_dir = reference_run["run_dir"]
    first_only = reference_run["csv_after_first"]
    assert [r["category"] for r in first_only] == [CATEGORIES[0]]  # one category: no mean row
    rows = read_results(run_dir / "results.csv")
    assert [r["category"] for r in rows] == [*CATEGORIES, "mean"]
    for row, metrics in zip(rows, reference_run["metrics"]):
        assert row["category"] == metrics["category"]
        assert int(row["n_test"]) == metrics["n_test"] == 8
        for column in METRIC_COLUMNS:
            assert float(row[column]) == pytest.approx(metrics[column], abs=5.1e-5), column
    mean = rows[-1]
    for column in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        expected = np.mean([m[column] for m in reference_run["metrics"]])
        assert float(mean[column]) == pytest.approx(expected, abs=1e-4), column
    # Rates pooled over all images (counted by hand); no mean of per-category thresholds.
    metrics = reference_run["metrics"]
    for rate, count in (("false_reject_rate", "n_good"), ("escape_rate", "n_defect")):
        pooled = sum(m[rate] * m[count] for m in metrics) / sum(m[count] for m in metrics)
        assert float(mean[rate]) == pytest.approx(pooled, abs=1e-4), rate
    assert mean["threshold"] == "nan"


def test_retesting_a_category_replaces_its_row(reference_run, splits, tmp_path):
    import shutil

    run_dir = tmp_path / "proj" / "grp" / "copy"
    shutil.copytree(reference_run["run_dir"], run_dir)
    engine = make_engine(tmp_path, "copy")
    model = SuperSimpleNet.load_from_path(run_dir)
    engine.test(model, splits[CATEGORIES[1]].test, category=CATEGORIES[1], save_images=False)
    rows = read_results(run_dir / "results.csv")
    assert [r["category"] for r in rows] == [*CATEGORIES, "mean"]


def test_image_metrics_agree_with_predict_and_sklearn(reference_run, splits):
    """The engine's batched scoring equals model.predict on each file; AUROC equals sklearn's."""
    model = reference_run["model"]
    samples = splits[CATEGORIES[1]].test  # the model's last test
    scores = np.array([model.predict(s.path)[0] for s in samples])
    labels = np.array([s.label for s in samples])
    metrics = reference_run["metrics"][1]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    # Testing reports the saved threshold's rates and never changes it (in memory or on disk).
    assert float(model.threshold) == reference_run["first_threshold"] == metrics["threshold"]
    assert metrics["false_reject_rate"] == np.mean(scores[labels == 0] >= metrics["threshold"])
    assert metrics["escape_rate"] == np.mean(scores[labels == 1] < metrics["threshold"])
    reloaded = SuperSimpleNet.load_from_path(reference_run["run_dir"])
    assert float(reloaded.threshold) == metrics["threshold"]
    assert reloaded.threshold_info["source"] == "held-out training images"


def test_overlays_written_per_category(reference_run, splits):
    for category in CATEGORIES:
        folder = reference_run["run_dir"] / "images" / category
        files = sorted(folder.glob("*.png"))
        samples = splits[category].test
        expected = sorted(f"{s.defect_type}_{s.path.stem}.png" for s in samples)
        assert [f.name for f in files] == expected
        for sample in samples:
            with Image.open(folder / f"{sample.defect_type}_{sample.path.stem}.png") as image:
                # image | heat-map overlay (| ground truth for defects with masks), 64 px each
                panels = 3 if sample.mask_path is not None else 2
                assert image.size == (64 * panels, 64)
                assert image.mode == "RGB"


def test_predict_in_input_order_and_csv(reference_run, splits, tmp_path):
    model = reference_run["model"]
    paths = [s.path for s in splits[CATEGORIES[0]].test][::-1] + [splits[CATEGORIES[1]].test[2].path]
    engine = Engine(results_path=tmp_path, progress=False, accelerator="cpu", batch_size=3, max_epochs=1)
    out = tmp_path / "predictions"
    results = engine.predict(model, paths, output_dir=out)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    threshold = float(model.threshold)
    for result, path in zip(results, paths):
        score, _ = model.predict(path)
        assert result["score"] == pytest.approx(score, abs=1e-5)  # batched vs single: rounding only
        assert result["is_defect"] == (result["score"] >= threshold)
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == [str(p) for p in paths]
    for row, result in zip(rows, results):
        assert float(row["score"]) == pytest.approx(result["score"], rel=1e-6)
        assert row["verdict"] == ("defect" if result["is_defect"] else "good")
    assert len(list((out / "images").glob("*.png"))) == len(paths)
    with pytest.raises(DataError):
        engine.predict(model, [])


def test_supervised_training_sees_the_ground_truth_masks(splits, tmp_path):
    train = list(splits[CATEGORIES[0]].train)
    defects = [s for s in splits[CATEGORIES[0]].test if s.label == 1 and s.mask_path is not None][:2]
    assert len(defects) == 2
    model = build_model(supervised=True)
    calls = []
    original = model.training_forward

    def spy(features, masks=None, labels=None, mask_known=None):
        outputs = original(features, masks, labels, mask_known)
        calls.append((masks, labels, outputs[2].detach()))
        return outputs

    model.training_forward = spy
    engine = make_engine(tmp_path, "supervised", max_epochs=1)
    engine.fit(model, train + defects)
    assert calls
    seen_defect = False
    for masks, labels, targets in calls:
        assert masks is not None and labels is not None
        b = len(labels)
        for i in range(b):
            if labels[i] == 1:
                seen_defect = True
                assert masks[i].sum() > 0  # the real defect's mask reaches the model
                real = SuperSimpleNet.downsample_mask(masks[i : i + 1], *targets.shape[-2:])[0]
                assert (targets[i] >= real).all() and (targets[i + b] >= real).all()
            else:
                assert masks[i].sum() == 0
    assert seen_defect


def test_engine_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="max_epochs"):
        Engine(results_path=tmp_path, max_epochs=0, accelerator="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        Engine(results_path=tmp_path, batch_size=0, accelerator="cpu")
    # Batch size 1 is a model's question (batch norm): refused at fit, see test_engine_model_interface.


def test_fit_skips_a_last_batch_of_one_image(splits, tmp_path):
    # 3 images with batch 2: the last batch of one image is skipped (batch norm needs two).
    train = list(splits[CATEGORIES[0]].train)[:3]
    engine = make_engine(tmp_path, "odd", batch_size=2, max_epochs=1)
    model = engine.fit(build_model(), train)
    assert (engine.run_dir / "models" / "0" / "ckpt.pth").is_file()
    assert not model.training


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_heads_train_the_same_model_as_eager(reference_run, splits, tmp_path, capsys):
    engine = make_engine(tmp_path, "compiled", compile_heads=True)
    model = engine.fit(build_model(), splits[CATEGORIES[0]].train)
    assert "torch.compile: adaptor, segdec" in capsys.readouterr().out
    assert model.segdec._compiled_call_impl is not None and model.feature_extractor._compiled_call_impl is None
    compiled, eager, initial = model.trained_state_dict(), reference_run["state"], build_model().trained_state_dict()
    assert compiled.keys() == eager.keys()  # compiled in place: checkpoint names unchanged
    for key, value in eager.items():
        # Biases that only shift what a batch norm right after them removes again (the adaptor's,
        # the first conv of each head): their gradient is zero up to round-off, which Adam turns
        # into full learning-rate steps, so their values are noise on both sides.
        if key in ("adaptor.bias", "segdec.seg_head.0.bias", "segdec.cls_conv.0.bias"):
            continue
        if key.startswith(("adaptor.", "segdec.")) and value.is_floating_point() and value.dim() > 0:
            # Adam moves every weight by about the learning rate whatever the gradient's size, so
            # round-off can flip the step of a weight whose gradient is near zero: compare the
            # difference with how far training moved the tensor, not elementwise.
            trained = (value - initial[key]).norm()
            if key.startswith(("segdec.cls_", "segdec.cls_conv")):
                # Unsupervised and scored by the map maximum: the classifier is not trained.
                assert trained == 0 and torch.equal(compiled[key], value), key
                continue
            assert trained > 0, key
            assert (compiled[key] - value).norm() <= 0.02 * trained, key
