"""EfficientAD: networks against the reference architectures, teacher files, the method's
formulas (hard loss, map normalisation, padding), the penalty images, saving and an engine run."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from defectscope.models import MODELS, EfficientAd, load_model
from defectscope.models.efficientad import (
    PDN,
    AutoEncoder,
    PenaltyNotice,
    hard_loss,
    normalize_map,
    pdn_output_size,
    quantile,
    skimage_pictures,
)
from defectscope.models.model_files import ModelFileError

SIZE = 64  # image size of the small models (PDN grid 8x8, 16x16 padded)


# ---- the reference networks, written from the architecture tables of the paper's appendix ---------
def reference_pdn(size: str, out: int = 384, padding: bool = False) -> nn.Sequential:
    """nn.Sequential in the layer order of nelson1425/EfficientAD common.py (so its state-dict keys
    are the official teacher files' keys: '0.weight', '3.weight', ...)."""
    p = int(padding)
    if size == "s":
        return nn.Sequential(
            nn.Conv2d(3, 128, 4, padding=3 * p), nn.ReLU(), nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(128, 256, 4, padding=3 * p), nn.ReLU(), nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 256, 3, padding=p), nn.ReLU(), nn.Conv2d(256, out, 4))
    return nn.Sequential(
        nn.Conv2d(3, 256, 4, padding=3 * p), nn.ReLU(), nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 512, 4, padding=3 * p), nn.ReLU(), nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(512, 512, 1), nn.ReLU(), nn.Conv2d(512, 512, 3, padding=p), nn.ReLU(),
        nn.Conv2d(512, out, 4), nn.ReLU(), nn.Conv2d(out, out, 1))


