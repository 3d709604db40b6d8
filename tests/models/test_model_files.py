"""Model files that are safe to open: crafted files never run code, broken files get one clear
error, old params.pkl files still load when they hold plain data, multi-model runs are chosen
by category, and an instance refuses weights trained with other settings."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from defectscope.engine import Engine
from defectscope.models import ModelFileError, SimpleNet, SuperSimpleNet, load_model
from defectscope.models.base import find_model_dir
from defectscope.models.model_files import PlainDataUnpickler, atomic_write, remove_orphan_temporaries


@pytest.fixture(scope="module")
def saved(tmp_path_factory, make_ssn):
    """A saved SuperSimpleNet (untrained heads, fitted statistics, threshold 0.42) in a run folder."""
    torch.manual_seed(0)
    model = make_ssn()
    model.fit_feature_statistics(torch.randn(4, 152, 8, 8) * 3 + 1)
    model.threshold.fill_(0.42)
    model.threshold_info = {"source": "held-out training images", "rule": "false_reject"}
    model.data_info = {"category": "fabric", "data": "mvtec"}
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    model.save(run_dir / "models" / "0")
    return run_dir


@pytest.fixture
def run_dir(saved, tmp_path):
    """A fresh copy of the saved run, free to be broken."""
    copy = tmp_path / "run"
    shutil.copytree(saved, copy)
    return copy


class _RunsCode:
    """Pickles to ``os.system('touch <marker>')``: what a crafted model file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Stealthy:
    """Runs the command, then unpickles to plain settings, so the load would seem normal."""

    def __init__(self, marker: Path, params: dict):
        self.marker, self.params = marker, params

    def __reduce__(self):
        return (eval, (f"(__import__('os').system('touch {self.marker}'), {self.params!r})[1]",))


def _model_dir(run_dir: Path) -> Path:
    return run_dir / "models" / "0"


def _legacy(run_dir: Path) -> Path:
    """Turn the saved model into a format-1 folder (params.pkl, no params.json)."""
    folder = _model_dir(run_dir)
    params = json.loads((folder / "params.json").read_text())
    params.pop("format")
    params["format_version"] = 1
    (folder / "params.json").unlink()
    with open(folder / "params.pkl", "wb") as fh:
        pickle.dump(params, fh)
    return folder


# ---- crafted files never run code -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["runs-code", "stealthy"])
def test_crafted_params_pkl_is_refused_and_runs_nothing(run_dir, tmp_path, kind):
    folder = _legacy(run_dir)
    marker = tmp_path / "pwned"
    params = PlainDataUnpickler(open(folder / "params.pkl", "rb")).load()
    payload = _RunsCode(marker) if kind == "runs-code" else _Stealthy(marker, params)
    with open(folder / "params.pkl", "wb") as fh:
        pickle.dump(payload, fh)
    for load in (load_model, SuperSimpleNet.load_from_path, lambda p: find_model_dir(p) and load_model(p)):
        with pytest.raises(ModelFileError, match="Refused .*params.pkl.*asks to import"):
            load(run_dir)
    assert not marker.exists()


def test_crafted_ckpt_pth_is_refused_and_runs_nothing(run_dir, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(_model_dir(run_dir) / "ckpt.pth", weights_only=True)
    state["extra"] = _RunsCode(marker)
    torch.save(state, _model_dir(run_dir) / "ckpt.pth")
    with pytest.raises(ModelFileError, match="Refused .*ckpt.pth.*could run code"):
        load_model(run_dir)
    assert not marker.exists()


def test_crafted_last_ckpt_is_refused_on_resume_and_runs_nothing(tmp_path, make_ssn):
    from defectscope.data import make_synthetic_mvtec, mvtec_split

    make_synthetic_mvtec(tmp_path / "data", category="c", image_size=64, n_train=6, n_test_good=2, n_test_defect=2)
    split = mvtec_split(tmp_path / "data", "c")
    marker = tmp_path / "pwned"
    engine = Engine(results_path=tmp_path, run_name="r", max_epochs=1, batch_size=2, accelerator="cpu", progress=False)
    state_path = engine.model_dir / "last.ckpt"
    state_path.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "payload": _RunsCode(marker)}, state_path)
    with pytest.raises(ModelFileError, match="Cannot resume: Refused .*last.ckpt.*--no-resume"):
        engine.fit(make_ssn(), split.train)
    assert not marker.exists()


def test_plain_data_unpickler_allows_plain_data_only():
    import io

    data = {"a": [1, 2.5, None, True], "b": ("x", b"y"), "c": {"d": -3}}
    assert PlainDataUnpickler(io.BytesIO(pickle.dumps(data))).load() == data
    with pytest.raises(pickle.UnpicklingError, match="asks to import collections.OrderedDict"):
        from collections import OrderedDict

        PlainDataUnpickler(io.BytesIO(pickle.dumps(OrderedDict(a=1)))).load()


# ---- broken files: one clear error each -------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


BREAKAGES = {
    "empty": lambda path: path.write_bytes(b""),
    "truncated": _truncate,
    "random-bytes": lambda path: path.write_bytes(os.urandom(2048)),
    "text": lambda path: path.write_text("not a model\n"),
}


