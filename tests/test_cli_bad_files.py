"""Bad files reached through the command line (model folders, images, a resume state): one
``error:`` line, exit 2, no traceback, nothing run from a crafted file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zlib

import pytest
import torch
from _cli_helpers import in_tmp_dir, run_cli, single_thread  # noqa: F401 (fixtures)

from defectscope.data import list_images, make_synthetic_mvtec

CATEGORY = "fabric"
FAST = ["--no-progress", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_files")
    make_synthetic_mvtec(base / "data", category=CATEGORY, image_size=64, n_train=6, n_test_good=2, n_test_defect=2)
    code = run_cli(["train", "--data", "mvtec", "--data-path", base / "data", "--category", CATEGORY, "--epochs", 1,
                    "--image-size", 64, "--results-path", base / "results", "--run-name", "ok", "--no-images", *FAST])
    assert code == 0
    return dict(run_dir=base / "results" / "defectscope" / "mvtec" / "ok", data=base / "data")


def _clean_error(code, capsys, *words):
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    # One error statement (a list of bad files continues it on indented lines), after any notices.
    assert sum(line.startswith("error:") for line in lines) == 1, err
    first = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    assert all(not line.startswith(("notice:", "Warning")) for line in lines[first:]), err
    for word in words:
        assert word in err, (word, err)
    return err


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _png_header_only(path, width, height):
    """A PNG that claims ``width x height`` (a decompression bomb's header) with almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


def _break_model(kind, model_dir, marker):
    """Break a copied model folder in one way; returns words the error must hold."""
    ckpt, params = model_dir / "ckpt.pth", model_dir / "params.json"
    if kind == "ckpt-empty":
        ckpt.write_bytes(b"")
        return ["ckpt.pth", "empty"]
    if kind == "ckpt-truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:300])
        return ["ckpt.pth", "truncated or corrupt"]
    if kind == "ckpt-random":
        ckpt.write_bytes(os.urandom(4096))
        return ["ckpt.pth"]
    if kind == "ckpt-crafted":
        torch.save({"state_dict": {}, "x": _RunsCode(marker)}, ckpt)
        return ["Refused", "ckpt.pth"]
    if kind == "params-empty":
        params.write_text("")
        return ["params.json", "not valid JSON"]
    if kind == "params-truncated":
        params.write_text(params.read_text()[:50])
        return ["params.json", "not valid JSON"]
    if kind == "params-newer":
        data = json.loads(params.read_text())
        data["format_version"] = 7
        params.write_text(json.dumps(data))
        return ["format version 7"]
    if kind == "params-pkl-crafted":
        params.unlink()
        with open(model_dir / "params.pkl", "wb") as fh:
            pickle.dump(_RunsCode(marker), fh)
        return ["Refused", "params.pkl"]
    if kind == "params-missing":
        params.unlink()
        return ["No trained model"]
    raise AssertionError(kind)


MODEL_BREAKS = ["ckpt-empty", "ckpt-truncated", "ckpt-random", "ckpt-crafted", "params-empty", "params-truncated",
                "params-newer", "params-pkl-crafted", "params-missing"]


@pytest.mark.parametrize("command", ["predict", "test"])
@pytest.mark.parametrize("kind", MODEL_BREAKS)
def test_broken_model_folder(trained, tmp_path, capsys, kind, command):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["run_dir"], run_dir)
    marker = tmp_path / "pwned"
    words = _break_model(kind, run_dir / "models" / "0", marker)
    image = list_images(trained["data"] / CATEGORY / "test" / "good")[0]
    if command == "predict":
        argv = ["predict", image, "--model-path", run_dir, "--output", tmp_path / "out", *FAST]
    else:
        argv = ["test", "--model-path", run_dir, "--no-images", *FAST]
    _clean_error(run_cli(argv), capsys, *words)
    assert not marker.exists()


