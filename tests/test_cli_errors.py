"""Bad command lines end with one ``error: ...`` line on stderr and a non-zero exit, never a traceback.

Exit status 2 for a usage or data error (refused before any work), 1 for an unexpected error (with a
hint to run again with ``--debug``), 130 for Ctrl-C; ``--debug`` (anywhere) adds the traceback.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _cli_helpers import in_tmp_dir, run_cli, single_thread  # noqa: F401 (fixtures)

import defectscope
from defectscope import cli, cli_simplenet
from defectscope.data import DataError, make_synthetic_mvtec

CATEGORY = "fabric"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny MVTec-layout set, for the errors that need real data to be reached."""
    root = tmp_path_factory.mktemp("cli_errors_data")
    make_synthetic_mvtec(root, category=CATEGORY, image_size=64, n_train=4, n_test_good=2, n_test_defect=2)
    return root


def _assert_clean_error(code, capsys, *words, status=2) -> str:
    """Exit ``status``, stderr ending in one ``error:`` line holding ``words``, no traceback."""
    out, err = capsys.readouterr()
    assert code == status, (code, out, err)
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1 and lines[-1] == error_lines[0], err  # one error line, and it ends stderr
    for word in words:
        assert word in err, (word, err)
    return err


# ---- values refused as they are parsed: (id, argv, words the error must hold) ----------------------
def _bad(command: list, option: str, values: dict) -> list:
    return [pytest.param([*command, option, value], option, id=f"{command[0]}{option}={name}")
            for name, value in values.items()]


NAN, INF = {"nan": "nan"}, {"inf": "inf", "-inf": "-inf"}
BAD_PARSE_VALUES = [
    *_bad(["train"], "--noise-std", {**NAN, **INF, "zero": "0", "negative": "-1", "text": "abc"}),
    *_bad(["train"], "--lr-scale", {**NAN, **INF, "zero": "0", "negative": "-2"}),
    *_bad(["train"], "--perlin-threshold", {**NAN, **INF, "negative": "-0.1", "one": "1", "above-one": "1.5"}),
    *_bad(["train"], "--upscale-factor", {**NAN, "zero": "0", "negative": "-1", "fraction": "1.5"}),
    *_bad(["train"], "--epochs", {**NAN, "inf": "inf", "zero": "0", "negative": "-3", "fraction": "2.5"}),
    *_bad(["train"], "--batch-size", {**NAN, "zero": "0", "negative": "-8"}),
    *_bad(["train"], "--image-size", {**NAN, "zero": "0", "negative": "-256", "below-32": "16"}),
    *_bad(["train"], "--test-split-ratio", {**NAN, **INF, "zero": "0", "one": "1", "negative": "-0.2"}),
    *_bad(["train"], "--train-defect-fraction", {**NAN, **INF, "one": "1", "negative": "-0.1"}),
    *_bad(["train"], "--train-defects", {**NAN, "negative": "-1"}),
    *_bad(["train"], "--num-workers", {**NAN, "negative": "-1"}),
    *_bad(["train"], "--max-images", {"inf": "inf", "negative": "-1"}),
    *_bad(["train"], "--devices", {**NAN, "zero": "0", "negative": "-1", "word": "two"}),
    *_bad(["train"], "--num-nodes", {"zero": "0"}),
    *_bad(["train"], "--seed", {**NAN, "negative": "-1", "too-large": str(2**32)}),
    *_bad(["train"], "--split-seed", {"negative": "-1"}),
    *_bad(["train"], "--accelerator", {"unknown": "quantum", "typo": "cppu", "empty": ""}),
    *_bad(["test", "--model-path", "m"], "--batch-size", {"zero": "0"}),
    *_bad(["test", "--model-path", "m"], "--devices", {"zero": "0"}),
    *_bad(["test", "--model-path", "m"], "--accelerator", {"unknown": "quantum"}),
    *_bad(["test", "--model-path", "m"], "--test-split-ratio", NAN),
]


