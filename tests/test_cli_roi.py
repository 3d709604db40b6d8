"""``defectscope train --roi MASK --roi-dir DIR``: the ROI is saved with the model, applied by
test, and its notices are printed."""

from __future__ import annotations

import json

import numpy as np
from _cli_helpers import in_tmp_dir, read_csv, run_cli, single_thread  # noqa: F401 (fixtures)
from PIL import Image

from defectscope.data.images import reset_notices

FAST = ["--no-progress", "--accelerator", "cpu"]


def test_train_with_a_roi_saves_it_and_says_the_resize_and_the_fallback(tmp_path, capsys):
    reset_notices()
    roi = np.zeros((32, 32), np.uint8)
    roi[4:28, 4:28] = 255  # another size than the 64 px images: resized, with a notice
    Image.fromarray(roi).save(tmp_path / "roi.png")
    rois = tmp_path / "rois"
    rois.mkdir()
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(rois / "no_such_image.png")
    code = run_cli(["train", "--data", "synthetic", "--data-path", tmp_path / "data", "--category", "fabric",
                    "--epochs", 1, "--image-size", 64, "--results-path", tmp_path / "results", "--run-name", "roi",
                    "--roi", tmp_path / "roi.png", "--roi-dir", rois, "--no-images", *FAST])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "roi.png is 32x32 (width x height) but the images are" in err and "resized" in err
    assert err.count("has no mask for image") == 1  # said once, for all images without one
    run_dir = tmp_path / "results" / "defectscope" / "synthetic" / "roi"
    params = json.loads((run_dir / "models" / "0" / "params.json").read_text())
    assert params["roi"]["set"] is True and params["roi"]["source"].endswith("roi.png")
    assert 0.5 < params["roi"]["coverage"] < 0.6  # 24x24 of 32x32
    assert read_csv(run_dir / "results.csv")[0]["image_auroc"] not in ("", None)


def test_empty_roi_exits_2_naming_the_file(tmp_path, capsys):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "blank.png")
    code = run_cli(["train", "--data", "synthetic", "--data-path", tmp_path / "data", "--category", "fabric",
                    "--epochs", 1, "--image-size", 64, "--results-path", tmp_path / "results",
                    "--roi", tmp_path / "blank.png", "--no-test", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "blank.png is empty" in err and "Fix:" in err
