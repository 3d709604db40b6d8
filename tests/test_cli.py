"""The ``defectscope`` command line: help, train / test / predict on a tiny set, errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from _cli_helpers import in_tmp_dir, read_csv, run_cli, single_thread  # noqa: F401 (fixtures)

from defectscope.cli import build_parser
from defectscope.data import list_images, make_synthetic_mvtec

CATEGORY = "fabric"
FAST = ["--no-progress", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny MVTec-layout set (64 px) read with ``--data mvtec``."""
    root = tmp_path_factory.mktemp("cli_data")
    make_synthetic_mvtec(root, category=CATEGORY, image_size=64, n_train=8, n_test_good=4, n_test_defect=4)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``defectscope train --data synthetic ...``: its exit code, run folder and data root."""
    base = tmp_path_factory.mktemp("cli_run")
    code = run_cli(
        ["train", "--data", "synthetic", "--data-path", base / "data", "--category", CATEGORY, "--epochs", 2,
         "--image-size", 64, "--results-path", base / "results", "--run-name", "tiny", *FAST]
    )
    run_dir = base / "results" / "defectscope" / "synthetic" / "tiny"
    return dict(code=code, run_dir=run_dir, data=base / "data", results=read_csv(run_dir / "results.csv"))


# ---- help ------------------------------------------------------------------------------------


def _option_blocks(text: str) -> dict[str, str]:
    """Help text of each option, keyed by its first option string (continuation lines joined)."""
    blocks, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def _subparsers() -> dict:
    """The sub-command parsers, by name."""
    parser = build_parser()
    return next(a.choices for a in parser._actions if isinstance(a.choices, dict))


@pytest.mark.parametrize("command", [None, "train", "test", "predict"])
def test_help_exits_0_and_shows_every_default(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    assert run_cli(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: defectscope")
    commands = _subparsers()
    if command is None:
        for name in ("train", "test", "predict"):
            assert name in text
        return
    blocks = _option_blocks(text)
    options = [a for a in commands[command]._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 5
    for action in options:
        block = blocks.get(action.option_strings[0])
        assert block is not None, f"{action.option_strings[0]} missing from `{command} --help`"
        assert "default:" in block, f"{action.option_strings[0]} shows no default: {block!r}"


# ---- train / test / predict -------------------------------------------------------------------


def test_train_writes_the_run_folder(trained):
    assert trained["code"] == 0
    run_dir = trained["run_dir"]
    assert [r["category"] for r in trained["results"]] == [CATEGORY]
    row = trained["results"][0]
    n_test = len(list((trained["data"] / CATEGORY / "test").rglob("*.png")))
    assert int(row["n_test"]) == n_test
    assert 0 <= float(row["image_auroc"]) <= 1 and 0 <= float(row["pixel_auroc"]) <= 1
    for name in ("ckpt.pth", "params.json", "last.ckpt"):
        assert (run_dir / "models" / "0" / name).is_file()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["data"]["data"] == "synthetic" and run["models"] == {"0": CATEGORY}
    params = json.loads((run_dir / "models" / "0" / "params.json").read_text())
    assert params["data"]["category"] == CATEGORY and params["threshold_info"]["rule"] == "false_reject"
    # The images held out for the threshold were not trained on, and none is a test image.
    held_out, trained_on = set(params["data"]["validation_images"]), set(params["data"]["train_images"])
    assert held_out and not held_out & trained_on
    assert not (held_out | trained_on) & {str(p) for p in (trained["data"] / CATEGORY / "test").rglob("*.png")}
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((run_dir / "images" / CATEGORY).glob("*.png"))) == n_test


def test_test_command_reproduces_the_training_metrics(trained, tmp_path):
    # A copy, so the module's run folder stays as train left it.
    run_dir = tmp_path / "results" / "defectscope" / "synthetic" / "tiny"
    shutil.copytree(trained["run_dir"], run_dir)
    (run_dir / "results.csv").unlink()
    params_before = (run_dir / "models" / "0" / "params.json").read_bytes()
    # No --data: the run's own data (run.json).
    code = run_cli(["test", "--model-path", run_dir, "--no-images", *FAST])
    assert code == 0
    rows = read_csv(run_dir / "results.csv")
    assert rows == trained["results"]  # same model, same test set: same metrics
    # Other data given explicitly: its own row, and no mean across data sets.
    code = run_cli(["test", "--model-path", run_dir, "--data", "mvtec", "--data-path", trained["data"],
                    "--category", CATEGORY, "--no-images", *FAST])
    assert code == 0
    rows = read_csv(run_dir / "results.csv")
    assert [(r["data"], r["category"]) for r in rows] == [("synthetic", CATEGORY), ("mvtec", CATEGORY)]
    assert {k: v for k, v in rows[1].items() if k != "data"} == {k: v for k, v in rows[0].items() if k != "data"}
    # test measures, it never changes the model.
    assert (run_dir / "models" / "0" / "params.json").read_bytes() == params_before


def test_test_writes_elsewhere_when_asked_and_leaves_the_run_folder_alone(trained, tmp_path, capsys):
    run_dir = tmp_path / "results" / "defectscope" / "synthetic" / "apart"
    shutil.copytree(trained["run_dir"], run_dir)
    before = (run_dir / "results.csv").read_bytes()
    code = run_cli(["test", "--model-path", run_dir, "--data", "mvtec", "--data-path", trained["data"],
                    "--category", CATEGORY, "--results-path", tmp_path / "elsewhere", "--no-images", *FAST])
    assert code == 0
    # The run's own results stay; the test's row is in results/defectscope/<data>/<run name>_test.
    assert (run_dir / "results.csv").read_bytes() == before
    out = tmp_path / "elsewhere" / "defectscope" / "mvtec" / "apart_test"
    rows = read_csv(out / "results.csv")
    assert [(r["data"], r["category"]) for r in rows] == [("mvtec", CATEGORY)]
    assert {k: v for k, v in rows[0].items() if k != "data"} == {
        k: v for k, v in trained["results"][0].items() if k != "data"}
    assert str(out) in capsys.readouterr().out.replace("\n", "")
    # A run name alone: under ./results (the current folder).
    code = run_cli(["test", "--model-path", run_dir, "--run-name", "second", "--no-images", *FAST])
    assert code == 0 and (Path("results") / "defectscope" / "synthetic" / "second" / "results.csv").is_file()
    # --update-threshold saves the model where it lives, so it cannot go elsewhere.
    params = (run_dir / "models" / "0" / "params.json").read_bytes()
    code = run_cli(["test", "--model-path", run_dir, "--run-name", "third", "--update-threshold", *FAST])
    assert code == 2 and "--update-threshold" in capsys.readouterr().err
    assert (run_dir / "models" / "0" / "params.json").read_bytes() == params


def test_predict_command_scores_a_folder(trained, tmp_path):
    from defectscope.models import load_model

    folder = trained["data"] / CATEGORY / "test" / "good"
    out = tmp_path / "out"
    code = run_cli(["predict", folder, "--model-path", trained["run_dir"], "--output", out, *FAST])
    assert code == 0
    rows = read_csv(out / "predictions.csv")
    images = list_images(folder)
    assert [r["file"] for r in rows] == [str(p) for p in images]
    model = load_model(trained["run_dir"])
    for row, path in zip(rows, images):
        score, _ = model.predict(path)
        # Batched vs single-image float32 arithmetic: equal to rounding.
        assert float(row["score"]) == pytest.approx(score, abs=1e-5)
        assert row["verdict"] == ("defect" if float(row["score"]) >= float(model.threshold) else "good")
    assert len(list((out / "images").glob("*.png"))) == len(images)


# ---- errors ----------------------------------------------------------------------------------


def test_empty_normal_dir_exit_2_naming_it(tmp_path, capsys):
    empty = tmp_path / "no images here"
    empty.mkdir()
    code = run_cli(["train", "--data", "folder", "--normal-dir", empty, "--epochs", 1, "--image-size", 64, *FAST])
    assert code == 2
    assert str(empty) in capsys.readouterr().err


def test_unreadable_image_exit_2_naming_it(trained, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code = run_cli(["predict", broken, "--model-path", trained["run_dir"], "--output", tmp_path / "out", *FAST])
    assert code == 2
    assert str(broken) in capsys.readouterr().err


def test_missing_model_exit_2_naming_it(data_root, tmp_path, capsys):
    nowhere = tmp_path / "not a run"
    nowhere.mkdir()
    code = run_cli(["test", "--model-path", nowhere, "--data", "mvtec", "--data-path", data_root,
                    "--category", CATEGORY, *FAST])
    assert code == 2
    assert str(nowhere) in capsys.readouterr().err


def test_wide_resnet_without_weights_exit_2_pointing_to_efficientnet(data_root, tmp_path, monkeypatch, capsys):
    for name in ("TORCH_HOME", "HF_HOME"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    code = run_cli(["train", "--data", "mvtec", "--data-path", data_root, "--category", CATEGORY,
                    "--backbone", "wide_resnet50_2", "--epochs", 1, "--image-size", 64, *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "wide_resnet50_2" in err and "efficientnet_lite0" in err


# ---- CLI problems found earlier, now fixed ----------------------------


def test_folder_without_normal_dir_exit_2(tmp_path, capsys):
    code = run_cli(["train", "--data", "folder", "--epochs", 1, *FAST])
    assert code == 2
    assert "--normal-dir" in capsys.readouterr().err


def test_mvtec_without_data_path_exit_2(tmp_path, capsys):
    code = run_cli(["train", "--data", "mvtec", "--epochs", 1, *FAST])
    assert code == 2
    assert "--data-path" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option", [["--image-size", 16], ["--layers", "layer9"], ["--epochs", 0], ["--batch-size", 1]], ids=str
)
def test_bad_model_or_engine_value_exit_2(option, data_root, capsys):
    code = run_cli(["train", "--data", "mvtec", "--data-path", data_root, "--category", CATEGORY, "--image-size", 64,
                    "--epochs", 1, *option, *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert option[0].lstrip("-").replace("-", "_") in err or option[0].lstrip("-").replace("-", " ") in err


def test_options_without_a_command_mean_train(data_root, tmp_path):
    code = run_cli(["--data", "mvtec", "--data-path", data_root, "--category", CATEGORY, "--epochs", 1,
                    "--image-size", 64, "--results-path", tmp_path, "--run-name", "r", "--no-test", *FAST])
    assert code == 0
    assert (tmp_path / "defectscope" / "mvtec" / "r" / "models" / "0" / "ckpt.pth").is_file()


def test_same_seed_same_model_in_one_process(data_root, tmp_path):
    states = []
    for name in ("one", "two"):
        code = run_cli(["train", "--data", "mvtec", "--data-path", data_root, "--category", CATEGORY,
                        "--epochs", 1, "--image-size", 64, "--results-path", tmp_path, "--run-name", name,
                        "--no-test", "--seed", 3, *FAST])
        assert code == 0
        ckpt = tmp_path / "defectscope" / "mvtec" / name / "models" / "0" / "ckpt.pth"
        states.append(torch.load(ckpt, weights_only=True)["state_dict"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_train_with_labelled_defects_reports_the_regime(data_root, tmp_path, capsys):
    common = ["train", "--data", "mvtec", "--data-path", data_root, "--category", CATEGORY, "--epochs", 1,
              "--image-size", 64, "--results-path", tmp_path, "--no-test", *FAST]
    assert run_cli([*common, "--run-name", "sup", "--train-defect-fraction", 0.5]) == 0
    assert "Training regime: supervised (6 good images, 1 defective: 1 with masks" in capsys.readouterr().out
    assert run_cli([*common, "--run-name", "weak", "--train-defect-fraction", 0.5, "--regime", "weakly"]) == 0
    out = capsys.readouterr().out
    assert "masks of 1 defective training images are not used" in out and "Training regime: weakly supervised" in out


def test_train_defects_is_elpv_only(data_root, capsys):
    code = run_cli(["train", "--data", "mvtec", "--data-path", data_root, "--category", CATEGORY,
                    "--train-defects", 5, *FAST])
    assert code == 2 and "--train-defect-fraction" in capsys.readouterr().err


def test_misspelt_option_names_the_closest_one(capsys):
    assert run_cli(["train", "--epohcs", 3]) == 2
    err = capsys.readouterr().err
    assert "--epohcs -> --epochs" in err and "defectscope train --help" in err
    assert run_cli(["predict", "x.png", "--model-path", "m", "--ouptut", "o"]) == 2
    assert "--ouptut -> --output" in capsys.readouterr().err


def test_compile_is_a_train_option_that_reaches_the_engine():
    from defectscope.cli import _engine

    parser = build_parser()
    assert _engine(parser.parse_args(["train", "--compile", "--accelerator", "cpu"])).compile_heads is True
    assert _engine(parser.parse_args(["train", "--accelerator", "cpu"])).compile_heads is False
    with pytest.raises(SystemExit):  # training only: test and predict do not train
        parser.parse_args(["test", "--model-path", "x", "--compile"])


def test_adaptor_init_reaches_the_model(monkeypatch, data_root, tmp_path):
    import defectscope.models as models

    built = []
    real = models.create_model

    def recording(name, **kwargs):
        built.append(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(models, "create_model", recording)
    common = ["train", "--data", "mvtec", "--data-path", data_root, "--category", CATEGORY, "--image-size", 64,
              "--epochs", 1, "--no-test", "--results-path", tmp_path, *FAST]
    assert run_cli([*common, "--run-name", "a"]) == 0
    assert run_cli([*common, "--run-name", "b", "--adaptor-init", "xavier"]) == 0
    assert [kw["adaptor_init"] for kw in built] == ["orthogonal", "xavier"]


# ---- verdicts: threshold override, multi-category runs, runs that know their data ----------------
def test_predict_threshold_overrides_for_one_run_only(trained, tmp_path):
    folder = trained["data"] / CATEGORY / "test" / "good"
    out = tmp_path / "out"
    before = (trained["run_dir"] / "models" / "0" / "params.json").read_bytes()
    assert run_cli(["predict", folder, "--model-path", trained["run_dir"], "--output", out, "--threshold", "-1",
                    "--no-images", *FAST]) == 0
    rows = read_csv(out / "predictions.csv")
    assert rows and all(r["verdict"] == "defect" and float(r["threshold"]) == -1.0 for r in rows)
    assert (trained["run_dir"] / "models" / "0" / "params.json").read_bytes() == before


def test_multi_category_run_needs_a_category_and_test_uses_the_run_data(data_root, tmp_path, capsys):
    make_synthetic_mvtec(data_root, category="wood", image_size=64, n_train=8, n_test_good=4, n_test_defect=4, seed=3)
    assert run_cli(["train", "--data", "mvtec", "--data-path", data_root, "--category", CATEGORY, "wood",
                    "--epochs", 1, "--image-size", 64, "--results-path", tmp_path, "--run-name", "two", "--no-images",
                    *FAST]) == 0
    run_dir = tmp_path / "defectscope" / "mvtec" / "two"
    assert json.loads((run_dir / "run.json").read_text())["models"] == {"0": CATEGORY, "1": "wood"}
    capsys.readouterr()
    image = list_images(data_root / "wood" / "test" / "good")[0]
    assert run_cli(["predict", image, "--model-path", run_dir, "--output", tmp_path / "p", *FAST]) == 2
    err = capsys.readouterr().err
    assert "holds 2 models: models/0 (fabric), models/1 (wood)" in err and "--category" in err
    assert run_cli(["predict", image, "--model-path", run_dir, "--category", "wood", "--output", tmp_path / "p",
                    "--no-images", *FAST]) == 0
    # test with no data options: the run's own data, each category with its own model.
    (run_dir / "results.csv").unlink()
    assert run_cli(["test", "--model-path", run_dir, "--no-images", *FAST]) == 0
    assert "Testing on the run's own data" in capsys.readouterr().out
    rows = read_csv(run_dir / "results.csv")
    assert [(r["data"], r["category"]) for r in rows] == [("mvtec", CATEGORY), ("mvtec", "wood"), ("mvtec", "mean")]
    # A models/<n> folder tests its own category only.
    (run_dir / "results.csv").unlink()
    assert run_cli(["test", "--model-path", run_dir / "models" / "1", "--no-images", *FAST]) == 0
    assert [r["category"] for r in read_csv(run_dir / "results.csv")] == ["wood"]


def test_test_without_run_record_or_data_says_what_to_pass(trained, tmp_path, capsys):
    run_dir = tmp_path / "old"
    shutil.copytree(trained["run_dir"], run_dir)
    (run_dir / "run.json").unlink()
    assert run_cli(["test", "--model-path", run_dir, *FAST]) == 2
    assert "does not record which data it was trained on" in capsys.readouterr().err


def test_update_threshold_is_the_only_way_test_changes_the_model(trained, tmp_path):
    run_dir = tmp_path / "results" / "defectscope" / "synthetic" / "upd"
    shutil.copytree(trained["run_dir"], run_dir)
    path = run_dir / "models" / "0" / "params.json"
    before = json.loads(path.read_text())
    assert run_cli(["test", "--model-path", run_dir, "--no-images", "--update-threshold", "--max-false-reject", "0.2",
                    *FAST]) == 0
    after = json.loads(path.read_text())
    assert after["threshold"] != before["threshold"]
    assert after["threshold_info"]["max_false_reject"] == 0.2 and "update-threshold" in after["threshold_info"]["source"]


def test_a_bad_test_image_is_found_before_training(tmp_path, capsys):
    root = tmp_path / "data"
    make_synthetic_mvtec(root, category=CATEGORY, image_size=64, n_train=6, n_test_good=2, n_test_defect=2)
    broken = list_images(root / CATEGORY / "test" / "good")[0]
    broken.write_bytes(broken.read_bytes()[:40])  # truncated PNG
    code = run_cli(["train", "--data", "mvtec", "--data-path", root, "--category", CATEGORY, "--epochs", 1,
                    "--image-size", 64, "--results-path", tmp_path / "results", "--run-name", "bad", *FAST])
    captured = capsys.readouterr()
    assert code == 2 and "checked before training" in captured.err and broken.name in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "results" / "defectscope" / "mvtec" / "bad" / "models" / "0" / "ckpt.pth").exists()
    assert "Training regime" not in captured.out


def _sixteen_bit(path, level: int) -> None:
    import numpy as np
    from PIL import Image

    values = np.full((64, 64), level, dtype=np.uint16)
    values[20:40, 20:40] = level + 2000
    Image.fromarray(values).save(path)


def test_conversions_are_printed_as_notices_and_the_pixel_limit_is_an_option(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    _sixteen_bit(folder / "deep.png", 30000)
    out = tmp_path / "out"
    assert run_cli(["predict", folder, "--model-path", trained["run_dir"], "--output", out, "--no-images", *FAST]) == 0
    err = capsys.readouterr().err
    assert "notice: Image" in err and "deep.png" in err and "16-bit" in err
    assert "DataNotice" not in err and "warnings.warn" not in err
    assert run_cli(["predict", folder, "--model-path", trained["run_dir"], "--output", out, "--max-pixels", "1000",
                    *FAST]) == 2
    err = capsys.readouterr().err
    assert "deep.png" in err and "--max-pixels N" in err and "Traceback" not in err
    # The limit was for that command only.
    assert run_cli(["predict", folder, "--model-path", trained["run_dir"], "--output", out, "--no-images", *FAST]) == 0


def test_wide_range_is_recorded_with_the_model_and_used_by_predict(tmp_path):
    from defectscope.data import images

    good = tmp_path / "good"
    good.mkdir()
    for i in range(8):
        _sixteen_bit(good / f"g{i}.png", 1000 + 50 * i)
    assert run_cli(["train", "--data", "folder", "--normal-dir", good, "--epochs", 1, "--image-size", 64,
                    "--results-path", tmp_path / "r", "--run-name", "w", "--wide-range", "stretch", "--no-test",
                    *FAST]) == 0
    assert images.WIDE_RANGE == "fixed"  # restored after the command
    run_dir = tmp_path / "r" / "defectscope" / "folder" / "w"
    assert json.loads((run_dir / "run.json").read_text())["data"]["wide_range"] == "stretch"
    params = json.loads((run_dir / "models" / "0" / "params.json").read_text())
    assert params["data"]["wide_range"] == "stretch"
    scores = {}
    for option in ([], ["--wide-range", "fixed"]):
        out = tmp_path / ("p" + "".join(option))
        assert run_cli(["predict", good / "g0.png", "--model-path", run_dir, "--output", out, "--no-images",
                        *option, *FAST]) == 0
        scores[tuple(option)] = float(read_csv(out / "predictions.csv")[0]["score"])
    # Stretched (as in training) vs fixed: the same file reads differently, so scores differ.
    assert scores[()] != scores[("--wide-range", "fixed")]


def test_defects_moved_into_training_are_not_tested_again(data_root, tmp_path, capsys):
    common = ["--results-path", tmp_path, "--run-name", "frac", "--no-images", *FAST]
    assert run_cli(["train", "--data", "mvtec", "--data-path", data_root, "--category", CATEGORY, "--epochs", 1,
                    "--image-size", 64, "--train-defect-fraction", 0.5, *common]) == 0
    run_dir = tmp_path / "defectscope" / "mvtec" / "frac"
    trained_rows = read_csv(run_dir / "results.csv")
    params = json.loads((run_dir / "models" / "0" / "params.json").read_text())
    moved = [p for p in params["data"]["train_images"] if "/test/" in p]
    assert moved  # defects moved from test/ into training
    (run_dir / "results.csv").unlink()
    assert run_cli(["test", "--model-path", run_dir, "--no-images", *FAST]) == 0
    rows = read_csv(run_dir / "results.csv")
    n_test_files = len(list((data_root / CATEGORY / "test").rglob("*.png")))
    assert int(rows[0]["n_test"]) == int(trained_rows[0]["n_test"]) == n_test_files - len(moved)
    # Given the data explicitly without the fraction, the moved defects are still left out, with a note.
    assert run_cli(["test", "--model-path", run_dir, "--data", "mvtec", "--data-path", data_root, "--category",
                    CATEGORY, "--no-images", *FAST]) == 0
    assert f"{len(moved)} test image(s) were used in training" in capsys.readouterr().out
    assert int(read_csv(run_dir / "results.csv")[-1]["n_test"]) == n_test_files - len(moved)


def test_default_epochs_give_small_training_sets_a_minimum_number_of_steps():
    from types import SimpleNamespace

    from defectscope.cli import DEMO_EPOCHS, default_epochs
    from defectscope.models import SuperSimpleNet

    args = SimpleNamespace(batch_size=None, val_fraction=0.2)
    ssn = SimpleNamespace(default_epochs=SuperSimpleNet.default_epochs, min_default_steps=SuperSimpleNet.min_default_steps)
    assert (ssn.default_epochs, ssn.min_default_steps) == (10, 400)
    # ELPV mono: 441 cells, 353 after the hold-out, 44 steps of 8 an epoch: the 10 epochs are enough.
    assert default_epochs(ssn, 441, args) == 10
    # 40 images: 32 trained, 4 steps an epoch -> 100 epochs for 400 steps.
    assert default_epochs(ssn, 40, args) == 100
    assert default_epochs(ssn, 40, SimpleNamespace(batch_size=16, val_fraction=0.2)) == 200
    assert default_epochs(ssn, 40, SimpleNamespace(batch_size=None, val_fraction=0.0)) == 80
    # EfficientAD trains at batch 1 without a default of its own (the demo's 3 epochs): 40 images,
    # 32 trained, 32 epochs for its 1,000 steps; ELPV mono's 353 cells give 1,059 steps in 3.
    from defectscope.models import EfficientAd

    assert (EfficientAd.max_batch_size, EfficientAd.min_default_steps) == (1, 1000)
    assert default_epochs(EfficientAd, 40, args) == 32
    assert default_epochs(EfficientAd, 441, args) == DEMO_EPOCHS == 3
    # A model without a step minimum keeps its epochs; one without a default gets the demo's.
    assert default_epochs(SimpleNamespace(default_epochs=7), 40, args) == 7
    assert default_epochs(SimpleNamespace(), 40, args) == DEMO_EPOCHS
    # --help states each model's minimum, read from the classes.
    from defectscope.cli import build_parser

    epochs_help = next(a.help for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                       if "--epochs" in a.option_strings)
    for words in ("supersimplenet 10", "stfpm 3", "supersimplenet 400", "simplenet 400", "stfpm 1,200",
                  "efficientad 1,000"):
        assert words in epochs_help


@pytest.mark.parametrize("name", ["stfpm", "simplenet"])
def test_stfpm_and_simplenet_defaults_also_take_a_minimum_number_of_steps(name):
    """Their 3 epochs were 12 steps on 40 images and scored below the NN floor on generated
    natural textures (benchmarks/results/floor_synthetic.md); ELPV's 3 epochs stay 3 or grow to the minimum."""
    from types import SimpleNamespace

    from defectscope.cli import default_epochs
    from defectscope.models import MODELS

    cls = MODELS[name]
    args = SimpleNamespace(batch_size=None, val_fraction=0.2)
    steps_small = (40 - 8) // 8
    assert default_epochs(cls, 40, args) == -(-cls.min_default_steps // steps_small) > cls.default_epochs
    assert default_epochs(cls, 441, args) * ((441 - 88) // 8) >= cls.min_default_steps