@pytest.mark.parametrize("argv, option", BAD_PARSE_VALUES)
def test_bad_option_value_is_refused_at_parse_time(argv, option, capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_train", lambda args: pytest.fail("reached training"))
    monkeypatch.setattr(cli, "cmd_test", lambda args: pytest.fail("reached testing"))
    err = _assert_clean_error(run_cli(argv), capsys, option, "--help")
    assert "expected" in err or "unknown accelerator" in err


def test_nan_message_says_why(capsys):
    err = _assert_clean_error(run_cli(["train", "--noise-std", "nan"]), capsys, "--noise-std")
    assert "finite number > 0" in err and "nan and inf are refused" in err


def test_image_size_message_names_the_minimum(capsys):
    _assert_clean_error(run_cli(["train", "--image-size", "16"]), capsys, ">= 32", "image_size")


# ---- predict (its own options): checked by cli.check_args before any work -------------------------------
@pytest.mark.parametrize("argv, words", [
    pytest.param(["--batch-size", "0"], ["--batch-size", ">= 1"], id="predict--batch-size=zero"),
    pytest.param(["--batch-size", "-4"], ["--batch-size", ">= 1"], id="predict--batch-size=negative"),
    pytest.param(["--accelerator", "quantum"], ["unknown accelerator 'quantum'"], id="predict--accelerator=unknown"),
])
def test_predict_bad_values(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_predict", lambda args: pytest.fail("reached predict"))
    _assert_clean_error(run_cli(["predict", "x.png", "--model-path", "m", *argv]), capsys, *words)


def test_predict_output_that_is_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_predict", lambda args: pytest.fail("reached predict"))
    (tmp_path / "out.csv").write_text("not a folder")
    code = run_cli(["predict", "x.png", "--model-path", "m", "--output", tmp_path / "out.csv"])
    _assert_clean_error(code, capsys, "--output", "out.csv", "is a file", "folder")


def test_predict_output_inside_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_predict", lambda args: pytest.fail("reached predict"))
    (tmp_path / "out.csv").write_text("not a folder")
    code = run_cli(["predict", "x.png", "--model-path", "m", "--output", tmp_path / "out.csv" / "sub"])
    _assert_clean_error(code, capsys, "--output", "is inside", "out.csv")


# ---- devices that are not there -----------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    pytest.param(["train", "--accelerator", "gpu"], id="train--accelerator=gpu-without-cuda"),
    pytest.param(["train", "--accelerator", "cuda"], id="train--accelerator=cuda-without-cuda"),
    pytest.param(["train", "--accelerator", "GPU"], id="train--accelerator=GPU-uppercase-without-cuda"),
    pytest.param(["test", "--model-path", "m", "--accelerator", "gpu"], id="test--accelerator=gpu-without-cuda"),
    pytest.param(["predict", "x.png", "--model-path", "m", "--accelerator", "gpu"],
                 id="predict--accelerator=gpu-without-cuda"),
])
def test_gpu_without_cuda_is_refused_before_any_work(argv, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cmd_train", "cmd_test", "cmd_predict"):
        monkeypatch.setattr(cli, name, lambda args: pytest.fail("reached the command"))
    _assert_clean_error(run_cli(argv), capsys, "no CUDA GPU is visible", "use --accelerator cpu")


def test_more_devices_than_gpus(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cli, "cmd_train", lambda args: pytest.fail("reached training"))
    _assert_clean_error(run_cli(["train", "--accelerator", "gpu", "--devices", "2"]), capsys, "--devices 2", "1 CUDA GPU")


# ---- commands and option names ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    pytest.param(["trian"], ["unknown command 'trian'", "did you mean 'train'"], id="command=misspelt-trian"),
    pytest.param(["frobnicate", "--epochs", "1"], ["unknown command 'frobnicate'", "train, test, predict"],
                 id="command=unknown"),
    pytest.param(["train", "--epohcs", "3"], ["--epohcs -> --epochs"], id="train=misspelt-option"),
    pytest.param(["train", "--noise-sdt", "1"], ["--noise-sdt -> --noise-std"], id="train=misspelt-noise-std"),
    pytest.param(["predict", "x.png", "--model-path", "m", "--ouptut", "o"], ["--ouptut -> --output"],
                 id="predict=misspelt-option"),
    pytest.param(["train", "--frobnicate"], ["unrecognized arguments: --frobnicate", "defectscope train --help"],
                 id="train=unknown-option"),
    pytest.param(["test"], ["required", "--model-path"], id="test=missing-model-path"),
    pytest.param(["predict", "--model-path", "m"], ["required", "PATH"], id="predict=missing-inputs"),
    pytest.param(["train", "--epochs"], ["--epochs", "expected one argument"], id="train=option-without-value"),
    pytest.param(["train", "--image-score", "best"], ["invalid choice", "best"], id="train=bad-choice"),
    pytest.param(["train", "--train-defects", "5", "--defects-per-batch", "8", "--no-progress"],
                 ["--defects-per-batch 8 leaves no room for good images in a batch of 8", "at most 7"],
                 id="train=defects-fill-the-batch"),
    pytest.param(["train", "--defects-per-batch", "-1"], ["--defects-per-batch"], id="train=negative-defects-per-batch"),
])
def test_bad_command_line(argv, words, capsys):
    _assert_clean_error(run_cli(argv), capsys, *words)


