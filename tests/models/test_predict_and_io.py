"""``score, map = model.predict(image)`` on every input form, and saving / loading a model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.data import DataError
from defectscope.models import AnomalyModel, ModelFileError, SuperSimpleNet, load_model, model_files
from defectscope.models.base import atomic_save


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An RGB (72x80) and a grey (70x90) PNG, neither the model's 64x64 input size."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:72, 0:80]
    rgb = np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
    rgb[20:34, 30:50] = rng.integers(0, 256, size=(14, 20, 3))  # a "defect"
    grey = rng.integers(0, 256, size=(70, 90)).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(grey, mode="L").save(folder / "grey.png")
    return {"rgb_path": folder / "rgb.png", "grey_path": folder / "grey.png", "rgb": rgb, "grey": grey}


def _check(result, shape):
    score, anomaly_map = result
    assert isinstance(score, float)
    assert isinstance(anomaly_map, np.ndarray) and anomaly_map.shape == shape
    assert 0 <= score <= 1 and anomaly_map.min() >= 0 and anomaly_map.max() <= 1
    return score, anomaly_map


def test_predict_accepts_every_rgb_form_with_the_same_result(pretrained_ssn, images):
    rgb = images["rgb"]
    forms = {
        "str path": str(images["rgb_path"]),
        "Path": images["rgb_path"],
        "PIL": Image.fromarray(rgb),
        "numpy uint8": rgb,
        "numpy float": rgb.astype(np.float32) / 255,
        "tensor": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
        "PIL RGBA": Image.fromarray(rgb).convert("RGBA"),
    }
    results = {name: _check(pretrained_ssn.predict(form), (72, 80)) for name, form in forms.items()}
    ref_score, ref_map = results["str path"]
    for name, (score, anomaly_map) in results.items():
        assert score == pytest.approx(ref_score, abs=1e-6), name
        np.testing.assert_allclose(anomaly_map, ref_map, atol=1e-6, err_msg=name)
    assert ref_map.std() > 0  # a real map, not a constant


def test_predict_accepts_every_grey_form_with_the_same_result(pretrained_ssn, images):
    grey = images["grey"]
    forms = {
        "path": images["grey_path"],
        "PIL L": Image.fromarray(grey, mode="L"),
        "numpy HxW uint8": grey,
        "numpy HxWx1": grey[:, :, None],
        "tensor 1xHxW": torch.from_numpy(grey)[None].float() / 255,
        "as RGB": np.repeat(grey[:, :, None], 3, axis=2),
    }
    results = {name: _check(pretrained_ssn.predict(form), (70, 90)) for name, form in forms.items()}
    ref_score, ref_map = results["as RGB"]
    for name, (score, anomaly_map) in results.items():
        assert score == pytest.approx(ref_score, abs=1e-6), name
        np.testing.assert_allclose(anomaly_map, ref_map, atol=1e-6, err_msg=name)


def test_predict_batch_tensor_matches_single_images(pretrained_ssn, images):
    rgb = torch.from_numpy(images["rgb"]).permute(2, 0, 1).float() / 255
    batch = torch.stack([rgb, rgb.flip(-1)])
    scores, maps = pretrained_ssn.predict(batch)
    assert scores.shape == (2,) and maps.shape == (2, 72, 80)
    for i in range(2):
        score, anomaly_map = pretrained_ssn.predict(batch[i])
        assert scores[i] == pytest.approx(score, abs=1e-5)  # batched vs single: rounding only
        np.testing.assert_allclose(maps[i], anomaly_map, atol=1e-5)


def test_predict_keeps_training_mode_and_rejects_bad_input(make_ssn):
    model = make_ssn(pretrained=False).train()
    model.predict(np.zeros((40, 40, 3), dtype=np.uint8))
    assert model.training
    with pytest.raises(TypeError, match="path, PIL image, numpy array or tensor"):
        model.predict([1, 2, 3])
    with pytest.raises(ValueError, match="channels"):
        model.predict(torch.zeros(2, 5, 40, 40))


def test_predict_missing_file_names_it(pretrained_ssn, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(DataError) as info:
        pretrained_ssn.predict(missing)
    assert str(missing) in str(info.value)


# ---- save / load -----------------------------------------------------------------------------


@pytest.fixture
def trained_like(make_ssn):
    """A model whose trained parts are all non-default (random weights, fitted statistics,
    BatchNorm statistics and a threshold), so a lost tensor shows in the outputs."""
    torch.manual_seed(0)
    model = make_ssn()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.fit_feature_statistics(torch.randn(4, 152, 8, 8, generator=generator) * 4 + 2)
        for tensor in model.trained_state_dict().values():
            if tensor.is_floating_point() and tensor.dim() > 0:
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
        for module in model.segdec.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    model.threshold.fill_(0.42)
    return model.eval()


def test_save_then_load_from_path_gives_identical_outputs(trained_like, make_ssn, images, tmp_path):
    run_dir = tmp_path / "results" / "p" / "g" / "run"
    model_dir = trained_like.save(run_dir / "models" / "0")
    assert sorted(p.name for p in model_dir.iterdir()) == ["ckpt.pth", "params.json"]
    checkpoint = torch.load(model_dir / "ckpt.pth", weights_only=True)
    assert not any(k.startswith("feature_extractor.") for k in checkpoint["state_dict"])  # no frozen backbone

    ref_score, ref_map = trained_like.predict(images["rgb_path"])
    from_class = SuperSimpleNet.load_from_path(run_dir)
    from_instance = make_ssn()
    assert from_instance.load_from_path(run_dir) is from_instance
    variants = {
        "class": from_class,
        "instance": from_instance,
        "load_model": load_model(run_dir),
        "AnomalyModel": AnomalyModel.load_from_path(model_dir),
        "ckpt file": SuperSimpleNet.load_from_path(model_dir / "ckpt.pth"),
        "models folder": SuperSimpleNet.load_from_path(run_dir / "models"),
    }
    for name, loaded in variants.items():
        assert isinstance(loaded, SuperSimpleNet), name
        assert not loaded.training, name
        assert loaded.hparams == trained_like.hparams, name
        assert float(loaded.threshold) == pytest.approx(0.42), name
        score, anomaly_map = loaded.predict(images["rgb_path"])
        assert score == ref_score, name
        np.testing.assert_array_equal(anomaly_map, ref_map, err_msg=name)
        for key, tensor in trained_like.trained_state_dict().items():
            assert torch.equal(loaded.trained_state_dict()[key], tensor), (name, key)


def test_load_from_empty_folder_names_it(tmp_path):
    empty = tmp_path / "empty run"
    empty.mkdir()
    for load in (SuperSimpleNet.load_from_path, load_model):
        with pytest.raises(FileNotFoundError) as info:
            load(empty)
        assert str(empty) in str(info.value)


def test_backbone_fingerprint_mismatch_raises(trained_like, make_ssn, tmp_path):
    model_dir = trained_like.save(tmp_path / "models" / "0")
    # An instance built with other backbone weights (random) is refused: other settings.
    other = make_ssn(pretrained=False)
    with pytest.raises(ModelFileError, match="pretrained: this instance False, saved True"):
        other.load_from_path(model_dir)
    # A checkpoint recorded with other weights than the ones found now.
    params = json.loads((model_dir / "params.json").read_text())
    params["backbone_fingerprint"] = "0" * 16
    (model_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(ModelFileError, match="backbone weights"):
        SuperSimpleNet.load_from_path(model_dir)


def test_load_into_a_model_of_another_shape_raises(trained_like, make_ssn, tmp_path):
    model_dir = trained_like.save(tmp_path / "models" / "0")
    other = make_ssn(standardize_features=False)  # no standardiser buffers
    with pytest.raises(ModelFileError, match="standardize_features: this instance False, saved True"):
        other.load_from_path(model_dir)
    # Weights that do not fit the architecture the settings build.
    state = torch.load(model_dir / "ckpt.pth", weights_only=True)
    del state["state_dict"]["adaptor.weight"]
    torch.save(state, model_dir / "ckpt.pth")
    with pytest.raises(ModelFileError, match="does not fit"):
        SuperSimpleNet.load_from_path(model_dir)


@pytest.mark.parametrize("use_torch", [True, False])
def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch, use_torch):
    path = tmp_path / ("state.pth" if use_torch else "params.json")
    atomic_save({"version": 1, "x": torch.arange(5) if use_torch else list(range(5))}, path, use_torch=use_torch)
    before = path.read_bytes()

    def broken(fd):
        raise OSError("disk full")  # after the new bytes went into the temporary file

    monkeypatch.setattr(model_files.os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"version": 2}, path, use_torch=use_torch)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    monkeypatch.undo()
    loaded = torch.load(path, weights_only=True) if use_torch else json.loads(Path(path).read_text())
    assert loaded["version"] == 1
