import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_caches(empty_weight_caches):
    """Every backbone test runs with empty weight caches (fixture in tests/conftest.py)."""
    return empty_weight_caches


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
