"""STFPM and EfficientAD through the command line, end to end on tiny images: their own options,
the run folder, test and predict, the teacher distilled by `defectscope distill-teacher`, and the
refusals (a batch size the model cannot train at, another model's setting)."""

from __future__ import annotations

import json

import pytest
from _cli_helpers import in_tmp_dir, read_csv, run_cli, single_thread  # noqa: F401 (fixtures)

from defectscope.data import list_images, make_synthetic_mvtec

CATEGORY = "fabric"
FAST = ["--no-progress", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("students_data")
    make_synthetic_mvtec(root, category=CATEGORY, image_size=64, n_train=6, n_test_good=2, n_test_defect=2)
    return root


def _train(data_root, results, model, *options):
    return run_cli(["train", "--model", model, "--data", "mvtec", "--data-path", data_root, "--category", CATEGORY,
                    "--epochs", 1, "--image-size", 64, "--results-path", results, "--run-name", model, "--no-images",
                    *options, *FAST])


def _check_run(run_dir, data_root, tmp_path, model):
    params = json.loads((run_dir / "models" / "0" / "params.json").read_text())
    assert params["model"] == model
    rows = read_csv(run_dir / "results.csv")
    assert rows[0]["category"] == CATEGORY and 0 <= float(rows[0]["image_auroc"]) <= 1
    images = list_images(data_root / CATEGORY / "test" / "good")
    assert run_cli(["predict", images[0], "--model-path", run_dir, "--output", tmp_path / "p", "--no-images",
                    *FAST]) == 0
    assert len(read_csv(tmp_path / "p" / "predictions.csv")) == 1
    (run_dir / "results.csv").unlink()
    assert run_cli(["test", "--model-path", run_dir, "--no-images", *FAST]) == 0
    assert read_csv(run_dir / "results.csv")[0]["image_auroc"] == rows[0]["image_auroc"]
    return params


def test_stfpm_end_to_end_with_its_own_options(data_root, tmp_path, capsys):
    assert _train(data_root, tmp_path, "stfpm", "--lr", "0.2", "--momentum", "0.8", "--hard-fraction", "0.25",
                  "--translate", "0.2") == 0
    params = _check_run(tmp_path / "defectscope" / "mvtec" / "stfpm", data_root, tmp_path, "stfpm")
    assert params["hparams"]["lr"] == 0.2 and params["hparams"]["momentum"] == 0.8
    assert params["hparams"]["hard_fraction"] == 0.25
    assert params["hparams"]["translate"] == 0.2 and params["hparams"]["translate_max_images"] == 100
    # One epoch: the held-out loss was measured once, and that epoch was kept.
    assert params["training"]["selected_epoch"] == 1 and list(params["training"]["validation_loss"]) == ["1"]
    # No resnet18 weights on a clean machine: the packaged fallback, said once.
    if params["hparams"]["backbone"] != "resnet18":
        assert any(line.startswith("notice:") and "efficientnet_lite0" in line
                   for line in capsys.readouterr().err.splitlines())


def test_stfpm_select_epoch_last_measures_nothing(data_root, tmp_path):
    assert _train(data_root, tmp_path, "stfpm", "--epochs", 2, "--select-epoch", "last", "--no-test") == 0
    params = json.loads((tmp_path / "defectscope" / "mvtec" / "stfpm" / "models" / "0" / "params.json").read_text())
    assert params["training"]["epochs"] == 2
    assert "selected_epoch" not in params["training"] and "validation_loss" not in params["training"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A PDN-S from `defectscope distill-teacher` (2 steps: a file, not a good teacher)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher_s.pth"
    assert run_cli(["distill-teacher", "--model-size", "s", "--output", path, "--steps", 2, "--batch-size", 1,
                    "--image-size", 64, "--no-progress", "--accelerator", "cpu"]) == 0
    assert path.is_file()
    return path


def test_efficientad_end_to_end_with_a_distilled_teacher(data_root, tmp_path, teacher):
    assert _train(data_root, tmp_path, "efficientad", "--teacher-weights", teacher) == 0
    params = _check_run(tmp_path / "defectscope" / "mvtec" / "efficientad", data_root, tmp_path, "efficientad")
    assert params["hparams"]["teacher_weights"] == str(teacher)
    assert params["training"]["batch_size"] == 1  # the model's own batch size when none is given


@pytest.mark.parametrize(
    ("model", "options", "words"),
    [
        ("efficientad", ["--batch-size", "8"], "efficientad trains at batch size exactly 1"),
        ("efficientad", ["--momentum", "0.5"], "--momentum is a setting of stfpm, not of efficientad"),
        ("efficientad", ["--backbone", "resnet18"], "efficientad takes no --backbone"),
        ("efficientad", [], "teacher"),
        ("stfpm", ["--batch-size", "1"], "stfpm trains at batch size at least 2"),
        ("stfpm", ["--model-size", "m"], "--model-size is a setting of efficientad, not of stfpm"),
        ("stfpm", ["--lr", "nan"], "--lr"),
        ("stfpm", ["--hard-fraction", "0"], "--hard-fraction"),
        ("stfpm", ["--translate", "0.9"], "--translate must be"),
        ("efficientad", ["--padding", "maybe"], "expected true or false"),
    ],
    ids=["ead-batch-8", "ead-stfpm-option", "ead-backbone", "ead-no-teacher", "stfpm-batch-1", "stfpm-ead-option",
         "stfpm-lr-nan", "stfpm-hard-fraction-0", "stfpm-translate-0.9", "ead-padding-not-bool"],
)
def test_refusals(data_root, tmp_path, capsys, teacher, model, options, words):
    if model == "efficientad" and options and options[0] != "--teacher-weights":
        options = [*options, "--teacher-weights", str(teacher)]
    code = _train(data_root, tmp_path, model, *options)
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err


def test_efficientad_teacher_file_can_be_re_pointed_on_load(data_root, tmp_path, teacher):
    import shutil

    from defectscope.models import load_model

    assert _train(data_root, tmp_path, "efficientad", "--teacher-weights", teacher) == 0
    moved = tmp_path / "elsewhere.pth"
    shutil.copy(teacher, moved)
    model = load_model(tmp_path / "defectscope" / "mvtec" / "efficientad", weights=moved)
    assert model.hparams["teacher_weights"] == str(moved)
