import pytest
import torch

from defectscope.backbones import FeatureExtractor, create_classifier, feature_layer_names


@pytest.fixture(scope="module")
def lite0():
    return FeatureExtractor("efficientnet_lite0")


def test_lite0_default_layers_shapes_and_strides(lite0):
    assert lite0.layers == ["blocks.2", "blocks.4"]
    assert lite0.channels == [40, 112]
    assert lite0.strides == [8, 16]
    assert lite0.config.mean == (0.5, 0.5, 0.5)
    assert "packaged" in lite0.weights_source
    with torch.no_grad():
        features = lite0(torch.randn(2, 3, 256, 256))
    assert list(features) == lite0.layers
    for (name, tensor), channels, stride in zip(features.items(), lite0.channels, lite0.strides):
        assert tensor.shape == (2, channels, 256 // stride, 256 // stride), name
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_feature_module_names(name):
    assert feature_layer_names(name) == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]


def test_frozen_and_stays_in_eval(lite0):
    assert all(not p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    images = torch.randn(1, 3, 64, 64, requires_grad=True)
    features = lite0(images)
    features["blocks.4"].sum().backward()  # gradients reach the input, never the weights
    assert images.grad is not None
    assert all(p.grad is None for p in lite0.parameters())


def test_eval_batchnorm_statistics_do_not_move(lite0):
    before = {k: v.clone() for k, v in lite0.state_dict().items()}
    lite0.train()
    lite0(torch.randn(2, 3, 64, 64) * 5)
    for key, value in lite0.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        FeatureExtractor("efficientnet_lite0", layers=["blocks.3"], pretrained=False)
    assert "blocks.3" in str(info.value) and "'blocks.4'" in str(info.value)
    with pytest.raises(ValueError, match="layer2"):
        FeatureExtractor("resnet18", layers=["layer5"], pretrained=False)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="Did you mean 'resnet18'"):
        FeatureExtractor("resnet19", pretrained=False)


def test_random_weights_need_no_file():
    extractor = FeatureExtractor("wide_resnet50_2", pretrained=False)
    assert extractor.layers == ["layer2", "layer3"]
    assert extractor.channels == [512, 1024] and extractor.strides == [8, 16]
    assert "random" in extractor.weights_source
    with pytest.raises(ValueError, match="pretrained=False"):
        FeatureExtractor("resnet18", weights="x.pth", pretrained=False)


def test_layers_are_returned_in_network_order():
    extractor = FeatureExtractor("resnet18", layers=["layer3", "layer1"], pretrained=False)
    assert extractor.layers == ["layer1", "layer3"]
    with torch.no_grad():
        features = extractor(torch.randn(1, 3, 70, 70))
    assert [tuple(t.shape) for t in features.values()] == [(1, 64, 18, 18), (1, 256, 5, 5)]


def test_bad_input_shape(lite0):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        lite0(torch.randn(3, 64, 64))


def test_weights_from_file_reach_the_extractor(tmp_path, random_resnet18_state):
    path = tmp_path / "resnet18_random.pth"
    torch.save(random_resnet18_state, path)
    extractor = FeatureExtractor("resnet18", layers=["layer2", "layer3"], weights=path)
    assert str(path) in extractor.weights_source
    loaded = extractor.model.state_dict()
    assert loaded  # feature model keeps timm's names; it drops only layer4 and fc
    assert not any(k.startswith(("layer4", "fc")) for k in loaded)
    for key, value in loaded.items():
        assert torch.equal(value, random_resnet18_state[key]), key

    classifier = create_classifier("resnet18", weights=path)
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, random_resnet18_state[key]), key


def test_fingerprint(tmp_path, random_resnet18_state, lite0):
    path = tmp_path / "w.pth"
    torch.save(random_resnet18_state, path)
    first = FeatureExtractor("resnet18", weights=path)
    again = FeatureExtractor("resnet18", weights=path)
    other_layers = FeatureExtractor("resnet18", layers=["layer1", "layer2"], weights=path)
    changed = dict(random_resnet18_state)
    changed["layer1.0.conv1.weight"] = changed["layer1.0.conv1.weight"] + 1.0
    other_weights = FeatureExtractor("resnet18", weights=changed)
    assert len(first.fingerprint) == 16
    assert first.fingerprint == again.fingerprint
    assert len({first.fingerprint, other_layers.fingerprint, other_weights.fingerprint,
                lite0.fingerprint}) == 4
    assert FeatureExtractor("efficientnet_lite0").fingerprint == lite0.fingerprint


def test_lite0_features_match_the_classifier_trunk(lite0):
    classifier = create_classifier("efficientnet_lite0")
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        features = lite0(images)
        x = classifier.bn1(classifier.conv_stem(images))
        for index in range(5):
            x = classifier.blocks[index](x)
            if f"blocks.{index}" in features:
                assert torch.equal(features[f"blocks.{index}"], x), index