@pytest.mark.parametrize("how", list(BREAKAGES))
@pytest.mark.parametrize("name", ["ckpt.pth", "params.json", "params.pkl"])
def test_broken_model_file_gives_one_clear_error(run_dir, name, how):
    folder = _legacy(run_dir) if name == "params.pkl" else _model_dir(run_dir)
    BREAKAGES[how](folder / name)
    with pytest.raises(ModelFileError) as err:
        load_model(run_dir)
    message = str(err.value)
    assert name in message and "Fix:" in message


@pytest.mark.parametrize("how", list(BREAKAGES))
def test_broken_training_state_names_no_resume(tmp_path, how, make_ssn):
    engine = Engine(results_path=tmp_path, run_name="r", max_epochs=1, batch_size=2, accelerator="cpu", progress=False)
    path = engine.model_dir / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "max_epochs": 1}, path)
    BREAKAGES[how](path)
    model = make_ssn()
    optimizer, scheduler = model.configure_optimizers(1)
    with pytest.raises(ModelFileError, match="last.ckpt.*--no-resume"):
        engine._load_training_state(path, model, optimizer, scheduler)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: p.update(format_version=99), "format version 99"),
        (lambda p: p.update(format="something-else"), "not a defectscope model file"),
        (lambda p: p.pop("hparams"), "lacks the 'hparams' entry"),
        (lambda p: p.update(model="patchcore"), "does not have"),
        (lambda p: p["hparams"].update(no_such_setting=1), "settings do not fit"),
    ],
    ids=["newer-format", "foreign-json", "no-hparams", "unknown-model", "unknown-setting"],
)
def test_params_json_that_does_not_fit_is_refused(run_dir, change, words):
    path = _model_dir(run_dir) / "params.json"
    params = json.loads(path.read_text())
    change(params)
    path.write_text(json.dumps(params))
    with pytest.raises(ModelFileError, match=words):
        load_model(run_dir)


def test_params_of_another_model_is_refused_with_the_fix(run_dir):
    with pytest.raises(ModelFileError, match="holds a supersimplenet model, not a simplenet.*load_model"):
        SimpleNet.load_from_path(run_dir)


def test_legacy_plain_params_pkl_still_loads(run_dir, saved):
    _legacy(run_dir)
    old = load_model(run_dir)
    new = load_model(saved)
    assert float(old.threshold) == pytest.approx(0.42)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(old(x)[0], new(x)[0], rtol=0, atol=0)
    # Saving again writes the JSON format and drops the pickle.
    old.save(_model_dir(run_dir))
    assert (_model_dir(run_dir) / "params.json").is_file() and not (_model_dir(run_dir) / "params.pkl").exists()


# ---- temporaries, categories, instances -----------------------------------------------------------
def test_orphan_temporary_of_a_killed_write_is_cleaned(tmp_path):
    target = tmp_path / "last.ckpt"
    orphan = tmp_path / "last.ckpt.abc123.tmp"
    orphan.write_bytes(b"half written")  # what a write killed before its rename leaves
    other = tmp_path / "ckpt.pth.keep.tmp"
    other.write_bytes(b"another file's temporary")
    atomic_write(target, lambda fh: fh.write(b"new"))
    assert target.read_bytes() == b"new" and not orphan.exists() and other.exists()
    assert remove_orphan_temporaries(tmp_path) == [other] and not other.exists()


def test_multi_category_run_picks_by_category_or_lists_what_it_holds(run_dir):
    second = run_dir / "models" / "1"
    shutil.copytree(_model_dir(run_dir), second)
    params = json.loads((second / "params.json").read_text())
    params["data"]["category"] = "wood"
    (second / "params.json").write_text(json.dumps(params))
    with pytest.raises(ModelFileError, match=r"holds 2 models: models/0 \(fabric\), models/1 \(wood\).*--category"):
        load_model(run_dir)
    assert find_model_dir(run_dir, category="wood") == second
    assert find_model_dir(run_dir / "models", category="fabric") == _model_dir(run_dir)
    assert load_model(run_dir, category="wood").data_info["category"] == "wood"
    with pytest.raises(ModelFileError, match="No model for category 'tile'.*models/0 \\(fabric\\)"):
        load_model(run_dir, category="tile")
    with pytest.raises(ModelFileError, match="No model for category 'wood'"):
        find_model_dir(_model_dir(run_dir), category="wood")


def test_instance_load_applies_saved_settings_or_refuses(run_dir, saved, make_ssn):
    same = make_ssn()
    same.load_from_path(run_dir)
    assert float(same.threshold) == pytest.approx(0.42)
    assert same.threshold_info["rule"] == "false_reject" and same.data_info["category"] == "fabric"
    for kwargs, words in [({"image_size": 96}, "image_size: this instance"), ({"sigma": 2.0}, "sigma"),
                          ({"image_score": "classifier"}, "image_score")]:
        with pytest.raises(ModelFileError, match=f"trained with other settings.*{words}.*load_from_path"):
            make_ssn(**kwargs).load_from_path(run_dir)
