"""STFPM: the paper's loss and map, a frozen teacher beside a training student, the offline
teacher fallback, saving and loading, a traceable forward and a run through the engine."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectscope.backbones import WeightsNotFoundError
from defectscope.models import MODELS, Stfpm, create_model, load_model
from defectscope.models.stfpm import (
    BackboneFallbackNotice,
    default_layers,
    fallback_layers,
    pyramid_loss,
    random_crop,
)

RESNET18_FILE = "resnet18-f37072fd.pth"


@pytest.fixture(autouse=True)
def isolated_caches(empty_weight_caches):
    """No test sees (or fills) the machine's torch hub / Hugging Face caches."""
    return empty_weight_caches


def images(n=2, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_resnet18(**kwargs) -> Stfpm:
    """ResNet-18 teacher and student, both random (the teacher differs on every build)."""
    torch.manual_seed(0)
    return Stfpm(pretrained=False, image_size=64, **kwargs)


def fallback_model(**kwargs) -> Stfpm:
    """The offline default: no resnet18 weights, so the packaged EfficientNet-Lite0 teacher."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackboneFallbackNotice)
        return Stfpm(image_size=64, **kwargs)


def write_resnet18_weights(path):
    """A resnet18 state dict of random values in timm naming, saved as a .pth."""
    import timm

    generator = torch.Generator().manual_seed(0)
    state = {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in timm.create_model("resnet18", pretrained=False).state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def perturb_student_statistics(model: Stfpm) -> None:
    """Non-trivial batch-norm statistics and map scale, so that they must be saved and loaded."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.student.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
        model.map_scale.fill_(0.3)


# ---- the formulas --------------------------------------------------------------------------
def test_loss_equals_a_loop_over_layers_and_positions():
    model = random_resnet18(hard_fraction=1.0, translate=0.0).double()
    model.train()
    x = images(3).double()
    teacher = [m.detach() for m in model.feature_extractor(x).values()]
    features = model.extract_features(x)
    loss = model.training_step_images(x, features)
    student = [m.detach() for m in model.student(x)]  # the same maps: no batch norm update matters here

    expected = 0.0
    for t, s in zip(teacher, student):
        b, _, h, w = t.shape
        for k in range(b):
            per_image = 0.0
            for i in range(h):
                for j in range(w):
                    tv, sv = t[k, :, i, j], s[k, :, i, j]
                    diff = tv / tv.norm() - sv / sv.norm()
                    per_image += float((diff * diff).sum())
            expected += per_image / (2 * h * w)  # summed over the batch (the default)
    assert len(teacher) == 3
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert pyramid_loss(teacher, student).item() == pytest.approx(expected, rel=1e-9)
    assert pyramid_loss(teacher, student, "mean").item() == pytest.approx(expected / len(x), rel=1e-9)
    with pytest.raises(ValueError, match="batch_reduction must be 'sum' or 'mean'"):
        pyramid_loss(teacher, student, "max")


def test_validation_loss_is_each_images_loss_with_every_position_and_no_shift():
    model = random_resnet18(hard_fraction=0.1, translate=0.25).double().eval()
    x = images(3).double()
    losses = model.validation_loss(x)
    assert losses.shape == (3,)
    teacher = list(model.feature_extractor(x).values())
    student = model.student(x)
    for k in range(3):
        # The paper's loss of that image alone (all positions: hard_fraction is a training choice).
        one = pyramid_loss([t[k:k + 1] for t in teacher], [m[k:k + 1] for m in student])
        assert losses[k].item() == pytest.approx(one.item(), rel=1e-9)
    # A student that is the teacher has nothing to learn: zero loss.
    model.student.load_state_dict(model.feature_extractor.model.state_dict())
    assert model.validation_loss(x).abs().max().item() < 1e-12


def test_hard_fraction_averages_the_worst_fitted_positions_of_each_layer():
    generator = torch.Generator().manual_seed(3)
    teacher = [torch.randn(4, 8, 6, 6, generator=generator), torch.randn(4, 16, 3, 3, generator=generator)]
    student = [torch.randn(t.shape, generator=generator, requires_grad=True) for t in teacher]
    fraction = 0.1

    # Reference: numpy, every position's distance by its own formula, sorted, the top ceil(10 %).
    expected = 0.0
    for t, s in zip(teacher, student):
        tn = t.numpy() / np.linalg.norm(t.numpy(), axis=1, keepdims=True)
        sv = s.detach().numpy()
        sn = sv / np.linalg.norm(sv, axis=1, keepdims=True)
        distances = np.sort((0.5 * ((tn - sn) ** 2).sum(axis=1)).ravel())[::-1]
        expected += distances[: math.ceil(fraction * distances.size)].mean()
    loss = pyramid_loss(teacher, student, "mean", hard_fraction=fraction)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert pyramid_loss(teacher, student, "sum", hard_fraction=fraction).item() == pytest.approx(4 * expected, rel=1e-5)
    # Only the chosen positions learn: 15 of 144 and 4 of 36 positions get a gradient.
    loss.backward()
    moved = [int((s.grad.abs().sum(dim=1) > 0).sum()) for s in student]
    assert moved == [math.ceil(fraction * 144), math.ceil(fraction * 36)]
    # All positions: the paper's loss.
    every_position = sum(float(0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1).mean())
                         for t, s in zip(teacher, student))
    assert pyramid_loss(teacher, student, "mean", hard_fraction=1.0).item() == pytest.approx(every_position, rel=1e-5)
    assert every_position < expected
    with pytest.raises(ValueError, match="hard_fraction must be in"):
        pyramid_loss(teacher, student, hard_fraction=0)
    with pytest.raises(ValueError, match="hard_fraction"):
        random_resnet18(hard_fraction=1.5)