def reference_autoencoder(out: int = 384) -> nn.Sequential:
    """The paper's autoencoder at 256 px, upsampling sizes as nelson1425's get_autoencoder."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.ReLU()]
    layers.append(nn.Conv2d(64, 64, 8))
    for size in (3, 8, 15, 32, 63, 127):
        layers += [nn.Upsample(size=size, mode="bilinear"), nn.Conv2d(64, 64, 4, 1, 2), nn.ReLU(), nn.Dropout(0.2)]
    layers += [nn.Upsample(size=56, mode="bilinear"), nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(),
               nn.Conv2d(64, out, 3, 1, 1)]
    return nn.Sequential(*layers)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A PDN-S teacher in nelson1425's naming (a plain state dict), random weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher_small.pth"
    torch.save(reference_pdn("s").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def penalty_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenette") / "n01440764"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder.parent


def small(teacher_file, penalty_dir=None, **kwargs) -> EfficientAd:
    options = dict(teacher_weights=str(teacher_file), image_size=SIZE, imagenet_dir=penalty_dir and str(penalty_dir))
    options.update(kwargs)
    return EfficientAd(**options)


def normalised(model, images01):
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    return (images01 - mean) / torch.tensor(model.std).view(1, 3, 1, 1)


def fitted(model, n: int = 4, seed: int = 0) -> tuple[EfficientAd, torch.Tensor]:
    """``model`` with teacher statistics and map quantiles fitted on ``n`` random images."""
    images = normalised(model, torch.rand(n, 3, *model.image_size, generator=torch.Generator().manual_seed(seed)))
    model.fit_feature_statistics(model.extract_features(images))
    model.eval()
    model.calibrate(images[i:i + 2] for i in range(0, n, 2))
    return model, images


# ---- networks ----------------------------------------------------------------------------------------
def test_network_sizes_equal_the_reference_networks():
    for size in ("s", "m"):
        assert count(PDN(size, 384)) == count(reference_pdn(size, 384))
        assert count(PDN(size, 768)) == count(reference_pdn(size, 768))  # the student
    # Counted from nelson1425/EfficientAD common.py (get_pdn_small / get_pdn_medium / get_autoencoder).
    assert (count(PDN("s")), count(PDN("m")), count(PDN("s", 768)), count(PDN("m", 768))) == (
        2_694_144, 8_026_624, 4_267_392, 11_615_488)
    assert count(AutoEncoder(384, (256, 256), (56, 56))) == count(reference_autoencoder()) == 1_096_320


def test_autoencoder_is_the_reference_network_at_256_px():
    torch.manual_seed(0)
    reference = reference_autoencoder().eval()
    ours = AutoEncoder(384, (256, 256), (56, 56)).eval()
    convs = [m for m in reference if isinstance(m, nn.Conv2d)]
    mine = [*ours.encoder, *ours.decoder, *ours.head]
    for a, b in zip(convs, mine, strict=True):
        b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.parametrize("side", [64, 96, 128, 256])
@pytest.mark.parametrize("padding", [False, True])
def test_pdn_grid_size_and_autoencoder_output_agree(side, padding):
    expected = {(256, False): 56, (256, True): 64}.get((side, padding))
    with torch.device("meta"):
        x = torch.empty(1, 3, side, side)
        grid = PDN("s", 8, padding)(x).shape[-1]
        assert PDN("m", 8, padding)(x).shape[-1] == grid == pdn_output_size(side, padding)
        assert AutoEncoder(8, (side, side), (grid, grid))(x).shape[-2:] == (grid, grid)
    assert expected in (None, grid)


# ---- teacher files -----------------------------------------------------------------------------------
def test_official_teacher_files_load_by_path(tmp_path):
    torch.manual_seed(1)
    for size in ("s", "m"):
        reference = reference_pdn(size).eval()
        x = torch.randn(1, 3, SIZE, SIZE)
        expected = reference(x)
        nelson = reference.state_dict()  # '0.weight', '3.weight', ...
        convs = sorted({int(k.split(".")[0]) for k in nelson})
        anomalib = {f"conv{convs.index(int(k.split('.')[0])) + 1}.{k.split('.')[1]}": v for k, v in nelson.items()}
        lightning = {f"model.teacher.{k}": v for k, v in anomalib.items()}
        for name, state in (("nelson", nelson), ("anomalib", anomalib), ("lightning", lightning)):
            path = tmp_path / f"{name}_{size}.pth"
            torch.save(state, path)
            model = EfficientAd(teacher_weights=str(path), model_size=size.upper(), image_size=SIZE)
            torch.testing.assert_close(model.extract_features(x), expected)
            assert model.feature_extractor.weights_source == str(path.resolve())
    with pytest.raises(ModelFileError, match=r"nelson_s\.pth does not fit a PDN-M.*4 convolutions.*PDN-M has 6"):
        EfficientAd(teacher_weights=str(tmp_path / "nelson_s.pth"), model_size="m", image_size=SIZE)
    with pytest.raises(ModelFileError, match="does not fit a PDN-S with 256 output channels"):
        EfficientAd(teacher_weights=str(tmp_path / "nelson_s.pth"), teacher_out_channels=256, image_size=SIZE)


def test_without_a_teacher_the_model_names_both_fixes():
    with pytest.raises(ValueError) as err:
        EfficientAd(model_size="m")
    message = str(err.value)
    assert "teacher_weights is None" in message and "teacher_medium.pth" in message
    assert "defectscope distill-teacher --model-size m --output teacher_m.pth" in message


def test_settings_are_checked(teacher_file):
    with pytest.raises(ValueError, match="model_size must be 's' or 'm'"):
        small(teacher_file, model_size="l")
    with pytest.raises(ValueError, match="lr must be"):
        small(teacher_file, lr=float("nan"))
    with pytest.raises(ValueError, match="at least 64 pixels"):
        small(teacher_file, image_size=48)


# ---- the method's formulas ---------------------------------------------------------------------------
def test_hard_loss_is_the_mean_above_the_0999_quantile():
    distance = torch.rand(1, 384, 14, 14, generator=torch.Generator().manual_seed(0)) ** 3
    direct = distance[distance >= torch.quantile(distance, 0.999)].mean()
    torch.testing.assert_close(hard_loss(distance), direct)
    assert hard_loss(distance) > distance.mean() * 3  # the hardest 0.1 % only
    for q in (0.0, 0.5, 0.9, 0.995, 1.0):
        torch.testing.assert_close(quantile(distance, q), torch.quantile(distance.flatten(), q))


def test_map_normalisation_sends_the_validation_quantiles_to_0_and_01(teacher_file, penalty_dir):
    torch.manual_seed(0)
    model, images = fitted(small(teacher_file, penalty_dir))
    with torch.no_grad():
        raw_st, raw_ae = model.raw_maps(images)
    q = model.map_quantiles
    for raw, start, end in ((raw_st, q[0], q[1]), (raw_ae, q[2], q[3])):
        maps = normalize_map(raw, start, end)
        torch.testing.assert_close(torch.quantile(maps, 0.9), torch.tensor(0.0), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.quantile(maps, 0.995), torch.tensor(0.1), atol=1e-6, rtol=0)
    info = model.params()["map_normalization"]
    assert info["images"] == 4 and info["st_start"] == pytest.approx(float(q[0]))
    # Teacher outputs standardised per channel over the training images.
    feats = model._teacher_standardized(model.extract_features(images))
    torch.testing.assert_close(feats.mean(dim=(0, 2, 3)), torch.zeros(384), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats.std(dim=(0, 2, 3), correction=0), torch.ones(384), atol=1e-3, rtol=0)


def test_padding_and_pad_maps_set_the_map_grid(teacher_file):
    x = torch.randn(1, 3, SIZE, SIZE)
    for padding, pad_maps, grid in ((True, True, 16), (True, False, 16), (False, True, 16), (False, False, 8)):
        model = small(teacher_file, padding=padding, pad_maps=pad_maps, post_processor=False).eval()
        with torch.no_grad():
            combined = model.combined_map(x)
            maps, scores = model(x)
        assert combined.shape[-2:] == (grid, grid) and maps.shape == (1, 1, SIZE, SIZE)
        torch.testing.assert_close(scores, maps.amax(dim=(1, 2, 3)))
        if not padding and pad_maps:  # the 4-position border is padding
            assert (combined[..., :4, :] == 0).all() and (combined[..., 4:-4, 4:-4] != 0).any()


def test_post_processor_is_a_monotone_squash(teacher_file):
    torch.manual_seed(0)
    raw = small(teacher_file, post_processor=False).eval()
    squashed = small(teacher_file).eval()
    squashed.load_state_dict(raw.state_dict())
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        (maps, scores), (maps_p, scores_p) = raw(x), squashed(x)
    torch.testing.assert_close(maps_p, torch.sigmoid((maps - 0.1) / 0.1))
    assert ((scores_p > 0) & (scores_p < 1)).all() and torch.equal(scores.argsort(), scores_p.argsort())


def test_inference_exports_without_data_dependent_control_flow(teacher_file):
    model, images = fitted(small(teacher_file))
    exported = torch.export.export(model, (images[:1],))
    with torch.no_grad():
        for got, want in zip(exported.module()(images[2:3]), model(images[2:3])):
            torch.testing.assert_close(got, want)


# ---- training ----------------------------------------------------------------------------------------
def test_training_step_trains_student_and_autoencoder_only(teacher_file, penalty_dir):
    torch.manual_seed(0)
    model, images = fitted(small(teacher_file, penalty_dir))
    model.train()
    loss = model.training_step_images(images[:1], model.extract_features(images[:1]))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert model.autoencoder.encoder[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.feature_extractor.parameters())
    assert model.params()["penalty"] == {"source": f"3 images of {penalty_dir.resolve()}", "images": 3}
    assert model.feature_extractor.training is False  # the teacher stays frozen in train mode


def test_colour_jitter_changes_brightness_contrast_or_saturation_only_mildly(teacher_file):
    model = small(teacher_file)
    plain = torch.rand(1, 3, SIZE, SIZE) * 0.5 + 0.25
    torch.manual_seed(3)
    jittered = model.colour_jitter(normalised(model, plain))
    back = jittered * torch.tensor(model.std).view(1, 3, 1, 1) + torch.tensor(model.mean).view(1, 3, 1, 1)
    assert not torch.allclose(back, plain) and (back - plain).abs().max() < 0.2 * 0.75 + 1e-5


def test_default_penalty_images_and_the_notice_without_them(teacher_file, monkeypatch):
    torch.manual_seed(0)
    model, images = fitted(small(teacher_file))
    model.train()
    model.training_step_images(images[:1], model.extract_features(images[:1]))
    assert "scikit-image sample pictures" in model.penalty_info["source"] and model.penalty_info["images"] == 200

    skimage_pictures.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # as if scikit-image were not installed
    try:
        model = small(teacher_file).train()
        with pytest.warns(PenaltyNotice, match=r"without the out-of-domain penalty.*imagenet_dir=.*scikit-image"):
            model.training_step_images(images[:1], model.extract_features(images[:1]))
        with warnings.catch_warnings():
            warnings.simplefilter("error", PenaltyNotice)  # said once
            model.training_step_images(images[:1], model.extract_features(images[:1]))
        assert model.params()["penalty"]["source"].startswith("none: no imagenet_dir")
    finally:
        skimage_pictures.cache_clear()


def test_a_penalty_folder_without_images_fails_before_training(teacher_file, tmp_path):
    from defectscope.data import DataError

    (tmp_path / "notes.txt").write_text("no pictures here")
    model = small(teacher_file, tmp_path)
    with pytest.raises(DataError, match=r"No images in .*notes\.txt"):
        model.fit_feature_statistics(torch.zeros(2, 384, 8, 8))  # the engine calls it before the first step


def test_learning_rate_drops_to_a_tenth_at_95_percent_of_the_steps(teacher_file):
    model = small(teacher_file, lr=1e-3)
    optimizer, scheduler = model.configure_optimizers(2, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:19] == [1e-3] * 19 and lrs[19] == pytest.approx(1e-4)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {
        id(p) for p in [*model.student.parameters(), *model.autoencoder.parameters()]}


# ---- saving and the engine ---------------------------------------------------------------------------
def test_save_and_load_give_identical_outputs(teacher_file, penalty_dir, tmp_path):
    torch.manual_seed(0)
    model, images = fitted(small(teacher_file, penalty_dir, model_size="S", padding=True))
    model.threshold.fill_(0.42)
    model.save(tmp_path)
    for loaded in (load_model(tmp_path), EfficientAd.load_from_path(tmp_path)):
        assert isinstance(loaded, EfficientAd) and loaded.hparams == model.hparams
        torch.testing.assert_close(loaded.map_quantiles, model.map_quantiles, rtol=0, atol=0)
        assert loaded.params()["map_normalization"] == model.params()["map_normalization"]
        with torch.no_grad():
            for got, want in zip(loaded(images), model(images)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert float(loaded.threshold) == pytest.approx(0.42)
    assert MODELS["efficientad"] is EfficientAd


def test_engine_trains_calibrates_and_tests(teacher_file, penalty_dir, tmp_path):
    from defectscope.data import make_synthetic_mvtec, mvtec_split
    from defectscope.engine import Engine

    make_synthetic_mvtec(tmp_path / "data", category="fabric", image_size=SIZE, n_train=6, n_test_good=2,
                         n_test_defect=3)
    split = mvtec_split(tmp_path / "data", "fabric")
    torch.manual_seed(0)
    model = small(teacher_file, penalty_dir)
    engine = Engine(results_path=tmp_path / "results", run_name="ead", max_epochs=1, batch_size=1, seed=0,
                    accelerator="cpu", progress=False)
    engine.fit(model, split.train)
    state = torch.load(engine.model_dir / "last.ckpt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 5  # 6 images, 1 held out: 5 steps, stepped after each
    assert model.calibration_info["images"] == 1 and not torch.equal(
        model.map_quantiles, torch.tensor([0.0, 0.1, 0.0, 0.1]))
    assert model.statistics_info["images"] == 5 and model.threshold_info["n_good"] == 1
    metrics = engine.test(model, split.test, category="fabric")
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and "pixel_auroc" in metrics
    reloaded = load_model(engine.run_dir)
    x = normalised(model, torch.rand(1, 3, SIZE, SIZE))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)[1], model(x)[1], rtol=0, atol=0)
    with pytest.raises(Exception, match=r"efficientad trains at batch size exactly 1"):
        Engine(results_path=tmp_path / "results", run_name="b2", max_epochs=1, batch_size=2,
               accelerator="cpu", progress=False).fit(small(teacher_file, penalty_dir), split.train)


def test_calibrate_returns_the_scores_forward_gives_after_calibration(teacher_file):
    model = small(teacher_file)
    images = normalised(model, torch.rand(5, 3, *model.image_size, generator=torch.Generator().manual_seed(3)))
    model.fit_feature_statistics(model.extract_features(images))
    model.eval()
    scores, map_max = model.calibrate(images[i:i + 2] for i in range(0, 5, 2))
    with torch.no_grad():
        maps, expected = model(images)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(map_max, maps.amax(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