def test_version(capsys):
    assert run_cli(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"defectscope {defectscope.__version__}"
    assert defectscope.__version__ and defectscope.__version__[0].isdigit()


# ---- simplenet: the reference command form and its options through `train --model simplenet` ------------
SN_TAIL = ["dataset", "mvtec", "data", "x"]


@pytest.mark.parametrize("net_or_data, option, value", [
    pytest.param("net", "--noise_std", "nan", id="simplenet--noise_std=nan"),
    pytest.param("net", "--noise_std", "0", id="simplenet--noise_std=zero"),
    pytest.param("net", "--dsc_lr", "-1e-4", id="simplenet--dsc_lr=negative"),
    pytest.param("net", "--dsc_margin", "inf", id="simplenet--dsc_margin=inf"),
    pytest.param("net", "--auto_noise", "-1", id="simplenet--auto_noise=negative"),
    pytest.param("net", "--meta_epochs", "0", id="simplenet--meta_epochs=zero"),
    pytest.param("net", "--gan_epochs", "-1", id="simplenet--gan_epochs=negative"),
    pytest.param("net", "--mix_noise", "0", id="simplenet--mix_noise=zero"),
    pytest.param("net", "--dsc_layers", "0", id="simplenet--dsc_layers=zero"),
    pytest.param("net", "--patchsize", "0", id="simplenet--patchsize=zero"),
    pytest.param("net", "--pre_proj", "-1", id="simplenet--pre_proj=negative"),
    pytest.param("net", "--proj_layer_type", "3", id="simplenet--proj_layer_type=3"),
    pytest.param("dataset", "--batch_size", "0", id="simplenet--batch_size=zero"),
    pytest.param("dataset", "--num_workers", "-1", id="simplenet--num_workers=negative"),
    pytest.param("dataset", "--resize", "16", id="simplenet--resize=below-32"),
    pytest.param("dataset", "--imagesize", "nan", id="simplenet--imagesize=nan"),
    pytest.param("dataset", "--hflip", "1.5", id="simplenet--hflip=above-one"),
    pytest.param("dataset", "--gray", "nan", id="simplenet--gray=nan"),
    pytest.param("dataset", "--scale", "1", id="simplenet--scale=one"),
    pytest.param("dataset", "--brightness", "-0.5", id="simplenet--brightness=negative"),
    pytest.param("dataset", "--rotate_degrees", "inf", id="simplenet--rotate_degrees=inf"),
    pytest.param("dataset", "--train_val_split", "0", id="simplenet--train_val_split=zero"),
    pytest.param("main", "--seed", "-1", id="simplenet--seed=negative"),
])
def test_simplenet_bad_values(net_or_data, option, value, capsys, monkeypatch):
    monkeypatch.setattr(cli_simplenet, "run", lambda *a, **k: pytest.fail("reached the run"))
    if net_or_data == "main":
        argv = ["simplenet", option, value, "net", *SN_TAIL]
    elif net_or_data == "net":
        argv = ["simplenet", "net", option, value, *SN_TAIL]
    else:
        argv = ["simplenet", "net", "dataset", option, value, "mvtec", "data", "x"]
    _assert_clean_error(run_cli(argv), capsys, option, "--help")


@pytest.mark.parametrize("option, value", [
    pytest.param("--dsc_lr", "nan", id="train-simplenet--dsc_lr=nan"),
    pytest.param("--hflip", "2", id="train-simplenet--hflip=two"),
    pytest.param("--resize", "8", id="train-simplenet--resize=below-32"),
])
def test_train_simplenet_form_bad_values(option, value, capsys, monkeypatch):
    monkeypatch.setattr(cli_simplenet, "run", lambda *a, **k: pytest.fail("reached the run"))
    code = run_cli(["train", "--model", "simplenet", "--data", "synthetic", "--accelerator", "cpu", option, value])
    _assert_clean_error(code, capsys, option)


# ---- data and weights that cannot be used -----------------------------------------------------------------
def test_elpv_not_installed_names_the_extra(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "elpv_dataset" else real(name, *a))
    err = _assert_clean_error(run_cli(["train", "--accelerator", "cpu"]), capsys, "ELPV")
    assert 'pip install "defectscope[elpv]"' in err


@pytest.mark.parametrize("suffix, content", [
    pytest.param(".pth", b"\x17" + bytes(range(200)), id="weights=random-bytes-pth"),
    pytest.param(".pth", b"", id="weights=empty-pth"),
    pytest.param(".safetensors", b"\xff" * 64, id="weights=bad-header-safetensors"),
])
def test_bad_weights_file(suffix, content, data_root, tmp_path, capsys):
    weights = tmp_path / f"resnet18{suffix}"
    weights.write_bytes(content)
    code = run_cli(["train", "--data", "mvtec", "--data-path", data_root, "--category", CATEGORY, "--image-size", 64,
                    "--epochs", 1, "--backbone", "resnet18", "--weights", weights, "--accelerator", "cpu",
                    "--no-progress", "--results-path", tmp_path / "results"])
    _assert_clean_error(code, capsys, str(weights), "Fix:")


# ---- unexpected errors: one line and the --debug hint; --debug shows the traceback --------------------
def _raise(exc):
    def handler(args):
        raise exc
    return handler


@pytest.mark.parametrize("exc, shown", [
    pytest.param(RuntimeError("boom"), "RuntimeError: boom", id="unexpected=RuntimeError"),
    pytest.param(KeyError("missing_key"), "KeyError: 'missing_key'", id="unexpected=KeyError"),
    pytest.param(ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero",
                 id="unexpected=ZeroDivisionError"),
    pytest.param(AttributeError("'NoneType' object has no attribute 'x'"), "AttributeError: 'NoneType'",
                 id="unexpected=AttributeError"),
    pytest.param(RuntimeError("first line\nsecond line\nthird"), "RuntimeError: first line ...",
                 id="unexpected=multi-line-message"),
    pytest.param(RuntimeError(), "error: RuntimeError (unexpected", id="unexpected=empty-message"),
])
def test_unexpected_error_is_one_line_with_the_debug_hint(exc, shown, capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_train", _raise(exc))
    err = _assert_clean_error(run_cli(["train", "--accelerator", "cpu"]), capsys, shown, "--debug", status=1)
    assert len([line for line in err.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("position", ["first", "last"])
def test_debug_shows_the_traceback(position, capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_train", _raise(RuntimeError("boom")))
    argv = ["train", "--accelerator", "cpu"]
    code = run_cli(["--debug", *argv] if position == "first" else [*argv, "--debug"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1].startswith("error: RuntimeError: boom")


def test_debug_on_a_usage_error_shows_the_traceback_too(capsys):
    assert run_cli(["train", "--epochs", "0", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: argument --epochs")


def test_data_error_from_a_command_exit_2_without_hint(capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_train", _raise(DataError("folder x is empty. Fix: add images")))
    err = _assert_clean_error(run_cli(["train", "--accelerator", "cpu"]), capsys, "folder x is empty")
    assert "--debug" not in err


def test_interrupt_exit_130(capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_train", _raise(KeyboardInterrupt()))
    _assert_clean_error(run_cli(["train", "--accelerator", "cpu"]), capsys, "error: interrupted", status=130)


def test_simplenet_unexpected_error(capsys, monkeypatch, data_root):
    monkeypatch.setattr(cli_simplenet, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("sn boom")))
    code = run_cli(["simplenet", "net", "dataset", "mvtec", data_root, CATEGORY])
    _assert_clean_error(code, capsys, "RuntimeError: sn boom", "--debug", status=1)
    code = run_cli(["simplenet", "--debug", "net", "dataset", "mvtec", data_root, CATEGORY])
    assert code == 1 and "Traceback" in capsys.readouterr().err