def test_random_crop_takes_each_image_at_its_own_offset_without_padding():
    x = images(6, size=16)
    torch.manual_seed(0)
    cropped = random_crop(x, 0.25)
    assert cropped.shape == (6, 3, 12, 12)
    # Reference: every 12x12 window of the image itself, by brute force (no padded pixels allowed).
    offsets = []
    for k in range(len(x)):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(x[k, :, dy:dy + 12, dx:dx + 12], cropped[k])]
        assert found, f"image {k} is not a window of its own pixels"
        offsets.append(found[0])
    # Independent offsets per image.
    assert len(set(offsets)) > 1
    assert torch.equal(random_crop(x, 0.0), x)
    assert torch.equal(random_crop(x, 0.05), x)  # under a pixel at 16 px
    assert random_crop(images(2, size=4), 1.0).shape[-2:] == (1, 1)  # keeps at least one pixel


def test_translate_trains_on_the_teacher_maps_of_the_shifted_images():
    model = random_resnet18(translate=0.125, translate_max_images=3).double()
    model.train()
    x = images(3).double()
    model.fit_feature_statistics(model.extract_features(x))  # 3 training images: a small set
    assert bool(model.translate_on)
    torch.manual_seed(5)
    loss = model.training_step_images(x, torch.zeros(3, 1).double())  # cached features are not used
    torch.manual_seed(5)
    shifted = random_crop(x, 0.125)
    assert shifted.shape[-1] < x.shape[-1]
    teacher = [m.detach() for m in model.feature_extractor(shifted).values()]
    student = [m.detach() for m in model.student(shifted)]
    assert loss.item() == pytest.approx(pyramid_loss(teacher, student).item(), rel=1e-9)
    assert model.hparams["translate"] == 0.125
    # The decision is saved with the weights (a resumed training keeps it).
    assert model.state_dict()["translate_on"].item() is True
    # A set larger than translate_max_images, or translate=0: the cached maps, no shift.
    model.fit_feature_statistics(torch.zeros(4, 1))
    assert not bool(model.translate_on)
    features = model.extract_features(x)
    assert model.training_step_images(x, features).item() == pytest.approx(
        pyramid_loss([m.detach() for m in model.feature_extractor(x).values()], model.student(x)).item(), rel=1e-9)
    off = random_resnet18(translate=0.0, translate_max_images=10)
    off.fit_feature_statistics(torch.zeros(3, 1))
    assert not bool(off.translate_on)
    with pytest.raises(ValueError, match="translate"):
        random_resnet18(translate=0.75)
    with pytest.raises(ValueError, match="translate_max_images"):
        random_resnet18(translate_max_images=-1)


