"""Helpers shared by the engine tests (imported by name, like tests/metrics/_metrics_reference)."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import torch

CATEGORIES = ("fabric", "wood")
EPOCHS = 3
BATCH = 4


@contextlib.contextmanager
def one_thread():
    """torch on one thread: on a small shared CPU, OpenMP threads that wait for each other make
    tiny tensor ops tens of times slower than one thread does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_model(seed: int = 0, **kwargs):
    """SuperSimpleNet on the packaged EfficientNet-Lite0, 64 px, backbone resolution (8x8 grid).

    The engine's seed covers training; the heads' initial weights come from torch's global
    generator when the model is built, so the tests seed that themselves.
    """
    from defectscope.models import SuperSimpleNet

    torch.manual_seed(seed)
    options = dict(backbone="efficientnet_lite0", image_size=64, upscale_factor=1)
    options.update(kwargs)
    return SuperSimpleNet(**options)


def make_engine(results: Path, run_name: str, **kwargs):
    from defectscope.engine import Engine

    options = dict(
        results_path=results, project="proj", group="grp", run_name=run_name, max_epochs=EPOCHS,
        batch_size=BATCH, seed=0, accelerator="cpu", progress=False,
    )
    options.update(kwargs)
    return Engine(**options)


def trained_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.trained_state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    """Two trained states hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def read_results(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
