"""``defectscope predict MODEL IMAGES``: outputs against ``model.predict``, ground truth and
metrics, skipped files, streaming, the model-first command line and exported models."""

from __future__ import annotations

import json
import re
import shutil
import weakref

import numpy as np
import pytest
import torch
from _cli_helpers import (  # noqa: F401 (fixtures)
    in_tmp_dir,
    read_csv,
    run_cli,
    save_untrained_ssn,
    single_thread,
)
from PIL import Image

from defectscope.data import list_images, make_synthetic_mvtec
from defectscope.deploy.outputs import CSV_COLUMNS, find_regions

FAST = ["--no-progress", "--accelerator", "cpu"]
PIXEL_THRESHOLD = 0.55


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved 64 px SuperSimpleNet (fitted statistics, no training: fast) with a threshold in
    the middle of its test scores and a pixel threshold, and an MVTec-style test folder."""
    from defectscope.models import load_model

    base = tmp_path_factory.mktemp("cli_predict")
    make_synthetic_mvtec(base / "data", category="tile", image_size=64, n_train=4, n_test_good=4, n_test_defect=4)
    test_dir = base / "data" / "tile" / "test"
    folder = base / "model"
    save_untrained_ssn(folder, sorted(test_dir.rglob("*.png")), PIXEL_THRESHOLD)
    return {"model_dir": folder, "model": load_model(folder), "test_dir": test_dir, "base": base}


def test_outputs_match_model_predict_and_the_report_shows_metrics(setup, tmp_path, capsys):
    model = setup["model"]
    inputs = tmp_path / "test"
    shutil.copytree(setup["test_dir"], inputs)
    broken = inputs / "good" / "000_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    code = run_cli(["predict", setup["model_dir"], inputs, "--recursive", "--output", out, "--save-masks",
                    "--save-maps", "npy", "--batch-size", 3, *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"notice: skipped .*000_broken\.png", captured.err)
    assert "1 skipped" in captured.out and "image AUROC" in captured.out
    rows = read_csv(out / "predictions.csv")
    assert list(rows[0]) == CSV_COLUMNS
    files = sorted(inputs.rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    assert [r["file"] for r in rows] == [str(p) for p in files]  # input order, the broken file included
    skipped = [r for r in rows if r["verdict"] == "skipped"]
    assert [r["file"] for r in skipped] == [str(broken)] and str(broken) in skipped[0]["reason"]
    regions = {e["file"]: e for e in json.loads((out / "regions.json").read_text())["images"]}
    threshold = float(model.threshold)
    for row in rows:
        if row["verdict"] == "skipped":
            continue
        score, amap = model.predict(row["file"])
        assert float(row["score"]) == pytest.approx(score, abs=1e-5)
        assert row["verdict"] == ("defect" if float(row["score"]) >= threshold else "good")
        assert float(row["threshold"]) == pytest.approx(threshold)
        assert row["label"] == ("0" if "/good/" in row["file"] else "1")
        saved = np.load(out / regions[row["file"]]["map"])
        np.testing.assert_allclose(saved, amap, atol=1e-5)
        expected, mask, count = find_regions(amap, PIXEL_THRESHOLD)
        assert int(row["regions"]) == count == regions[row["file"]]["n_regions"]
        if count:
            assert [int(row[k]) for k in ("x0", "y0", "x1", "y1", "area")] == [
                expected[0][k] for k in ("x0", "y0", "x1", "y1", "area")]
        mask_file = np.asarray(Image.open(out / regions[row["file"]]["mask"])) > 0
        assert (mask_file == mask).mean() > 0.999  # batched vs single-image float round-off at the edge
    assert len(list((out / "images").glob("*.png"))) == len(rows) - 1
    page = (out / "report.html").read_text()
    scored = [r for r in rows if r["verdict"] != "skipped"]
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score([int(r["label"]) for r in scored], [float(r["score"]) for r in scored])
    shown = float(re.search(r'<td class="image_auroc">([0-9.]+)</td>', page).group(1))
    assert shown == pytest.approx(auroc, abs=1e-4)
    assert "000_broken.png" in page and 'id="threshold-line"' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)


def test_labels_csv_and_the_model_path_alias(setup, tmp_path):
    good = list_images(setup["test_dir"] / "good")[:2]
    table = tmp_path / "labels.csv"
    table.write_text("file,label\n" + "".join(f"{p.name},{i}\n" for i, p in enumerate(good)))
    out = tmp_path / "out"
    assert run_cli(["predict", *good, "--model-path", setup["model_dir"], "--labels", table, "--output", out,
                    "--no-images", "--no-report", *FAST]) == 0
    rows = read_csv(out / "predictions.csv")
    assert [r["label"] for r in rows] == ["0", "1"] and not (out / "report.html").exists()
    assert not (out / "images").exists()


def test_a_first_argument_that_is_not_a_model_is_named(setup, tmp_path, capsys):
    image = list_images(setup["test_dir"] / "good")[0]
    assert run_cli(["predict", image, setup["test_dir"] / "good", "--output", tmp_path / "o", *FAST]) == 2
    err = capsys.readouterr().err
    assert "is not a model (it is an image file)" in err and "defectscope predict <model>" in err
    assert run_cli(["predict", setup["model_dir"], "--output", tmp_path / "o", *FAST]) == 2
    assert "needs the model and at least one image" in capsys.readouterr().err
    assert run_cli(["predict", setup["model_dir"], setup["test_dir"], "--output", tmp_path / "o", *FAST]) == 2
    assert "--recursive" in capsys.readouterr().err


def _owner(array: np.ndarray):
    """The object that owns an array's memory (the batch's array or tensor a map is a view of)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array if array.base is None else array.base


