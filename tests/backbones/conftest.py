import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Point every weight cache at empty temporary folders, so tests never see (or fill) the
    machine's real torch hub / Hugging Face caches."""
    torch_home, hf_home = tmp_path / "torch_home", tmp_path / "hf_home"
    torch_home.mkdir()
    hf_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return torch_home, hf_home


@pytest.fixture
def random_resnet18_state():
    """A resnet18 state dict of random values (unlike any initialisation), in timm naming."""
    import timm

    generator = torch.Generator().manual_seed(0)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    return {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in state.items()
    }
