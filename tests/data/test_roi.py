"""Regions of interest (defectscope/data/roi.py and AnomalyModel.set_roi / apply_roi)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from _cli_helpers import single_thread  # noqa: F401 (an autouse fixture)
from PIL import Image

from defectscope.data import DataError, DataNotice
from defectscope.data.images import reset_notices
from defectscope.data.roi import RoiSet, configure_roi, read_roi


@pytest.fixture(autouse=True)
def fresh_notices():
    reset_notices()
    yield
    reset_notices()


def _ssn(**kwargs):
    from defectscope.models import SuperSimpleNet

    return SuperSimpleNet(backbone="efficientnet_lite0", image_size=64, **kwargs)


def _left_roi(size: int = 64, width: int = 40) -> np.ndarray:
    roi = np.zeros((size, size), bool)
    roi[:, :width] = True
    return roi


def _textures(n: int, seed: int) -> torch.Tensor:
    """Plain grey parts with a little texture, pixel values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = 0.45 + 0.05 * torch.rand(n, 3, 1, 1, generator=g)
    return (base + 0.04 * torch.randn(n, 3, 64, 64, generator=g)).clamp(0, 1)


def _with_fixture(images: torch.Tensor, seed: int) -> torch.Tensor:
    """A bright square, of another size and place in each image, in the right-hand quarter
    (outside the ROI of :func:`_left_roi`, 8 px or more from its border)."""
    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    for i in range(len(out)):
        side = int(torch.randint(6, 14, (1,), generator=g))
        top = int(torch.randint(0, 64 - side, (1,), generator=g))
        left = int(torch.randint(48, 64 - side + 1, (1,), generator=g))
        out[i, :, top : top + side, left : left + side] = 1.0
    return out


