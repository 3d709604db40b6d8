"""Shared by the command-line tests (imported by name, like tests/engine/_engine_helpers)."""

from __future__ import annotations

import csv

import pytest
import torch

from defectscope.cli import main


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """torch on one thread: on a small shared CPU, OpenMP threads that wait for each other make
    tiny tensor ops tens of times slower than one thread does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Relative defaults (results/, predictions/) must never land in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")


def run_cli(argv: list) -> int:
    """``main(argv)`` as a process would end: its return value, or the SystemExit status."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as err:
        if err.code is None:
            return 0
        return err.code if isinstance(err.code, int) else 1


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def save_untrained_ssn(folder, score_images, pixel_threshold: float):
    """A 64 px SuperSimpleNet with fitted feature statistics and no training (fast), its image
    threshold the median score of ``score_images`` and the given pixel threshold, saved to
    ``folder`` (a model folder ``load_model`` and ``predict`` take). One torch thread while built.
    Returns the model."""
    import numpy as np

    from defectscope.models import SuperSimpleNet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = SuperSimpleNet(backbone="efficientnet_lite0", image_size=64).eval()
        with torch.inference_mode():
            x = torch.rand(4, 3, 64, 64)
            mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
            model.fit_feature_statistics(model.extract_features((x - mean) / std))
        scores = [model.predict(p)[0] for p in score_images]
        model.threshold.fill_(float(np.median(scores)))
        model.pixel_threshold = pixel_threshold
        model.save(folder)
    finally:
        torch.set_num_threads(threads)
    return model
