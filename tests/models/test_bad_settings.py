"""Python API: every model and engine setting that cannot work is refused at once, with one
ValueError naming the setting (NaN in particular, which slips through ``value <= 0`` checks and
would train a NaN model)."""

from __future__ import annotations

import pytest

from defectscope.engine import Engine
from defectscope.models import SimpleNet, SuperSimpleNet

NAN, INF = float("nan"), float("inf")

SSN_BAD = {
    "noise_std-nan": ({"noise_std": NAN}, "noise_std"),
    "noise_std-inf": ({"noise_std": INF}, "noise_std"),
    "noise_std-zero": ({"noise_std": 0.0}, "noise_std"),
    "noise_std-negative": ({"noise_std": -1.0}, "noise_std"),
    "noise_std-text": ({"noise_std": "1.0"}, "noise_std"),
    "lr_scale-nan": ({"lr_scale": NAN}, "lr_scale"),
    "lr_scale-zero": ({"lr_scale": 0.0}, "lr_scale"),
    "lr_scale-negative-inf": ({"lr_scale": -INF}, "lr_scale"),
    "perlin_threshold-nan": ({"perlin_threshold": NAN}, "perlin_threshold"),
    "perlin_threshold-one": ({"perlin_threshold": 1.0}, "perlin_threshold"),
    "perlin_threshold-negative": ({"perlin_threshold": -0.1}, "perlin_threshold"),
    "upscale_factor-zero": ({"upscale_factor": 0}, "upscale_factor"),
    "upscale_factor-fraction": ({"upscale_factor": 1.5}, "upscale_factor"),
    "upscale_factor-bool": ({"upscale_factor": True}, "upscale_factor"),
    "sigma-nan": ({"sigma": NAN}, "sigma"),
    "sigma-zero": ({"sigma": 0.0}, "sigma"),
    "patch_size-zero": ({"patch_size": 0}, "patch_size"),
    "grad_clip-nan": ({"supervised_grad_clip": NAN}, "supervised_grad_clip"),
    "grad_clip-negative": ({"supervised_grad_clip": -1.0}, "supervised_grad_clip"),
    "image_size-tiny": ({"image_size": 16}, "image_size"),
    "image_size-three-sides": ({"image_size": (64, 64, 3)}, "image_size"),
    "image_score-unknown": ({"image_score": "median"}, "image_score"),
    "adaptor_init-unknown": ({"adaptor_init": "zeros"}, "adaptor_init"),
}


@pytest.mark.parametrize(("kwargs", "name"), list(SSN_BAD.values()), ids=list(SSN_BAD))
def test_supersimplenet_refuses_a_bad_setting(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SuperSimpleNet(backbone="efficientnet_lite0", **{"image_size": 64, **kwargs})


SIMPLENET_BAD = {
    "noise_std-nan": {"noise_std": NAN},
    "noise_std-zero": {"noise_std": 0.0},
    "dsc_lr-nan": {"dsc_lr": NAN},
    "meta_epochs-zero": {"meta_epochs": 0},
    "hflip-above-one": {"hflip": 1.5},
}


@pytest.mark.parametrize("kwargs", list(SIMPLENET_BAD.values()), ids=list(SIMPLENET_BAD))
def test_simplenet_refuses_a_bad_setting(kwargs):
    with pytest.raises(ValueError, match="Invalid SimpleNet settings"):
        SimpleNet(pretrained=False, resize=64, imagesize=64, **kwargs)


ENGINE_BAD = {
    "max_epochs-zero": ({"max_epochs": 0}, "max_epochs"),
    "batch_size-zero": ({"batch_size": 0}, "batch_size"),
    "batch_size-fraction": ({"batch_size": 2.5}, "batch_size"),
    "val_fraction-one": ({"val_fraction": 1.0}, "val_fraction"),
    "val_fraction-nan": ({"val_fraction": NAN}, "val_fraction"),
    "val_fraction-negative": ({"val_fraction": -0.1}, "val_fraction"),
    "max_false_reject-zero": ({"max_false_reject": 0.0}, "max_false_reject"),
    "max_false_reject-nan": ({"max_false_reject": NAN}, "max_false_reject"),
    "max_false_reject-one": ({"max_false_reject": 1.0}, "max_false_reject"),
    "threshold_rule-unknown": ({"threshold_rule": "youden"}, "threshold_rule"),
}


@pytest.mark.parametrize(("kwargs", "name"), list(ENGINE_BAD.values()), ids=list(ENGINE_BAD))
def test_engine_refuses_a_bad_setting(kwargs, name, tmp_path):
    with pytest.raises(ValueError, match=name):
        Engine(results_path=tmp_path, accelerator="cpu", **kwargs)


def test_predict_threshold_must_be_finite(tmp_path, make_ssn):
    engine = Engine(results_path=tmp_path, accelerator="cpu", progress=False, max_epochs=1)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        engine.predict(make_ssn(), [tmp_path / "x.png"], threshold=NAN)
