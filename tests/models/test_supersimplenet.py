"""SuperSimpleNet: constructor, training forward (synthetic anomalies, masks, labels), heads,
loss and optimiser. Checked against the reference (anomalib / official SSN) behaviour."""

from __future__ import annotations

import inspect
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectscope.backbones import WeightsNotFoundError, get_backbone_config
from defectscope.models import SuperSimpleNet, create_model
from defectscope.models.supersimplenet import truncated_l1

CHANNELS = 40 + 112  # efficientnet_lite0 blocks.2 + blocks.4


def _features(batch: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CHANNELS, size, size, generator=generator) * 3 + 1


@pytest.fixture
def random_ssn(make_ssn):
    """Factory: random-backbone SuperSimpleNet (weights do not matter for these tests)."""

    def build(**kwargs):
        torch.manual_seed(0)
        return make_ssn(pretrained=False, **kwargs)

    return build


class _HeadInputs:
    """Records what the segmentation-detection head receives."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.segdec.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls.append(tuple(None if a is None else a.detach().clone() for a in args))

    def close(self):
        self.handle.remove()


# ---- constructor -----------------------------------------------------------------------------


def test_constructor_defaults_match_anomalib():
    params = inspect.signature(SuperSimpleNet.__init__).parameters
    expected = dict(
        perlin_threshold=0.2,
        backbone="wide_resnet50_2.tv_in1k",
        supervised=False,
        adapt_cls_features=False,
        pre_processor=True,
        post_processor=True,
        evaluator=True,
        visualizer=True,
        image_size=256,
    )
    for name, default in expected.items():
        assert name in params, name
        assert params[name].default == default, (name, params[name].default)
    # layers=None means the backbone's own default, which for WideResNet-50 is the reference pair.
    assert params["layers"].default is None
    assert tuple(get_backbone_config("wide_resnet50_2.tv_in1k").default_layers) == ("layer2", "layer3")


def test_default_backbone_without_weights_fails_fast(empty_weight_caches):
    started = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        SuperSimpleNet()
    elapsed = time.perf_counter() - started
    assert elapsed < 30, f"took {elapsed:.1f} s to report missing weights"
    message = str(info.value)
    assert "wide_resnet50_2" in message
    assert "efficientnet_lite0" in message  # the offline alternative is named
    assert str(empty_weight_caches[0]) in message  # where it looked


def test_constructor_validates_arguments(random_ssn):
    with pytest.raises(ValueError, match="perlin_threshold"):
        random_ssn(perlin_threshold=1.5)
    with pytest.raises(ValueError, match="noise_std"):
        random_ssn(noise_std=0)
    with pytest.raises(ValueError, match="image_size"):
        random_ssn(image_size=16)


def test_supervised_switches_stop_grad_and_clipping(random_ssn):
    unsupervised, supervised = random_ssn(), random_ssn(supervised=True)
    assert unsupervised.segdec.stop_grad and unsupervised.grad_clip is None
    assert not supervised.segdec.stop_grad and supervised.grad_clip is None
    reference = random_ssn(supervised=True, supervised_grad_clip=1.0)
    assert reference.grad_clip == 1.0 and random_ssn(supervised_grad_clip=1.0).grad_clip is None


def test_create_model_by_name(random_ssn):
    model = create_model("Super-Simple_Net", backbone="efficientnet_lite0", image_size=64, pretrained=False)
    assert isinstance(model, SuperSimpleNet)
    with pytest.raises(ValueError, match="supersimplenet"):
        create_model("supersimplnet")


# ---- training forward ------------------------------------------------------------------------


def test_training_forward_shapes_duplicate_the_batch(random_ssn):
    model = random_ssn(train_unused_classifier=True).train()
    features = _features(batch=3, size=8)
    map_logits, score_logits, masks, labels, _ = model.training_forward(features)
    assert map_logits.shape == (6, 1, 8, 8)
    assert score_logits.shape == (6,)
    assert masks.shape == (6, 1, 8, 8)
    assert labels.shape == (6,)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_labels_are_one_exactly_where_the_noise_mask_is_non_empty(random_ssn):
    model = random_ssn().train()
    torch.manual_seed(3)
    _, _, masks, labels, _ = model.training_forward(_features(batch=8, size=8))
    non_empty = (masks.flatten(1).sum(dim=1) > 0).float()
    assert torch.equal(labels, non_empty)
    assert 0 < labels.sum() < len(labels)  # both kinds present in 16 copies


def test_noise_is_added_only_inside_the_masks(random_ssn):
    model = random_ssn().train()
    # The plain path builds the noisy copies and hands them to the head (the fused path, which
    # never builds them, is checked against it in test_fused_training_matches_the_modules).
    model.segdec.fused = False
    features = _features(batch=6, size=8)
    heads = _HeadInputs(model)
    torch.manual_seed(4)
    _, _, masks, _, _ = model.training_forward(features)
    heads.close()
    seg_features, _ = heads.calls[0]
    with torch.no_grad():
        clean = model.adaptor(model.standardizer(features)).repeat(2, 1, 1, 1)
    changed = ((seg_features - clean).abs().amax(dim=1, keepdim=True) > 1e-6).float()
    assert torch.equal(changed, masks)
    assert masks.sum() > 0


def test_real_masks_are_kept_and_never_get_synthetic_noise(random_ssn):
    # Both heads run (the classifier trains), so the head's input can be recorded.
    model = random_ssn(supervised=True, train_unused_classifier=True).train()
    features = _features(batch=4, size=8)
    image_masks = torch.zeros(4, 1, 64, 64)
    image_masks[1, :, 8:40, 16:48] = 1  # a real defect in image 1
    labels = torch.tensor([0.0, 1.0, 0.0, 0.0])
    heads = _HeadInputs(model)
    torch.manual_seed(5)
    _, _, target_masks, target_labels, _ = model.training_forward(features, image_masks, labels)
    heads.close()
    real = model.downsample_mask(image_masks, 8, 8).repeat(2, 1, 1, 1)
    assert real.sum() > 0
    assert (target_masks >= real).all()  # the real defect stays in both copies
    assert target_labels[1] == 1 and target_labels[5] == 1
    # Synthetic noise lands only where there is no real defect.
    seg_features, _ = heads.calls[0]
    with torch.no_grad():
        clean = model.adaptor(model.standardizer(features)).repeat(2, 1, 1, 1)
    changed = (seg_features - clean).abs().amax(dim=1, keepdim=True) > 1e-6
    assert not changed[real.bool()].any()
    assert torch.equal(changed.float(), target_masks - real)


def test_downsample_mask_bilinear_then_half_rule():
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 32, 32, generator=generator) > 0.6).float()
    out = SuperSimpleNet.downsample_mask(masks, 16, 16)
    assert out.shape == (3, 1, 16, 16)
    # Halving with bilinear (half-pixel centres) averages each 2x2 block; >= 0.5 becomes 1.
    blocks = masks.numpy().reshape(3, 16, 2, 16, 2).mean(axis=(2, 4))
    np.testing.assert_array_equal(out[:, 0].numpy(), (blocks >= 0.5).astype(np.float32))
    # Exactly half a block is anomalous -> 1 (the reference's ">= 0.5", not "> 0.5").
    half = torch.zeros(1, 1, 2, 2)
    half[..., 0, :] = 1
    assert SuperSimpleNet.downsample_mask(half, 1, 1).item() == 1.0
    # Already at the feature size: only binarised.
    soft = torch.tensor([[[[0.2, 0.5], [0.7, 0.49]]]])
    assert SuperSimpleNet.downsample_mask(soft, 2, 2).flatten().tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("adapt_cls_features", [True, False])
def test_classification_features_icpr_vs_jims(random_ssn, adapt_cls_features):
    model = random_ssn(adapt_cls_features=adapt_cls_features, image_score="classifier").train()
    features = _features(batch=4, size=8)
    heads = _HeadInputs(model)
    torch.manual_seed(6)
    model.training_forward(features)
    model.eval()
    with torch.no_grad():
        model.forward_features(features, (64, 64))
    heads.close()
    (train_seg, train_cls), (eval_seg, eval_cls) = heads.calls
    with torch.no_grad():
        standardized = model.standardizer(features)
        adapted = model.adaptor(standardized)
    assert torch.allclose(eval_seg, adapted)
    if adapt_cls_features:  # ICPR: both heads see the adapted (and perturbed) features
        assert torch.equal(train_cls, train_seg)
        assert torch.allclose(eval_cls, adapted)
    else:  # JIMS: the classifier sees the standardised backbone features with the same noise
        assert not torch.allclose(train_cls, train_seg)
        noise = train_seg - adapted.repeat(2, 1, 1, 1)
        assert torch.allclose(train_cls, standardized.repeat(2, 1, 1, 1) + noise, atol=1e-5)
        assert torch.allclose(eval_cls, standardized)


@pytest.mark.parametrize("supervised", [False, True])
def test_stop_grad_between_heads(random_ssn, supervised):
    model = random_ssn(supervised=supervised, train_unused_classifier=True).train()
    _, score_logits, _, labels, _ = model.training_forward(_features(batch=4, size=8))
    # Only the score loss: does its gradient reach the segmentation head?
    F.binary_cross_entropy_with_logits(score_logits, labels).backward()
    seg_grads = [p.grad for p in model.segdec.seg_head.parameters()]
    cls_grads = [p.grad for p in model.segdec.cls_fc.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in cls_grads)
    reaches_seg = any(g is not None and g.abs().sum() > 0 for g in seg_grads)
    assert reaches_seg == supervised


# ---- loss ------------------------------------------------------------------------------------


def test_truncated_l1_hand_computed():
    pred = torch.tensor([[-1.0, 0.2], [0.7, -0.3]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # normal: max(-1 + .5, 0) = 0, max(.2 + .5, 0) = .7 -> mean .35
    # anomalous: max(.5 - .7, 0) = 0, max(.5 + .3, 0) = .8 -> mean .4
    assert truncated_l1(pred, target).item() == pytest.approx(0.75)
    # No anomalous positions: that part adds nothing.
    assert truncated_l1(pred[0], target[0]).item() == pytest.approx(0.35)
    assert truncated_l1(torch.tensor([0.9, -0.2]), torch.tensor([1.0, 1.0])).item() == pytest.approx(0.35)
    assert truncated_l1(torch.tensor([-0.6, 0.6]), torch.tensor([0.0, 1.0])).item() == 0.0


def _focal(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    p_t = torch.where(targets > 0, p, 1 - p)
    return (-((1 - p_t) ** gamma) * torch.log(p_t)).mean()


def test_loss_is_focal_plus_truncated_l1_plus_score_focal(random_ssn):
    model = random_ssn()
    generator = torch.Generator().manual_seed(0)
    map_logits = torch.randn(4, 1, 5, 5, generator=generator) * 2
    masks = (torch.rand(4, 1, 5, 5, generator=generator) > 0.7).float()
    score_logits = torch.randn(4, generator=generator)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    expected = _focal(map_logits, masks) + truncated_l1(map_logits.double(), masks) + _focal(score_logits, labels)
    assert model.loss(map_logits, score_logits, masks, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_decreases_on_a_fixed_batch(random_ssn):
    model = random_ssn().train()
    features = _features(batch=4, size=4)
    model.fit_feature_statistics(features)
    optimizer, _ = model.configure_optimizers(max_epochs=20)

    def fixed_loss() -> float:
        # The same synthetic anomalies before and after training.
        values = []
        with torch.no_grad():
            for seed in range(3):
                torch.manual_seed(100 + seed)
                values.append(model.training_step(features).item())
        return float(np.mean(values))

    before = fixed_loss()
    torch.manual_seed(0)
    for _ in range(20):
        loss = model.training_step(features)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_loss()
    assert after < 0.75 * before, (before, after)


def test_optimiser_and_schedule_match_the_reference(random_ssn):
    model = random_ssn(train_unused_classifier=True)
    optimizer, scheduler = model.configure_optimizers(max_epochs=300)
    assert isinstance(optimizer, torch.optim.AdamW)
    adaptor_group, heads_group = optimizer.param_groups
    assert adaptor_group["lr"] == pytest.approx(1e-4)
    assert heads_group["lr"] == pytest.approx(2e-4)
    assert heads_group["weight_decay"] == pytest.approx(1e-5)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable  # everything but the frozen backbone, nothing twice
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    lrs = []
    for _ in range(300):
        lrs.append(optimizer.param_groups[1]["lr"])
        optimizer.step()
        scheduler.step()
    # x0.4 after 80 % and again after 90 % of the epochs.
    assert lrs[239] == pytest.approx(2e-4) and lrs[240] == pytest.approx(0.8e-4)
    assert lrs[269] == pytest.approx(0.8e-4) and lrs[270] == pytest.approx(0.32e-4)
    # lr_scale multiplies both reference rates.
    scaled, _ = random_ssn(lr_scale=2.5).configure_optimizers(max_epochs=10)
    assert [g["lr"] for g in scaled.param_groups] == pytest.approx([2.5e-4, 5e-4])


# ---- inference -------------------------------------------------------------------------------


def test_forward_outputs_and_post_processor(random_ssn):
    model = random_ssn().eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps, scores = model(images)
        model.post_processor = False
        raw_maps, raw_scores = model(images)
    assert maps.shape == (2, 1, 64, 64) and scores.shape == (2,)
    assert ((maps >= 0) & (maps <= 1)).all() and ((scores >= 0) & (scores <= 1)).all()
    torch.testing.assert_close(raw_maps.sigmoid(), maps)
    torch.testing.assert_close(raw_scores.sigmoid(), scores)


def test_extract_features_shape(make_ssn):
    model = make_ssn(pretrained=False, upscale_factor=2)
    with torch.no_grad():
        features = model.extract_features(torch.randn(2, 3, 64, 64))
    # blocks.2 has stride 8: 8x8 at 64 px, upscaled x2.
    assert features.shape == (2, CHANNELS, 16, 16)


def test_loss_ignores_map_positions_outside_seg_valid(random_ssn):
    model = random_ssn()
    generator = torch.Generator().manual_seed(1)
    map_logits = torch.randn(4, 1, 5, 5, generator=generator) * 2
    masks = (torch.rand(4, 1, 5, 5, generator=generator) > 0.7).float()
    score_logits = torch.randn(4, generator=generator)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    valid = torch.ones_like(masks, dtype=torch.bool)
    valid[1] = False  # a weakly labelled image: its map is unknown
    loss = model.loss(map_logits, score_logits, masks, labels, valid)
    expected = (_focal(map_logits[valid], masks[valid]) + truncated_l1(map_logits[valid].double(), masks[valid])
                + _focal(score_logits, labels))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    changed = map_logits.clone()
    changed[1] = 50.0
    assert model.loss(changed, score_logits, masks, labels, valid).item() == pytest.approx(loss.item(), rel=1e-6)
    # All valid: the same as no mask.
    assert model.loss(map_logits, score_logits, masks, labels, torch.ones_like(valid)).item() == pytest.approx(
        model.loss(map_logits, score_logits, masks, labels).item(), rel=1e-6)


def test_weak_images_count_in_the_map_loss_only_where_noise_was_added(random_ssn):
    model = random_ssn(supervised=True).train()
    torch.manual_seed(3)
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])
    known = torch.tensor([False, True, True, True])
    _, _, masks, out_labels, valid = model.training_forward(_features(batch=4, size=8), None, labels, known)
    for copy in (0, 4):
        assert torch.equal(valid[copy], masks[copy].bool())  # only the synthetic anomalies
        assert out_labels[copy] == 1
    assert valid[[1, 2, 3, 5, 6, 7]].all()


def test_set_regime_switches_the_supervised_settings(random_ssn):
    model = random_ssn(supervised_grad_clip=1.0)
    assert model.segdec.stop_grad and model.grad_clip is None
    model.set_regime("weakly")
    assert model.supervised and not model.segdec.stop_grad and model.grad_clip == 1.0
    assert model.hparams["supervised"] is True
    model.set_regime("unsupervised")
    assert not model.supervised and model.segdec.stop_grad and model.grad_clip is None


# ---- image score ----------------------------------------------------------------------------


def test_image_score_rejects_unknown_names(random_ssn):
    with pytest.raises(ValueError, match="auto, classifier, map_max, mean"):
        random_ssn(image_score="max")


def test_image_score_map_max_is_the_maximum_of_the_returned_map(random_ssn):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model = random_ssn(image_score="map_max").eval()
    heads = _HeadInputs(model)
    with torch.no_grad():
        maps, scores = model(images)
    heads.close()
    torch.testing.assert_close(scores, maps.amax(dim=(1, 2, 3)))
    assert heads.calls == []  # the classification head is skipped, not computed and thrown away


def test_image_score_classifier_is_the_classification_head(random_ssn):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model = random_ssn(image_score="classifier").eval()
    with torch.no_grad():
        maps, scores = model(images)
        feats = model._standardize(model.extract_features(images))
        _, head_scores = model.segdec(model.adaptor(feats), feats)
    torch.testing.assert_close(scores, head_scores.sigmoid())
    assert not torch.allclose(scores, maps.amax(dim=(1, 2, 3)))


def test_image_score_auto_follows_the_training_regime(random_ssn):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    model = random_ssn().eval()
    assert model.image_score == "auto" and model.scores_by_map
    with torch.no_grad():
        maps, scores = model(images)
    torch.testing.assert_close(scores, maps.amax(dim=(1, 2, 3)))
    for regime, kind in [("weakly", "fused"), ("mixed", "fused"), ("supervised", "fused"), ("unsupervised", "map_max")]:
        model.set_regime(regime)
        assert model.resolved_image_score == kind, regime
    model.set_regime("weakly")
    model.image_score = "fused"
    with torch.no_grad():
        expected = model(images)[1]
    model.image_score = "auto"
    with torch.no_grad():
        torch.testing.assert_close(model(images)[1], expected)


def test_image_score_mean_averages_classifier_and_map_max(random_ssn):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    model = random_ssn(image_score="classifier").eval()
    with torch.no_grad():
        maps, cls_scores = model(images)
        model.image_score = "mean"
        mean_maps, mean_scores = model(images)
        model.post_processor = False
        _, raw = model(images)
    torch.testing.assert_close(mean_maps, maps)
    torch.testing.assert_close(mean_scores, 0.5 * (cls_scores + maps.amax(dim=(1, 2, 3))))
    torch.testing.assert_close(raw.sigmoid(), mean_scores)


def test_image_score_is_saved_with_the_model(make_ssn, tmp_path):
    model = make_ssn(image_score="classifier")  # packaged weights: the loaded backbone must match
    model.save(tmp_path)
    loaded = SuperSimpleNet.load_from_path(tmp_path)
    assert loaded.image_score == "classifier" and not loaded.scores_by_map


# ---- adaptor initialisation -----------------------------------------------------------------


def test_adaptor_starts_orthogonal_so_no_feature_direction_is_squeezed_under_the_noise(random_ssn):
    singular = torch.linalg.svdvals(random_ssn().adaptor.weight.detach().flatten(1))
    torch.testing.assert_close(singular, torch.ones(CHANNELS), atol=1e-4, rtol=0)
    # The reference's Xavier-normal square matrix shrinks some directions by orders of magnitude.
    xavier = torch.linalg.svdvals(random_ssn(adaptor_init="xavier").adaptor.weight.detach().flatten(1))
    assert xavier.min() < 0.05 * xavier.max()


def test_adaptor_init_rejects_unknown_names_and_is_saved(random_ssn, make_ssn, tmp_path):
    with pytest.raises(ValueError, match="orthogonal, xavier"):
        random_ssn(adaptor_init="identity")
    model = make_ssn(adaptor_init="xavier")
    model.save(tmp_path)
    loaded = SuperSimpleNet.load_from_path(tmp_path)
    assert loaded.hparams["adaptor_init"] == "xavier"
    torch.testing.assert_close(loaded.adaptor.weight, model.adaptor.weight)


# ---- classifier left out of training when nothing uses it ------------------------------------


def _train_steps(model, steps: int = 4) -> dict:
    # The plain modules in both models: the fused paths round differently, and AdamW turns
    # round-off in gradients that are zero in exact arithmetic (biases before a batch norm)
    # into full-size steps. test_fused_training_matches_the_modules compares the paths.
    model.segdec.fused = False
    optimizer, _ = model.configure_optimizers(3)
    model.fit_feature_statistics(_features(batch=8, size=8, seed=9))
    model.train()
    torch.manual_seed(11)
    for step in range(steps):
        loss = model.training_step(_features(batch=4, size=8, seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.trained_state_dict().items()}


def test_unused_classifier_is_skipped_without_changing_the_map_head(random_ssn):
    skipped_model = random_ssn()
    assert not skipped_model.trains_classifier
    # Frozen, so that DDP knows before wrapping the model which parameters get no gradient.
    assert not any(p.requires_grad for p in skipped_model.segdec.cls_conv.parameters())
    assert all(p.requires_grad for p in skipped_model.segdec.seg_head.parameters())
    skipped = _train_steps(skipped_model)
    trained_model = random_ssn(train_unused_classifier=True)
    assert trained_model.trains_classifier
    trained = _train_steps(trained_model)
    initial = random_ssn().trained_state_dict()
    for key, value in trained.items():
        if key.startswith("segdec.cls_"):
            # Left at its initial weights (the reference trains it; it would move).
            assert torch.equal(skipped[key], initial[key]), key
        else:
            # Same seed, same batches: the adaptor and map head get the same updates.
            torch.testing.assert_close(skipped[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(trained[k], skipped[k]) for k in trained if k.startswith("segdec.cls_"))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    skipped_model.eval(), trained_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(skipped_model(images), trained_model(images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", [dict(image_score="classifier"), dict(image_score="mean"),
                                     dict(train_unused_classifier=True),
                                     dict(supervised=True, image_score="mean")])
def test_classifier_is_trained_whenever_its_output_matters(random_ssn, setting):
    assert random_ssn(**setting).trains_classifier
    model = random_ssn(**setting).train()
    assert all(p.requires_grad for p in model.segdec.parameters())
    _, score_logits, _, _, _ = model.training_forward(_features(batch=2, size=8))
    assert score_logits.shape == (4,)


@pytest.mark.parametrize("setting", [dict(), dict(adapt_cls_features=True), dict(supervised=True),
                                     dict(supervised=True, image_score="fused")])
def test_classifier_is_skipped_when_the_image_score_does_not_use_it(random_ssn, setting):
    """The default scores (map maximum, fused) never read the classification head, in any variant
    or regime: it is left out of training and image labels alone do not reach the loss."""
    model = random_ssn(**setting).train()
    assert not model.trains_classifier and not model.learns_from_image_labels
    assert not any(p.requires_grad for p in model.segdec.cls_conv.parameters())
    _, score_logits, _, _, _ = model.training_forward(_features(batch=2, size=8))
    assert score_logits is None and model.classifier_skipped


def test_a_skipped_classifier_refuses_classifier_scores_and_says_so_after_loading(make_ssn, tmp_path):
    model = make_ssn()
    model.fit_feature_statistics(_features(batch=2, size=2))
    model.train()
    model.training_step(_features(batch=2, size=2))
    model.save(tmp_path)
    loaded = SuperSimpleNet.load_from_path(tmp_path)
    images = torch.randn(1, 3, 64, 64)
    for candidate in (model, loaded):
        candidate.eval()
        candidate(images)  # the map maximum works
        candidate.image_score = "classifier"
        with pytest.raises(ValueError, match="train_unused_classifier=True"):
            candidate(images)


def test_classifier_follows_the_regime_and_a_later_image_score(random_ssn):
    model = random_ssn(image_score="mean").train()
    model.set_regime("weakly")
    assert all(p.requires_grad for p in model.segdec.cls_fc.parameters())
    model.image_score = "auto"  # weakly: the fused score, which does not use the classifier
    model.set_regime("weakly")
    assert not any(p.requires_grad for p in model.segdec.cls_fc.parameters())
    model.set_regime("unsupervised")
    assert not any(p.requires_grad for p in model.segdec.cls_fc.parameters())
    model.image_score = "classifier"  # asked for after construction, before training
    _, score_logits, _, labels, _ = model.training_forward(_features(batch=2, size=8))
    F.binary_cross_entropy_with_logits(score_logits, labels).backward()
    assert all(p.grad is not None for p in model.segdec.cls_fc.parameters())
    assert not model.classifier_skipped


@pytest.mark.parametrize("setting", [dict(), dict(image_score="classifier"), dict(supervised=True)])
def test_fused_training_matches_the_modules(random_ssn, setting):
    """The fused segmentation head (fused_head.py; the copies form when the classifier is
    skipped) gives the loss and gradients of the plain modules, from the same noise."""
    features = _features(batch=4, size=8, seed=1)
    masks = torch.zeros(4, 1, 64, 64)
    masks[1, :, 8:40, 16:48] = 1
    labels = torch.tensor([0.0, 1.0, 0.0, 0.0])
    extra = (masks, labels) if setting.get("supervised") else ()
    results = []
    for fused in (True, False):
        model = random_ssn(**setting).train()
        model.fit_feature_statistics(_features(batch=8, size=8, seed=9))
        model.segdec.fused = fused
        torch.manual_seed(7)
        loss = model.training_step(features, *extra)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, model.segdec.seg_head[1].running_var.clone()))
    (loss_f, grads_f, var_f), (loss_m, grads_m, var_m) = results
    torch.testing.assert_close(loss_f, loss_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var_f, var_m, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_m.keys()
    scale = max(g.abs().max().item() for g in grads_m.values())
    for name, grad in grads_m.items():
        # Biases before a batch norm have zero gradient in exact arithmetic: round-off only.
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("image_score", ["map_max", "classifier"])
def test_fused_inference_matches_the_modules(random_ssn, image_score):
    model = random_ssn(image_score=image_score, train_unused_classifier=True)
    model.fit_feature_statistics(_features(batch=8, size=8, seed=9))
    model.train()
    with torch.no_grad():  # running statistics away from their start
        model.training_forward(_features(batch=4, size=8, seed=2))
    model.eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    outputs = []
    for fused in (True, False):
        model.segdec.fused = fused
        with torch.no_grad():
            outputs.append(model(images))
    (maps_f, scores_f), (maps_m, scores_m) = outputs
    torch.testing.assert_close(maps_f, maps_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores_f, scores_m, rtol=1e-5, atol=1e-6)
