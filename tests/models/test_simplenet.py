"""SimpleNet: every reference parameter keeps its default and changes what its name says."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.data import make_synthetic_mvtec, mvtec_split
from defectscope.engine import Engine
from defectscope.models import MODELS, SimpleNet, create_model, load_model
from defectscope.models.simplenet import aggregate_patches

# The reference's defaults (DonaldRR/SimpleNet main.py: `net` and `dataset` options).
REFERENCE_DEFAULTS = dict(
    pretrain_embed_dimension=1024, target_embed_dimension=1024, patchsize=3, embedding_size=1024, meta_epochs=1,
    aed_meta_epochs=1, gan_epochs=1, dsc_layers=2, dsc_hidden=None, dsc_margin=0.8, dsc_lr=0.0002,
    auto_noise=0, train_backbone=False, cos_lr=False, pre_proj=0, proj_layer_type=0, mix_noise=1, resize=256,
    imagesize=224, rotate_degrees=0, translate=0, scale=0, brightness=0, contrast=0, saturation=0, gray=0, hflip=0,
    vflip=0, augment=False,
)


def tiny(**kwargs) -> SimpleNet:
    """A random-weight EfficientNet-Lite0 SimpleNet at 64 px with small dimensions."""
    options = dict(pretrained=False, resize=64, imagesize=64, pretrain_embed_dimension=32, target_embed_dimension=32,
                   embedding_size=32)
    options.update(kwargs)
    return SimpleNet(**options)


def test_default_widths_give_384_values_per_patch_and_a_384_wide_projection():
    model = SimpleNet(pretrained=False, resize=64, imagesize=64)
    assert model.extract_features(images()).shape == (2, 384, 8, 8)
    assert model.discriminator.body[0].in_features == 384
    projected = SimpleNet(pretrained=False, resize=64, imagesize=64, pre_proj=1)
    assert projected.embed(projected.extract_features(images())).shape == (2 * 8 * 8, 384)
    assert SimpleNet(pretrained=False, resize=64, imagesize=64, pre_proj=1, embedding_size=100).embed(
        projected.extract_features(images())).shape == (2 * 8 * 8, 100)


def images(n=2, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# Ours where they differ (noise_std and proj_init have their own tests): widths for Lite0, not
# WideResNet-50 (module doc); the projection's width follows the target width.
OUR_WIDTHS = dict(pretrain_embed_dimension=384, target_embed_dimension=384, embedding_size=None)


def test_constructor_defaults_are_the_reference_ones_except_the_widths():
    signature = inspect.signature(SimpleNet.__init__).parameters
    assert {k: signature[k].default for k in REFERENCE_DEFAULTS} == {**REFERENCE_DEFAULTS, **OUR_WIDTHS}
    assert MODELS["simplenet"] is SimpleNet and isinstance(create_model("SimpleNet", pretrained=False), SimpleNet)


def test_noise_std_default_is_one_feature_std_and_the_reference_absolute_value_without_standardisation():
    """The one default that differs from the reference: 0.05 feature stds is too little noise
    (benchmarks/results/simplenet.md), so standardised features get 1.0; absolute units keep 0.05."""
    assert inspect.signature(SimpleNet.__init__).parameters["noise_std"].default is None
    relative = tiny()
    assert relative.noise_std == relative.hparams["noise_std"] == 1.0 and relative.standardizer is not None
    absolute = tiny(standardize_features=False)
    assert absolute.noise_std == absolute.hparams["noise_std"] == 0.05 and absolute.standardizer is None
    assert tiny(standardize_features=False, noise_std=0.015).noise_std == 0.015
    assert tiny(noise_std=0.25).noise_std == 0.25
    feats = torch.zeros(20000, 8)
    assert relative.make_noise(feats).std().item() == pytest.approx(1.0, rel=0.03)
    assert absolute.make_noise(feats).std().item() == pytest.approx(0.05, rel=0.03)


def test_invalid_settings_are_refused_with_every_reason():
    with pytest.raises(ValueError, match="patchsize must be an odd.*mix_noise must be >= 1"):
        tiny(patchsize=2, mix_noise=0)
    with pytest.raises(ValueError, match="imagesize must be between 32 and resize"):
        tiny(resize=64, imagesize=72)


# ---- patch aggregation: patchsize, pretrain_embed_dimension, target_embed_dimension ------------------------
def test_patchsize_one_with_matching_dimensions_is_the_identity():
    fmap = torch.randn(2, 8, 5, 6)
    np.testing.assert_allclose(aggregate_patches([fmap], 1, 8, 8), fmap, atol=1e-6)


def test_patchsize_averages_each_channels_neighbourhood():
    """Pooling C*p*p values down to C averages the p x p neighbourhood of each channel:
    a 3x3 (5x5) average pool with zero padding, worked out independently with avg_pool2d."""
    fmap = torch.randn(2, 4, 6, 6)
    for p in (3, 5):
        expected = F.avg_pool2d(fmap, p, stride=1, padding=p // 2, count_include_pad=True)
        np.testing.assert_allclose(aggregate_patches([fmap], p, 4, 4), expected, atol=1e-5)
    assert not torch.allclose(aggregate_patches([fmap], 3, 4, 4), aggregate_patches([fmap], 5, 4, 4))


def test_layers_are_brought_to_the_finest_grid_and_pooled_to_the_target_dimension():
    fine, coarse = torch.randn(1, 4, 8, 8), torch.ones(1, 6, 4, 4)
    out = aggregate_patches([fine, coarse], 1, 4, 2)
    # target 2 from [fine(4) | coarse(4)]: first value = mean of the fine layer, second = mean of coarse (1).
    np.testing.assert_allclose(out[0, 0], fine[0].mean(dim=0), atol=1e-6)
    np.testing.assert_allclose(out[0, 1], torch.ones(8, 8), atol=1e-6)


def test_embedding_dimensions_change_the_features():
    x = images()
    torch.manual_seed(0)
    a = tiny(pretrain_embed_dimension=32, target_embed_dimension=16).extract_features(x)
    b = tiny(pretrain_embed_dimension=64, target_embed_dimension=16).extract_features(x)
    c = tiny(pretrain_embed_dimension=32, target_embed_dimension=24).extract_features(x)
    assert a.shape == b.shape == (2, 16, 8, 8) and c.shape == (2, 24, 8, 8)
    assert not torch.allclose(a, b)


def test_patchsize_pretrain_and_target_dimensions_are_in_the_feature_cache_key():
    base = tiny().feature_params()
    for change in (dict(patchsize=5), dict(pretrain_embed_dimension=16), dict(target_embed_dimension=16),
                   dict(resize=72, imagesize=56)):
        assert tiny(**change).feature_params() != base, change


# ---- resize / imagesize -------------------------------------------------------------------------------
def test_resize_then_centre_crop_and_maps_at_resize_size():
    model = tiny(resize=80, imagesize=64).eval()
    x = images(size=80)
    assert model.extract_features(x).shape[-2:] == (8, 8)  # stride 8 on the 64 px crop
    # the crop is the centre: changing the border does not change the features
    y = x.clone()
    y[..., :8, :] = 5
    torch.testing.assert_close(model.extract_features(x), model.extract_features(y))
    maps, scores = model(x)
    assert maps.shape == (2, 1, 80, 80) and scores.shape == (2,)
    score, amap = model.predict(torch.rand(3, 50, 70))
    assert isinstance(score, float) and amap.shape == (50, 70)


# ---- projection, discriminator ------------------------------------------------------------------------
def test_pre_proj_proj_layer_type_and_embedding_size_shape_the_projection():
    assert tiny(pre_proj=0).pre_projection is None
    kinds = {t: [type(m) for m in tiny(pre_proj=2, proj_layer_type=t, embedding_size=16).pre_projection]
             for t in (0, 1, 2)}
    assert kinds == {0: [nn.Linear, nn.Linear], 1: [nn.Linear, nn.BatchNorm1d, nn.Linear],
                     2: [nn.Linear, nn.LeakyReLU, nn.Linear]}
    model = tiny(pre_proj=1, embedding_size=16)
    features = model.extract_features(images())
    assert model.embed(features).shape == (2 * 8 * 8, 16)
    assert tiny(pre_proj=0, embedding_size=16).embed(features).shape == (2 * 8 * 8, 32)


def test_projection_starts_orthogonal_unless_xavier_is_asked():
    for embedding_size in (32, 16):  # square, and narrower (semi-orthogonal: orthonormal rows)
        weight = tiny(pre_proj=2, embedding_size=embedding_size).pre_projection[0].weight.detach()
        torch.testing.assert_close(weight @ weight.t(), torch.eye(embedding_size), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    xavier = tiny(pre_proj=1, proj_init="xavier")
    singular = torch.linalg.svdvals(xavier.pre_projection[0].weight.detach())
    assert singular.min() < 0.2 * singular.max() and xavier.hparams["proj_init"] == "xavier"
    with pytest.raises(ValueError, match="proj_init must be one of orthogonal, xavier"):
        tiny(proj_init="kaiming")


def test_dsc_layers_and_dsc_hidden_shape_the_discriminator():
    def widths(model):
        return [(m.in_features, m.out_features) for m in model.discriminator.modules() if isinstance(m, nn.Linear)]

    assert widths(tiny(dsc_layers=1)) == [(32, 1)]
    assert widths(tiny(dsc_layers=2, dsc_hidden=None)) == [(32, 21), (21, 1)]  # int(32 // 1.5)
    assert widths(tiny(dsc_layers=3, dsc_hidden=10)) == [(32, 10), (10, 10), (10, 1)]


def test_training_step_gives_the_loss_of_the_plain_step():
    """Noise written straight into the discriminator's input: the same loss as
    ``cat((true, true + noise))`` through the modules, from the same random state."""
    model = tiny(noise_std=1.0)
    features = model.extract_features(images(2))
    model.fit_feature_statistics(features)
    model.train()
    for options in (dict(), dict(mix_noise=3), dict(auto_noise=0.5)):
        for key, value in options.items():
            setattr(model, key, value)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(3)
        true_feats = model.embed(features)
        fake_feats = true_feats + model.make_noise(true_feats)
        scores = model.discriminator(torch.cat((true_feats, fake_feats)))
        n = true_feats.shape[0]
        old = model.loss(scores[:n], scores[n:])
        model.load_state_dict(state)
        torch.manual_seed(3)
        same_path = model.training_step(features)
        assert torch.equal(same_path, old), options  # only the noise's route differs: bit for bit


# ---- noise: noise_std (relative), mix_noise, auto_noise -------------------------------------------------
def test_noise_std_sets_the_noise_scale():
    feats = torch.zeros(20000, 8)
    for std in (0.05, 0.5):
        noise = tiny(noise_std=std).make_noise(feats)
        assert noise.std().item() == pytest.approx(std, rel=0.03)


def test_mix_noise_draws_one_of_its_levels_per_row():
    torch.manual_seed(0)
    noise = tiny(noise_std=1.0, mix_noise=3).make_noise(torch.zeros(300, 20000))
    row_std = noise.std(dim=1)
    levels = torch.tensor([1.0, 1.1, 1.21])
    nearest = (row_std[:, None] - levels).abs().argmin(dim=1)
    assert (row_std - levels[nearest]).abs().max() < 0.03
    assert set(nearest.tolist()) == {0, 1, 2}
    assert set((tiny(noise_std=1.0, mix_noise=1).make_noise(torch.zeros(50, 2000)).std(dim=1) - 1).abs().lt(0.05).tolist()) == {True}


def test_auto_noise_follows_the_batch_feature_scale():
    feats = torch.randn(20000, 4) * torch.tensor([1.0, 2.0, 4.0, 8.0])
    noise = tiny(auto_noise=0.5, noise_std=0.05).make_noise(feats)
    np.testing.assert_allclose(noise.std(dim=0), [0.5, 1.0, 2.0, 4.0], rtol=0.05)


def test_noise_is_relative_to_each_channels_feature_scale():
    """After fitting, features reach the discriminator with unit per-channel std, so a noise
    std means the same for any backbone scale; standardize_features=False keeps raw units."""
    x = images(4)
    model = tiny()
    features = model.extract_features(x)
    for scale in (1.0, 100.0):
        model.fit_feature_statistics(features * scale)
        embedded = model.embed(features * scale)
        np.testing.assert_allclose(embedded.std(dim=0).detach(), 1.0, rtol=0.05)
    raw = tiny(standardize_features=False)
    raw.fit_feature_statistics(features)
    torch.testing.assert_close(raw.embed(features), features.permute(0, 2, 3, 1).reshape(-1, 32))


# ---- loss: dsc_margin ---------------------------------------------------------------------------------
def test_dsc_margin_is_the_truncated_l1_margin():
    model = tiny()
    l2 = 0.5 * 1e-5 * sum((p * p).sum() for p in model.discriminator.parameters())
    true, fake = torch.tensor([1.0, 0.2]), torch.tensor([-1.0, 0.0])
    for margin, hinge in ((0.8, (0 + 0.6) / 2 + (0 + 0.8) / 2), (1.5, (0.5 + 1.3) / 2 + (0.5 + 1.5) / 2)):
        model.dsc_margin = margin
        assert model.loss(true, fake).item() == pytest.approx(hinge + l2.item(), abs=1e-6)


def test_training_step_separates_normal_from_noisy_features():
    torch.manual_seed(0)
    model = tiny(noise_std=1.0, dsc_lr=1e-2)
    features = model.extract_features(images(4))
    model.fit_feature_statistics(features)
    optimizer, _ = model.configure_optimizers(1)
    model.train()
    losses = []
    for _ in range(50):
        loss = model.training_step(features)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- optimisers: dsc_lr, cos_lr, aed_meta_epochs, meta_epochs, gan_epochs ------------------------------
def _lrs(model, epochs):
    optimizer, scheduler = model.configure_optimizers(epochs)
    out = []
    for _ in range(epochs):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return np.array(out)


def test_dsc_lr_and_cos_lr_set_the_discriminator_schedule():
    constant = _lrs(tiny(dsc_lr=0.01, pre_proj=1, meta_epochs=3, aed_meta_epochs=1, gan_epochs=2), 6)
    np.testing.assert_allclose(constant[:, -1], 0.01)
    np.testing.assert_allclose(constant[:, 0], 1e-4)  # projection: a tenth of the reference's 1e-3
    cosine = _lrs(tiny(dsc_lr=0.01, pre_proj=1, meta_epochs=3, aed_meta_epochs=1, gan_epochs=2, cos_lr=True), 6)
    # period (3 - 1) * 2 = 4 epochs, from dsc_lr to 0.4 * dsc_lr
    expected = [0.01 * (0.4 + 0.6 * (1 + math.cos(math.pi * e / 4)) / 2) for e in range(6)]
    np.testing.assert_allclose(cosine[:, -1], expected, rtol=1e-6)
    np.testing.assert_allclose(cosine[:, 0], 1e-4)
    assert cosine[4, -1] == pytest.approx(0.004)


def test_aed_meta_epochs_changes_the_cosine_period():
    a = _lrs(tiny(cos_lr=True, meta_epochs=4, aed_meta_epochs=1), 4)[:, -1]
    b = _lrs(tiny(cos_lr=True, meta_epochs=4, aed_meta_epochs=2), 4)[:, -1]
    assert b[2] == pytest.approx(0.4 * 0.0002) and a[3] == pytest.approx(0.4 * 0.0002)
    assert not np.allclose(a, b)


def test_meta_epochs_times_gan_epochs_is_the_training_length():
    assert tiny(meta_epochs=3, gan_epochs=4).epochs == 12 and tiny().epochs == 1


# ---- augmentation -------------------------------------------------------------------------------------
def _pixels(model, x):
    return x * torch.tensor(model.std).view(1, 3, 1, 1) + torch.tensor(model.mean).view(1, 3, 1, 1)


STRONG = dict(rotate_degrees=dict(rotate_degrees=90), translate=dict(translate=0.4), scale=dict(scale=0.5),
              brightness=dict(brightness=0.9), contrast=dict(contrast=0.9), saturation=dict(saturation=0.9),
              gray=dict(gray=1.0), hflip=dict(hflip=1.0), vflip=dict(vflip=1.0))


@pytest.mark.parametrize("name", list(STRONG))
def test_each_augmentation_setting_changes_the_training_images(name):
    torch.manual_seed(0)
    x = (torch.rand(2, 3, 64, 64) - 0.5) / 0.5  # EfficientNet-Lite normalisation
    unchanged = tiny(augment=True).augment_images(x)
    torch.testing.assert_close(unchanged, x, atol=1e-4, rtol=0)
    changed = tiny(augment=True, **STRONG[name]).augment_images(x)
    assert (changed - x).abs().mean() > 0.01, name


def test_flips_and_gray_do_exactly_that():
    x = (torch.rand(2, 3, 64, 64) - 0.5) / 0.5
    torch.testing.assert_close(tiny(augment=True, hflip=1.0).augment_images(x), x.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny(augment=True, vflip=1.0).augment_images(x), x.flip(-2), atol=1e-5, rtol=0)
    grey = _pixels(tiny(), tiny(augment=True, gray=1.0).augment_images(x))
    torch.testing.assert_close(grey[:, 0], grey[:, 1], atol=1e-5, rtol=0)


def test_augment_is_the_switch():
    assert tiny(hflip=1.0).train_transform is None
    model = tiny(augment=True, hflip=1.0)
    assert model.train_transform is not None
    # training_step_images trains on the features of the flipped images
    seen = []
    model.training_step = lambda features, *a: seen.append(features) or features.sum()
    x = (torch.rand(2, 3, 64, 64) - 0.5) / 0.5  # valid pixels (augmentation clips to [0, 1])
    model.training_step_images(x)
    torch.testing.assert_close(seen[0], model.extract_features(x.flip(-1)))


# ---- engine: cache when not augmented, per-step images when augmented or the backbone trains -------------
@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("sn_data")
    make_synthetic_mvtec(root, category="fabric", image_size=64, n_train=6, n_test_good=3, n_test_defect=3)
    return mvtec_split(root, "fabric")


def _engine(tmp_path, name, epochs=1):
    return Engine(results_path=tmp_path, project="p", group="g", run_name=name, max_epochs=epochs, batch_size=3,
                  accelerator="cpu", progress=False)


@pytest.mark.parametrize("options, per_step", [(dict(), False), (dict(augment=True, hflip=0.5), True),
                                               (dict(train_backbone=True), True)])
def test_engine_uses_the_cache_unless_images_change_or_the_backbone_trains(
    tmp_path, split, monkeypatch, capsys, options, per_step
):
    calls = {"features": 0, "images": 0}
    step, step_images = SimpleNet.training_step, SimpleNet.training_step_images

    def count_step(self, *a, **k):
        calls["features"] += 1
        return step(self, *a, **k)

    def count_images(self, *a, **k):
        calls["images"] += 1
        return step_images(self, *a, **k)

    monkeypatch.setattr(SimpleNet, "training_step", count_step)
    monkeypatch.setattr(SimpleNet, "training_step_images", count_images)
    _engine(tmp_path, "cache").fit(tiny(**options), split.train)
    said = "computed from the images every step" in capsys.readouterr().out
    assert said == per_step
    assert (calls["images"] == 2) == per_step and calls["features"] == 2  # 6 images, batch 3


def test_train_backbone_trains_saves_and_reloads_the_backbone(tmp_path, split):
    torch.manual_seed(0)
    model = tiny(train_backbone=True, pre_proj=1, pretrained=True)
    before = {k: v.clone() for k, v in model.feature_extractor.state_dict().items()}
    engine = _engine(tmp_path, "bb", epochs=2)
    engine.fit(model, split.train)
    after = model.feature_extractor.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert any(k.startswith("feature_extractor.") for k in model.trained_state_dict())
    loaded = load_model(engine.model_dir)
    x = images()
    torch.testing.assert_close(loaded(x)[1], model.eval()(x)[1])
    frozen = tiny()
    assert not any(k.startswith("feature_extractor.") for k in frozen.trained_state_dict())
    assert not any(p.requires_grad for p in frozen.feature_extractor.parameters())


# ---- predict and load_from_path as in the seed --------------------------------------------------------
def test_predict_and_load_from_path_as_in_the_seed(tmp_path, split):
    torch.manual_seed(0)
    net = tiny(pre_proj=1, resize=72, imagesize=64, pretrained=True)
    engine = _engine(tmp_path, "seed", epochs=2)
    engine.fit(net, split.train)
    engine.test(net, split.test, category="fabric", save_images=False)
    image = split.test[-1].path
    score, mask = net.predict(image)
    assert isinstance(score, float) and 0 <= score <= 1 and mask.shape == (64, 64)
    fresh = tiny(pre_proj=1, resize=72, imagesize=64, pretrained=True)
    assert fresh.predict(image)[0] != pytest.approx(score)
    fresh.load_from_path(str(engine.run_dir / "models" / "0"))
    assert fresh.predict(image)[0] == pytest.approx(score, abs=1e-6)
    rebuilt = SimpleNet.load_from_path(engine.run_dir)
    np.testing.assert_allclose(rebuilt.predict(image)[1], mask, atol=1e-6)
    assert float(rebuilt.threshold) == pytest.approx(float(net.threshold))
    assert rebuilt.hparams == net.hparams


# ---- backbones: packaged offline, wide_resnet50_2 from a weights file ----------------------------------------
def test_wide_resnet50_2_from_a_weights_file(tmp_path):
    import torchvision

    path = tmp_path / "wide_resnet50_2-95faca4d.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.wide_resnet50_2(weights=None).state_dict(), path)
    model = SimpleNet(backbone="wide_resnet50_2", weights=str(path), resize=64, imagesize=64,
                      pretrain_embed_dimension=32, target_embed_dimension=32)
    assert model.feature_extractor.layers == ["layer2", "layer3"]  # the reference's layers
    x = images()
    features = model.extract_features(x)
    assert features.shape == (2, 32, 8, 8)
    model.fit_feature_statistics(features)
    assert torch.isfinite(model.training_step(features))
    assert model.hparams["weights"] == str(path)


def test_missing_wide_resnet_weights_say_which_file(empty_weight_caches):
    from defectscope.backbones import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="wide_resnet50_2-95faca4d.pth"):
        SimpleNet(backbone="wide_resnet50_2")