def test_map_is_the_product_of_upscaled_layer_maps():
    model = random_resnet18(post_processor=False).eval()
    x = images(2)
    with torch.no_grad():
        maps, scores = model(x)
        teacher = list(model.feature_extractor(x).values())
        student = model.student(x)
    expected = torch.ones(2, 1, 64, 64)
    for t, s in zip(teacher, student):
        # For unit vectors 0.5 * ||a - b||^2 = 1 - cos(a, b): an independent way to the same map.
        layer = 1 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)
        expected = expected * F.interpolate(layer, size=(64, 64), mode="bilinear", align_corners=False)
    assert maps.shape == (2, 1, 64, 64) and scores.shape == (2,)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores, expected.flatten(1).amax(dim=1), rtol=1e-4, atol=1e-7)
    # The post-processor keeps the order and maps into [0, 1): raw / (raw + map_scale).
    model.post_processor = True
    model.map_scale.fill_(0.2)
    with torch.no_grad():
        post_maps, post_scores = model(x)
    torch.testing.assert_close(post_maps, maps / (maps + 0.2))
    torch.testing.assert_close(post_scores, scores / (scores + 0.2))
    assert float(post_maps.max()) < 1


def test_cached_features_split_back_into_the_teacher_maps():
    model = fallback_model()
    x = images(2)
    features = model.extract_features(x)
    teacher = list(model.feature_extractor(x).values())
    assert features.shape == (2, sum(m[0].numel() for m in teacher))
    with torch.no_grad():
        parts = model.split_features(features, model.student(x))
    for part, t in zip(parts, teacher, strict=True):
        assert torch.equal(part, t)
    with pytest.raises(ValueError, match="cached teacher features.*cache folder"):
        model.split_features(features[:, :-1], teacher)


