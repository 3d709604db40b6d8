"""Shared fixtures for the model tests: small models, isolated weight caches, one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run torch on one thread: on a small shared CPU, OpenMP threads that wait for each other
    make tiny tensor ops tens of times slower than one thread does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_ssn(**kwargs):
    """A SuperSimpleNet on the packaged EfficientNet-Lite0 at 64 px (override anything)."""
    from defectscope.models import SuperSimpleNet

    options = dict(backbone="efficientnet_lite0", image_size=64)
    options.update(kwargs)
    return SuperSimpleNet(**options)


@pytest.fixture(scope="session")
def make_ssn():
    """:func:`small_ssn` as a fixture (test modules cannot import a conftest by name)."""
    return small_ssn


@pytest.fixture(scope="session")
def pretrained_ssn():
    """A pretrained-backbone SuperSimpleNet (64 px) with fitted statistics and non-trivial heads.

    Shared and read-only: tests that change a model build their own with ``make_ssn``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # built before the module-scoped single_thread fixture runs
    torch.manual_seed(0)
    model = small_ssn()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        images = torch.rand(4, 3, 64, 64, generator=generator)
        mean = torch.tensor(model.mean).view(1, 3, 1, 1)
        std = torch.tensor(model.std).view(1, 3, 1, 1)
        model.fit_feature_statistics(model.extract_features((images - mean) / std))
        # Perturb BatchNorm running statistics so they matter (and must be saved / loaded).
        for module in model.segdec.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    model.threshold.fill_(0.37)
    torch.set_num_threads(threads)
    return model.eval()
