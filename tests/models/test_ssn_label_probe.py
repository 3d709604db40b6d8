"""SuperSimpleNet's label probe and fused image score: the probe is scikit-learn's logistic
regression, the fused score weighs its parts by how far each puts held-out-fitted defects from the
good images, calibrate() gives exactly forward()'s scores, and the model file keeps all of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from defectscope.models import SuperSimpleNet
from defectscope.models.supersimplenet import LabelProbe, cross_fitted_probe_logits, fusion_weights


def test_probe_solves_sklearns_logistic_regression():
    """C = 0.1 by default, and any C as scikit-learn solves it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 10))
    y = (x[:, 0] + 0.5 * x[:, 3] + rng.normal(scale=0.8, size=120) > 1.0).astype(float)
    weight, bias = LabelProbe.solve(torch.from_numpy(x), torch.from_numpy(y))
    reference = LogisticRegression(C=0.1, tol=1e-10, max_iter=10000).fit(x, y)
    np.testing.assert_allclose(weight.numpy(), reference.coef_[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(bias), reference.intercept_[0], rtol=1e-4, atol=1e-5)
    weight, bias = LabelProbe.solve(torch.from_numpy(x), torch.from_numpy(y), c=3.0)
    reference = LogisticRegression(C=3.0, tol=1e-10, max_iter=10000).fit(x, y)
    np.testing.assert_allclose(weight.numpy(), reference.coef_[0], rtol=1e-4, atol=1e-5)


def test_probe_pools_channel_means_then_top_one_percent_means():
    """Default: each channel's mean, then the mean of its top 1 % positions (a loop over images
    and channels with numpy's sort as the reference); "mean+max" as files from before it."""
    probe = LabelProbe(3)
    assert probe.pooling == "mean+top1%"
    features = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))  # 400 positions: top 4
    pooled = probe.pool(features)
    values = features.numpy().reshape(2, 3, -1)
    top = np.array([[np.sort(values[b, c])[-4:].mean() for c in range(3)] for b in range(2)])
    np.testing.assert_allclose(pooled[:, :3].numpy(), values.mean(axis=2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[:, 3:].numpy(), top, rtol=1e-5, atol=1e-6)
    # Fewer than 100 positions: the top one, i.e. the maximum.
    small = features[:, :, :5, :5]
    torch.testing.assert_close(probe.pool(small)[:, 3:], small.amax(dim=(2, 3)))
    maxima = probe.pool(features, "mean+max")
    torch.testing.assert_close(maxima[:, 3:], features.amax(dim=(2, 3)))
    probe.fit(pooled, torch.tensor([0.0, 1.0]))
    expected = pooled @ probe.linear.weight[0] + probe.linear.bias
    torch.testing.assert_close(probe(features), expected)
    probe.pooling = "mean+max"
    torch.testing.assert_close(probe(features), maxima @ probe.linear.weight[0] + probe.linear.bias)
    with pytest.raises(ValueError, match="pooling must be one of"):
        LabelProbe(3, pooling="max")


def test_cross_fitted_logits_score_each_defect_by_a_probe_fitted_without_its_fold():
    """Against scikit-learn refitted per fold by hand: defects 0..5 in 3 interleaved folds."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6))
    y = np.zeros(40)
    defects = np.arange(30, 36)
    y[defects] = 1
    x[defects] += 1.5
    got = cross_fitted_probe_logits(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(defects), folds=3)
    for k in range(3):
        fold = defects[k::3]
        keep = np.setdiff1d(np.arange(40), fold)
        reference = LogisticRegression(C=0.1, tol=1e-10, max_iter=10000).fit(x[keep], y[keep])
        np.testing.assert_allclose(got[k::3].numpy(), reference.decision_function(x[fold]), rtol=1e-4, atol=1e-4)


def test_fusion_weights_follow_each_parts_auroc_on_the_labelled_defects():
    good = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    # Map part: every defect above every good image (AUROC 1); probe part: defects at 1.5, 2.5
    # and 3 -> 2/4, 3/4 and 3.5/4 of the good images below (ties count half): AUROC 17/24.
    # Weights AUROC - 0.5: 12/24 and 5/24, normalised.
    defects = torch.tensor([[9.0, 1.5], [8.0, 2.5], [7.0, 3.0]])
    torch.testing.assert_close(fusion_weights(defects, good), torch.tensor([12 / 17, 5 / 17], dtype=torch.float64))
    # Checked against scikit-learn's AUROC.
    from sklearn.metrics import roc_auc_score

    labels = [0] * 4 + [1] * 3
    auc = [roc_auc_score(labels, torch.cat([good[:, i], defects[:, i]]).numpy()) - 0.5 for i in range(2)]
    torch.testing.assert_close(fusion_weights(defects, good), torch.tensor(auc, dtype=torch.float64) / sum(auc))
    # A part that ranks defects below the good images gets no weight.
    torch.testing.assert_close(fusion_weights(defects * torch.tensor([1.0, -1.0]), good),
                               torch.tensor([1.0, 0.0], dtype=torch.float64))
    # No defects, or neither part separates them: the map alone.
    for nothing in (None, torch.zeros(0, 2), torch.tensor([[-1.0, -9.0]])):
        torch.testing.assert_close(fusion_weights(nothing, good), torch.tensor([1.0, 0.0], dtype=torch.float64))


def _weakly_fitted(make_ssn, defects: int = 4, pretrained: bool = False):
    torch.manual_seed(0)
    model = make_ssn(pretrained=pretrained).eval()
    model.set_regime("weakly")
    images = torch.randn(8 + defects, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    images[8:, :, 20:40, 20:40] += 3  # the labelled defects differ from the good images
    features = model.extract_features(images)
    model.fit_feature_statistics(features)
    labels = torch.tensor([0.0] * 8 + [1.0] * defects)
    model.fit_on_training_features(features, labels)
    return model, images


def test_calibrate_gives_forwards_scores_and_map_maxima(make_ssn):
    model, images = _weakly_fitted(make_ssn)
    assert model.resolved_image_score == "fused"
    held_out = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    scores, map_max = model.calibrate(iter([held_out[:4], held_out[4:]]))
    center, scale, weight = model.fusion
    assert float(weight.sum()) == pytest.approx(1.0) and bool((weight >= 0).all())
    assert model.probe_info["fitted_on"] == {"good": 8, "defective": 4}
    with torch.no_grad():
        maps, forward_scores = model(held_out)
    torch.testing.assert_close(scores, forward_scores)
    torch.testing.assert_close(map_max, maps.amax(dim=(1, 2, 3)))
    # Centre and scale come from those images: their fused parts have mean 0 and std 1.
    with torch.no_grad():
        _, parts = model._map_and_parts(model.extract_features(held_out), (64, 64))
    z = (parts - center) / scale
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=0), torch.ones(2), atol=1e-5, rtol=0)


def test_fewer_than_two_labelled_defects_leave_the_map_alone(make_ssn):
    model, _ = _weakly_fitted(make_ssn, defects=1)
    assert model.probe_info == {}
    held_out = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    scores, _ = model.calibrate(iter([held_out]))
    torch.testing.assert_close(model.fusion[2], torch.tensor([1.0, 0.0]))
    with torch.no_grad():
        maps, _ = model(held_out)
    # Map weight 1: the score orders images as the map maximum does.
    assert np.array_equal(np.argsort(scores.numpy()), np.argsort(maps.amax(dim=(1, 2, 3)).numpy()))


def test_unsupervised_models_do_not_calibrate(make_ssn):
    torch.manual_seed(0)
    model = make_ssn(pretrained=False).eval()
    calls = []
    assert model.calibrate(iter(calls.append(1) or [])) is None
    assert model.resolved_image_score == "map_max"


def test_probe_and_fusion_survive_saving_and_loading(make_ssn, tmp_path):
    model, _ = _weakly_fitted(make_ssn, pretrained=True)  # the loaded backbone must match the saved one
    model.calibrate(iter([torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))]))
    model.save(tmp_path)
    loaded = SuperSimpleNet.load_from_path(tmp_path)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)[1], model(images)[1])
    assert loaded.probe_info["weights"] == model.probe_info["weights"]
    assert loaded.probe_info["pooling"] == loaded.label_probe.pooling == "mean+top1%"


def test_a_probe_fitted_before_the_top_one_percent_keeps_its_max_pooling(make_ssn, tmp_path):
    """Files whose probe was fitted with mean+max pooling record no pooling: they load with
    mean+max and score as before; a new fit takes the current pooling."""
    import json

    model, _ = _weakly_fitted(make_ssn, pretrained=True)
    model.label_probe.pooling = "mean+max"  # as the probe of an older file was fitted and scored
    model.calibrate(iter([torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))]))
    model.save(tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    del params["label_probe"]["pooling"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded = SuperSimpleNet.load_from_path(tmp_path)
    assert loaded.label_probe.pooling == "mean+max"
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)[1], model(images)[1])
    # A pooling this version does not know (a hand-edited or corrupt file): refused, named, with a fix.
    from defectscope.models import ModelFileError

    params["label_probe"]["pooling"] = "median"
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ModelFileError, match=r"label_probe pooling 'median'.*Fix:"):
        SuperSimpleNet.load_from_path(tmp_path)


def test_a_model_file_from_before_the_probe_loads_and_scores_by_its_map(make_ssn, tmp_path):
    from defectscope.models.model_files import load_tensors, save_tensors

    torch.manual_seed(0)
    model = make_ssn().eval()  # packaged weights: the loaded backbone must match
    model.save(tmp_path)
    state = load_tensors(tmp_path / "ckpt.pth", "model weights")
    state["state_dict"] = {k: v for k, v in state["state_dict"].items()
                           if not k.startswith(("label_probe.", "fusion"))}
    save_tensors(state, tmp_path / "ckpt.pth")
    loaded = SuperSimpleNet.load_from_path(tmp_path)
    torch.testing.assert_close(loaded.fusion[2], torch.tensor([1.0, 0.0]))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)[1], model(images)[1])