def test_predict_streams_one_batch_of_maps_at_a_time(setup, tmp_path):
    """When a map reaches the writer, the memory of every earlier batch's maps is gone: one
    batch of maps is alive at a time. Fails if the engine keeps the maps of the run (or of
    earlier batches)."""
    from defectscope.engine import Engine

    paths = sorted(setup["test_dir"].rglob("*.png")) * 2  # 16 images, batches of 2
    alive_counts, refs = [], []

    class Spy:
        def add(self, path, image, score, amap, seconds):
            refs.append(weakref.ref(_owner(amap)))
            alive_counts.append(len({id(ref()) for ref in refs if ref() is not None}))

        def skip(self, path, reason):
            raise AssertionError(reason)

        def flush(self):
            pass

    engine = Engine(results_path=tmp_path, batch_size=2, accelerator="cpu", progress=False, max_epochs=1)
    assert engine.predict(setup["model"], iter(paths), writer=Spy(), return_results=False) == []
    assert len(alive_counts) == len(paths)
    assert max(alive_counts) == 1, alive_counts


class NumpyInferencer:
    """An exported model's inferencer, as defectscope.deploy.inferencer gives it (here the
    torch model behind a numpy interface)."""

    def __init__(self, model):
        self.model = model
        self.model_name, self.image_size, self.roi = "supersimplenet", model.image_size, None
        self.threshold, self.pixel_threshold = float(model.threshold), model.pixel_threshold

    def preprocess(self, path):
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB").resize(self.image_size[::-1], Image.BILINEAR))

    def predict(self, batch):
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
        scores, maps = self.model.predict(x)
        return scores, maps


def test_an_exported_model_goes_through_the_inferencer(setup, tmp_path, monkeypatch):
    from defectscope import cli

    exported = tmp_path / "export"
    exported.mkdir()
    (exported / "model.onnx").write_bytes(b"onnx")
    monkeypatch.setattr(cli, "_load_inferencer", lambda path: NumpyInferencer(setup["model"]))
    out = tmp_path / "out"
    assert run_cli(["predict", exported, setup["test_dir"] / "good", "--output", out, *FAST]) == 0
    rows = read_csv(out / "predictions.csv")
    assert [r["file"] for r in rows] == [str(p) for p in list_images(setup["test_dir"] / "good")]
    for row in rows:
        assert float(row["score"]) == pytest.approx(setup["model"].predict(row["file"])[0], abs=1e-4)


def test_predict_with_a_real_export_matches_the_run_folder(setup, tmp_path):
    pytest.importorskip("defectscope.deploy.inferencer", reason="defectscope.deploy.inferencer is not written yet")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from defectscope import cli

    exported = tmp_path / "export"
    assert run_cli(["export", setup["model_dir"], "--output", exported]) == 0
    assert cli._model_kind(exported) == "exported" and cli._model_kind(setup["model_dir"]) == "run"
    good = setup["test_dir"] / "good"
    outputs = {}
    for name, model in (("onnx", exported), ("torch", setup["model_dir"])):
        assert run_cli(["predict", model, good, "--output", tmp_path / name, "--no-images", *FAST]) == 0
        outputs[name] = read_csv(tmp_path / name / "predictions.csv")
    assert [r["file"] for r in outputs["onnx"]] == [r["file"] for r in outputs["torch"]]
    for a, b in zip(outputs["onnx"], outputs["torch"]):
        assert float(a["score"]) == pytest.approx(float(b["score"]), abs=1e-4)
        assert a["verdict"] == b["verdict"] and a["regions"] == b["regions"]