# ---- teacher and student -------------------------------------------------------------------
def test_teacher_stays_frozen_while_the_student_trains():
    model = fallback_model()
    teacher_before = {k: v.clone() for k, v in model.feature_extractor.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
    optimizer, scheduler = model.configure_optimizers(max_epochs=3)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.4, 0.9, 1e-4)
    assert {id(p) for p in group["params"]} == {id(p) for p in model.student.parameters()}

    model.train()
    assert model.student.training and not model.feature_extractor.training
    x = images(4)
    loss = model.training_step_images(x, model.extract_features(x))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.4  # constant schedule
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.feature_extractor.state_dict().items())
    changed = [k for k, v in model.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert "conv_stem.weight" in changed and "bn1.running_mean" in changed

    # In eval the student uses its running statistics: a forward changes nothing, and each
    # image's output does not depend on the others in the batch.
    model.eval()
    assert not model.student.training
    state = {k: v.clone() for k, v in model.student.state_dict().items()}
    with torch.no_grad():
        maps, scores = model(x)
        alone, _ = model(x[:1])
    assert all(torch.equal(v, state[k]) for k, v in model.student.state_dict().items())
    torch.testing.assert_close(alone, maps[:1], rtol=1e-5, atol=1e-6)


def test_save_and_load_give_identical_outputs(tmp_path):
    model = fallback_model(lr=0.1, momentum=0.5, weight_decay=1e-3)
    perturb_student_statistics(model)
    model.threshold.fill_(0.42)
    model.eval()
    model.save(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackboneFallbackNotice)  # the saved backbone is rebuilt directly
        loaded = Stfpm.load_from_path(tmp_path / "m")
        again = load_model(tmp_path / "m")
    assert isinstance(again, Stfpm)
    assert loaded.hparams == model.hparams
    assert (loaded.lr, loaded.momentum, loaded.weight_decay) == (0.1, 0.5, 1e-3)
    assert float(loaded.threshold) == pytest.approx(0.42) and float(loaded.map_scale) == pytest.approx(0.3)
    assert any(k.startswith("student.") for k in model.trained_state_dict())
    assert not any(k.startswith("feature_extractor.") for k in model.trained_state_dict())
    x = images(2, seed=3)
    with torch.no_grad():
        expected = model(x)
        for other in (loaded, again):
            for a, b in zip(other(x), expected):
                assert torch.equal(a, b)
    assert model.params()["backbone_fallback"] == {"requested": "resnet18", "used": "efficientnet_lite0"}


def test_a_model_saved_before_translate_existed_still_loads(tmp_path):
    """Files written before the translate settings and the translate_on buffer load unchanged."""
    import json

    from defectscope.models.model_files import CKPT_NAME, PARAMS_NAME, load_tensors, save_tensors

    model = fallback_model()
    model.eval()
    model.save(tmp_path / "m")
    params = json.loads((tmp_path / "m" / PARAMS_NAME).read_text())
    for key in ("translate", "translate_max_images"):
        params["hparams"].pop(key)
    (tmp_path / "m" / PARAMS_NAME).write_text(json.dumps(params))
    state = load_tensors(tmp_path / "m" / CKPT_NAME)
    assert state["state_dict"].pop("translate_on") is not None
    save_tensors(state, tmp_path / "m" / CKPT_NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackboneFallbackNotice)
        loaded = load_model(tmp_path / "m")
    x = images(2, seed=3)
    with torch.no_grad():
        for a, b in zip(loaded(x), model(x)):
            assert torch.equal(a, b)
    assert not bool(loaded.translate_on)


# ---- which teacher ---------------------------------------------------------------------------
def test_without_resnet18_weights_the_teacher_falls_back_with_a_notice(empty_weight_caches):
    torch_home, _ = empty_weight_caches
    with pytest.warns(BackboneFallbackNotice) as record:
        model = Stfpm(image_size=64)
    message = str(record[0].message)
    for part in ("'resnet18'", "'efficientnet_lite0'", RESNET18_FILE, str(torch_home / "hub" / "checkpoints"),
                 "weights='/path/to/", "allow_fallback=False", "Looked in"):
        assert part in message, part
    assert model.hparams["backbone"] == "efficientnet_lite0"
    # No layers named: the fallback's own STFPM layers, not ResNet-18's strides.
    assert model.hparams["layers"] == ["blocks.4", "blocks.6"] == default_layers("efficientnet_lite0")
    assert model.feature_extractor.strides == [16, 32]
    assert model.mean == (0.5, 0.5, 0.5)  # the fallback's own normalisation
    assert fallback_layers("resnet18", ["layer1", "layer2", "layer3"]) == ["blocks.1", "blocks.2", "blocks.4"]
    assert fallback_layers("resnet18", None) == ["blocks.2", "blocks.4"]  # resnet18's default layers
    # Named layers move to the fallback at the same strides.
    with pytest.warns(BackboneFallbackNotice):
        named = Stfpm(image_size=64, layers=("layer1", "layer2", "layer3"))
    assert named.hparams["layers"] == ["blocks.1", "blocks.2", "blocks.4"]
    assert named.feature_extractor.strides == [4, 8, 16]


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=RESNET18_FILE):
        Stfpm(image_size=64, allow_fallback=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackboneFallbackNotice)
        # A weights file the user names but that is missing is an error, never a silent switch.
        with pytest.raises(WeightsNotFoundError, match="does not exist"):
            Stfpm(image_size=64, weights=str(tmp_path / "missing.pth"))
        with pytest.raises(ValueError, match="Invalid layers.*layer9.*Valid layers"):
            Stfpm(image_size=64, layers=("layer1", "layer9"))
    with pytest.raises(ValueError, match="unknown layers"):
        fallback_layers("resnet18", ["layer9"])
    for bad in (dict(lr=0), dict(momentum=1.0), dict(weight_decay=-1e-4), dict(lr=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Stfpm(image_size=64, **bad)


def test_a_resnet18_weights_file_loads_as_teacher(tmp_path, empty_weight_caches):
    state = write_resnet18_weights(tmp_path / "teacher.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackboneFallbackNotice)
        model = Stfpm(image_size=64, weights=str(tmp_path / "teacher.pth"))
        torch_home, _ = empty_weight_caches
        write_resnet18_weights(torch_home / "hub" / "checkpoints" / RESNET18_FILE)
        cached = Stfpm(image_size=64)  # found in the torch hub cache: no fallback
    assert model.hparams["backbone"] == "resnet18"
    assert model.hparams["layers"] == ["layer1", "layer2", "layer3"]
    assert model.hparams["weights"] == str(tmp_path / "teacher.pth")
    assert "teacher.pth" in model.feature_extractor.weights_source
    assert torch.equal(model.feature_extractor.model.conv1.weight, state["conv1.weight"])
    assert cached.feature_extractor.fingerprint == model.feature_extractor.fingerprint
    assert model.params().get("backbone_fallback") is None
    # The student has the teacher's architecture but its own random start.
    assert model.student.conv1.weight.shape == state["conv1.weight"].shape
    assert not torch.equal(model.student.conv1.weight, state["conv1.weight"])


def test_registry():
    assert MODELS["stfpm"] is Stfpm
    assert isinstance(create_model("STFPM", pretrained=False, image_size=64), Stfpm)


# ---- export ----------------------------------------------------------------------------------
def test_forward_traces_without_data_dependent_control_flow():
    model = fallback_model()
    perturb_student_statistics(model)
    model.eval()
    x, other = images(2), images(2, seed=5) * 3
    with torch.no_grad():
        # torch.export fails on Python control flow that depends on tensor values (and is the
        # path to ONNX); the exported graph must then match eager on other inputs.
        exported = torch.export.export(model, (x,)).module()
        for inputs in (x, other):
            for a, b in zip(exported(inputs), model(inputs)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- the engine ------------------------------------------------------------------------------
def test_engine_fits_and_tests_stfpm(tmp_path, monkeypatch):
    from defectscope.data import make_synthetic_mvtec, mvtec_split
    from defectscope.engine import Engine

    make_synthetic_mvtec(tmp_path / "data", category="fabric", image_size=64, n_train=8, n_test_good=3,
                         n_test_defect=3, seed=0)
    split = mvtec_split(tmp_path / "data", "fabric")
    model = fallback_model()
    calls = []
    original = Stfpm.extract_features
    monkeypatch.setattr(Stfpm, "extract_features", lambda self, x: calls.append(len(x)) or original(self, x))
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    engine = Engine(results_path=tmp_path / "results", run_name="stfpm", max_epochs=2, batch_size=2,
                    accelerator="cpu", progress=False)
    fitted = engine.fit(model, split.train)
    # The teacher ran once per training image (the cache served both epochs); the rest of the
    # calls are none: calibration and the threshold use forward.
    assert sum(calls) == fitted.training_info["train_size"]
    assert not fitted.training and not fitted.student.training
    assert any(not torch.equal(v, student_before[k]) for k, v in fitted.student.state_dict().items())
    assert float(fitted.map_scale) != 1.0  # calibrated on the held-out good images
    metrics = engine.test(fitted, split.test, category="fabric", save_images=False)
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    loaded = load_model(engine.model_dir)
    x = images(2)
    with torch.no_grad():
        for a, b in zip(loaded(x), fitted(x)):
            assert torch.equal(a, b)


def test_calibrate_returns_the_scores_forward_gives_after_calibration():
    model = random_resnet18().eval()
    perturb_student_statistics(model)
    x = images(5)
    scores, map_max = model.calibrate(x[i:i + 2] for i in range(0, 5, 2))
    with torch.no_grad():
        maps, expected = model(x)
        raw_max = float(model.raw_outputs(x)[1].max())
    assert float(model.map_scale) == pytest.approx(raw_max, rel=1e-5)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(map_max, maps.amax(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)
    assert model.calibrate(iter(())) is None