def _normalise(model, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.fixture(scope="module")
def roi_trained_ssn():
    """A SuperSimpleNet trained briefly (20 steps on 12 plain images) with the left-hand ROI."""
    torch.manual_seed(0)
    model = _ssn()
    model.set_roi(_left_roi())
    feats = model.extract_features(_normalise(model, _textures(12, seed=1)))
    model.fit_feature_statistics(feats)
    optimizer, _ = model.configure_optimizers(10)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randperm(12, generator=g)[:6]
        loss = model.training_step(feats[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# ---- the test: a bright fixture outside the ROI -------------------------------------
def test_fixture_outside_roi_does_not_raise_scores_and_does_without_it(roi_trained_ssn):
    model = roi_trained_ssn
    clean = _normalise(model, _textures(6, seed=2))
    fixture = _normalise(model, _with_fixture(_textures(6, seed=2), seed=3))
    with torch.no_grad():
        _, s_clean = model(clean)
        maps_fix, s_fix = model(fixture)
        assert torch.allclose(s_fix, s_clean, atol=1e-5), (s_clean, s_fix)
        # The map is zero outside the ROI, and the score is its maximum inside.
        assert float(maps_fix[..., 40:].abs().max()) == 0.0
        assert torch.allclose(s_fix, maps_fix.amax(dim=(1, 2, 3)))
        # The same model without its ROI: the fixture raises every score, clearly (so the
        # assertion above can fail).
        info, roi = dict(model.roi_info), model.roi.clone()
        model.set_roi(None)
        try:
            _, n_clean = model(clean)
            _, n_fix = model(fixture)
        finally:
            model.roi.copy_(roi)
            model.roi_info = info
    assert bool((n_fix > n_clean + 0.1).all()), (n_clean, n_fix)


def test_training_puts_no_synthetic_noise_outside_the_roi():
    torch.manual_seed(0)
    model = _ssn()
    model.set_roi(_left_roi(width=32))
    feats = model.extract_features(torch.zeros(4, 3, 64, 64))
    torch.manual_seed(1)
    _, _, targets, _, _ = model.training_forward(feats)
    grid = model.roi_grid(*targets.shape[-2:])
    assert float(targets.sum()) > 0
    assert float((targets * (1 - grid)).sum()) == 0.0


def test_simplenet_noise_rows_only_inside_the_roi(monkeypatch):
    from defectscope.models import SimpleNet

    torch.manual_seed(0)
    model = SimpleNet(pretrained=False, resize=64, imagesize=64, pretrain_embed_dimension=32,
                      target_embed_dimension=32, embedding_size=32)
    model.set_roi(_left_roi(width=32))
    feats = model.extract_features(torch.zeros(2, 3, 64, 64))
    seen = {}
    original = model.loss

    def spy(true_scores, fake_scores):
        seen["true"], seen["fake"] = len(true_scores), len(fake_scores)
        return original(true_scores, fake_scores)

    monkeypatch.setattr(model, "loss", spy)
    model.training_step(feats)
    inside = int(model.roi_grid(*feats.shape[-2:]).sum())
    assert seen["true"] == 2 * feats.shape[-2] * feats.shape[-1]
    assert seen["fake"] == 2 * inside < seen["true"]


# ---- saving and loading ---------------------------------------------------------------------
def test_roi_saved_and_loaded_with_the_model(tmp_path, roi_trained_ssn):
    from defectscope.models import load_model

    model = roi_trained_ssn
    model.save(tmp_path / "m")
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["roi"]["set"] is True and params["roi"]["source"] == "array"
    assert 0.6 < params["roi"]["coverage"] < 0.65
    loaded = load_model(tmp_path / "m")
    assert loaded.has_roi and torch.equal(loaded.roi, model.roi)
    x = _normalise(model, _with_fixture(_textures(2, seed=5), seed=6))
    with torch.no_grad():
        a, sa = model(x)
        b, sb = loaded(x)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(sa, sb, atol=1e-6)


def test_model_without_roi_saves_none_and_older_checkpoints_load(tmp_path):
    from defectscope.models import load_model

    torch.manual_seed(0)
    model = _ssn()
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "params.json").read_text())["roi"] is None
    # A checkpoint written before ROIs existed has no "roi" tensor: it loads, with no ROI.
    ckpt = torch.load(tmp_path / "m" / "ckpt.pth", weights_only=True)
    del ckpt["state_dict"]["roi"]
    torch.save(ckpt, tmp_path / "m" / "ckpt.pth")
    loaded = load_model(tmp_path / "m")
    assert not loaded.has_roi and bool((loaded.roi == 1).all())


# ---- mask files -----------------------------------------------------------------------------
def _save(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def test_mask_of_another_size_is_resized_with_a_notice(tmp_path):
    path = _save(tmp_path / "roi.png", _left_roi(32, 20) * 255)
    model = _ssn()
    with pytest.warns(DataNotice, match=r"roi.png is 32x32 .* images are 64x64; it is resized"):
        model.set_roi(path, image_size=(64, 64))
    assert model.roi_info["source"].endswith("roi.png")
    assert bool((model.roi[0, 0, :, :40] == 1).all()) and int(model.roi[0, 0, :, 40:].sum()) == 0


def test_mask_of_the_images_size_says_nothing(tmp_path):
    path = _save(tmp_path / "roi.png", _left_roi() * 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataNotice)
        _ssn().set_roi(path, image_size=(64, 64))


def test_empty_and_unreadable_masks_are_refused_naming_the_file(tmp_path):
    empty = _save(tmp_path / "empty.png", np.zeros((8, 8)))
    with pytest.raises(DataError, match=r"empty.png is empty.*Fix: paint"):
        read_roi(empty)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        read_roi(broken)
    with pytest.raises(DataError, match="missing.png"):
        _ssn().set_roi(tmp_path / "missing.png")


def test_grey_levels_are_thresholded_with_a_notice(tmp_path):
    array = np.zeros((8, 8), np.uint8)
    array[:, :4] = 250
    array[0, 0] = 90  # a JPEG-like stray level, under half the maximum
    path = _save(tmp_path / "grey.png", array)
    with pytest.warns(DataNotice, match="grey levels"):
        inside = read_roi(path)
    assert inside[:, 1:4].all() and not inside[0, 0] and not inside[:, 4:].any()


# ---- per-image masks ------------------------------------------------------------------------
def test_per_image_masks_and_the_fallback_said_once(tmp_path):
    folder = tmp_path / "rois"
    folder.mkdir()
    _save(folder / "a.png", _left_roi(64, 16) * 255)
    rois = RoiSet(folder, default_name="the data-set ROI (roi.png)")
    with pytest.warns(DataNotice) as caught:
        batch = rois.batch([tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"], (64, 64))
    messages = [str(w.message) for w in caught if "has no mask" in str(w.message)]
    assert len(messages) == 1 and "b.png" in messages[0] and "the data-set ROI (roi.png)" in messages[0]
    assert batch.shape == (3, 1, 64, 64)
    assert float(batch[0, 0, :, :16].min()) == 1 and float(batch[0, 0, :, 16:].max()) == 0
    assert bool((batch[1:] == 1).all())  # the model's own ROI still applies in its forward


def test_per_image_roi_applied_after_the_forward_within_the_models(roi_trained_ssn):
    model = roi_trained_ssn
    x = _normalise(model, _with_fixture(_textures(2, seed=7), seed=8))
    per_image = torch.ones(2, 1, 64, 64)
    per_image[0, :, :, 20:] = 0  # the first image's own ROI: the left 20 columns
    with torch.no_grad():
        maps, scores = model(x)
        masked, masked_scores = model.apply_roi(maps, scores, roi=per_image)
    assert float(masked[0, :, :, 20:].abs().max()) == 0
    assert torch.isclose(masked_scores[0], maps[0, :, :, :20].amax())
    assert torch.equal(masked[1], maps[1]) and torch.isclose(masked_scores[1], scores[1])


def test_configure_roi_sets_the_model_and_builds_the_per_image_set(tmp_path):
    from defectscope.data import Sample

    image = tmp_path / "img.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(image)
    roi = _save(tmp_path / "roi.png", _left_roi() * 255)
    folder = tmp_path / "rois"
    folder.mkdir()
    _save(folder / "img.png", _left_roi(64, 8) * 255)
    model = _ssn()
    rois = configure_roi(model, roi, folder, [Sample(path=image, label=0)])
    assert model.has_roi and isinstance(rois, RoiSet) and "roi.png" in rois.default_name
    with pytest.raises(DataError, match="no mask images"):
        configure_roi(_ssn(), None, _empty_dir(tmp_path))


def _empty_dir(tmp_path):
    folder = tmp_path / "empty_rois"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.mark.parametrize("name", ["stfpm", "efficientad", "simplenet", "supersimplenet-classifier"])
def test_other_models_zero_the_map_outside_and_score_inside(name, tmp_path):
    """Untrained, but the ROI path is the same: maps zero outside, score = max inside, and the
    image outside the ROI cannot change anything (it never reaches the networks)."""
    from defectscope.models import create_model
    from defectscope.models.efficientad import PDN

    torch.manual_seed(0)
    if name == "supersimplenet-classifier":  # its score is the classification head's, kept with a ROI
        model = _ssn(image_score="classifier").eval()
    elif name == "efficientad":
        teacher = tmp_path / "teacher_s.pth"
        torch.save(PDN("s").state_dict(), teacher)
        model = create_model(name, image_size=64, teacher_weights=str(teacher)).eval()
    else:
        kwargs = {"stfpm": dict(image_size=64, pretrained=False),
                  "simplenet": dict(pretrained=False, resize=64, imagesize=64, pretrain_embed_dimension=32,
                                    target_embed_dimension=32, embedding_size=32)}[name]
        model = create_model(name, **kwargs).eval()
    model.set_roi(_left_roi())
    clean = _normalise(model, _textures(2, seed=9))
    fixture = _normalise(model, _with_fixture(_textures(2, seed=9), seed=10))
    with torch.no_grad():
        maps, scores = model(clean)
        maps_fix, scores_fix = model(fixture)
    assert float(maps[..., 40:].abs().max()) == 0.0
    if name == "supersimplenet-classifier":
        assert not torch.allclose(scores, maps.amax(dim=(1, 2, 3)))  # not replaced by the map maximum
    else:
        assert torch.allclose(scores, maps.amax(dim=(1, 2, 3)))
    assert torch.allclose(maps, maps_fix, atol=1e-6) and torch.allclose(scores, scores_fix, atol=1e-6)