def _bad_input(kind, folder):
    """A bad file to predict on; returns (path, words the error must hold)."""
    if kind == "bomb":
        path = folder / "bomb.png"
        _png_header_only(path, 40000, 40000)
        return path, ["bomb.png", "megapixels", "--max-pixels"]
    if kind == "fifo":
        path = folder / "pipe.png"
        os.mkfifo(path)
        return path, ["pipe.png"]
    if kind == "video":
        path = folder / "clip.png"
        path.write_bytes(b"\0\0\0\x20ftypisom" + os.urandom(200))
        return path, ["clip.png", "video"]
    if kind == "empty":
        path = folder / "empty.png"
        path.write_bytes(b"")
        return path, ["empty.png", "empty"]
    if kind == "text-extension":
        path = folder / "notes.txt"
        path.write_text("hello")
        return path, ["notes.txt"]
    if kind == "missing":
        return folder / "nope.png", ["nope.png"]
    if kind == "empty-folder":
        path = folder / "nothing"
        path.mkdir()
        return path, ["No images", "nothing"]
    if kind == "broken-links-only":
        path = folder / "links"
        path.mkdir()
        (path / "gone.png").symlink_to(folder / "does-not-exist.png")
        return path, ["gone.png"]
    if kind == "nan-tiff":
        import numpy as np
        from PIL import Image

        path = folder / "nan.tif"
        values = np.zeros((40, 40), dtype=np.float32)
        values[3, 3] = np.nan
        Image.fromarray(values, mode="F").save(path)
        return path, ["nan.tif", "NaN"]
    raise AssertionError(kind)


INPUT_KINDS = ["bomb", "fifo", "video", "empty", "text-extension", "missing", "empty-folder", "broken-links-only",
               "nan-tiff"]


@pytest.mark.timeout(60)  # a FIFO that were opened would hang here
@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_bad_image_given_to_predict(trained, tmp_path, capsys, kind):
    path, words = _bad_input(kind, tmp_path)
    argv = ["predict", path, "--model-path", trained["run_dir"], "--output", tmp_path / "out", *FAST]
    _clean_error(run_cli(argv), capsys, *words)


@pytest.mark.parametrize("kind", ["bomb", "nan-tiff", "video"])
def test_bad_training_image_is_refused_before_training(trained, tmp_path, capsys, kind):
    good = tmp_path / "good"
    shutil.copytree(trained["data"] / CATEGORY / "train" / "good", good)
    _, words = _bad_input(kind, good)
    argv = ["train", "--data", "folder", "--normal-dir", good, "--epochs", 1, "--image-size", 64,
            "--results-path", tmp_path / "r", "--run-name", "x", *FAST]
    _clean_error(run_cli(argv), capsys, *words)
    assert not list((tmp_path / "r").rglob("ckpt.pth"))


@pytest.mark.parametrize("kind", ["empty", "random", "crafted", "other-settings"])
def test_bad_resume_state_names_no_resume(trained, tmp_path, capsys, kind):
    args = ["train", "--data", "mvtec", "--data-path", trained["data"], "--category", CATEGORY, "--epochs", 1,
            "--image-size", 64, "--results-path", tmp_path, "--run-name", "again", "--no-test", *FAST]
    state = tmp_path / "defectscope" / "mvtec" / "again" / "models" / "0" / "last.ckpt"
    state.parent.mkdir(parents=True)
    shutil.copy(trained["run_dir"] / "models" / "0" / "last.ckpt", state)
    marker = tmp_path / "pwned"
    if kind == "empty":
        state.write_bytes(b"")
    elif kind == "random":
        state.write_bytes(os.urandom(1000))
    elif kind == "crafted":
        torch.save({"epoch": 1, "x": _RunsCode(marker)}, state)
    else:
        args += ["--lr-scale", "3"]
    _clean_error(run_cli(args), capsys, "last.ckpt", "--no-resume")
    assert not marker.exists()
    assert run_cli([*args, "--no-resume"]) == 0  # the fix the message gives works
