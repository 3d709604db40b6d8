"""Frozen-feature cache: its key, the memory-mapped file, and training from it."""

from __future__ import annotations

import shutil

import lightning as L
import numpy as np
import pytest
import torch
from _engine_helpers import CATEGORIES, assert_same_state, build_model, make_engine, trained_state
from PIL import Image

from defectscope.data import AnomalyDataset, mvtec_split
from defectscope.engine import cache_key, extract_features


def _dataset(model, samples):
    return AnomalyDataset(samples, image_size=model.image_size, mean=model.mean, std=model.std)


@pytest.fixture(scope="module")
def lite():
    return build_model()


@pytest.fixture(scope="module")
def fabric():
    return L.Fabric(accelerator="cpu", devices=1)


def test_cache_key_is_stable_for_the_same_model_and_files(lite, splits):
    train = splits[CATEGORIES[0]].train
    assert cache_key(lite, _dataset(lite, train)) == cache_key(build_model(seed=5), _dataset(lite, train))
    # Other files, or the same files in another order, are other features.
    assert cache_key(lite, _dataset(lite, train)) != cache_key(lite, _dataset(lite, train[:-1]))
    assert cache_key(lite, _dataset(lite, train)) != cache_key(lite, _dataset(lite, train[::-1]))


def test_cache_key_changes_when_an_image_file_changes(lite, synthetic_root, tmp_path):
    shutil.copytree(synthetic_root / CATEGORIES[0], tmp_path / CATEGORIES[0])
    train = mvtec_split(tmp_path, CATEGORIES[0]).train
    before = cache_key(lite, _dataset(lite, train))
    path = train[3].path
    pixels = np.asarray(Image.open(path).convert("RGB")).copy()
    pixels[10:20, 10:20] = 255 - pixels[10:20, 10:20]  # same size, same format, other content
    Image.fromarray(pixels).save(path)
    assert cache_key(lite, _dataset(lite, train)) != before


@pytest.mark.parametrize(
    "change",
    [
        dict(pretrained=False),  # other backbone weights
        dict(backbone="efficientnet_lite1"),
        dict(layers=["blocks.1", "blocks.4"]),
        dict(image_size=96),
        dict(upscale_factor=2),
        dict(patch_size=5),
    ],
    ids=lambda change: ",".join(change),
)
def test_cache_key_changes_with_backbone_layers_size_and_feature_settings(lite, splits, change):
    train = splits[CATEGORIES[0]].train
    other = build_model(**change)
    assert cache_key(other, _dataset(other, train)) != cache_key(lite, _dataset(lite, train))


def test_memory_mapped_features_equal_in_memory_ones(lite, splits, fabric, tmp_path, monkeypatch):
    dataset = _dataset(lite, splits[CATEGORIES[0]].train)
    in_memory = extract_features(lite, dataset, fabric, batch_size=3, progress=False)
    assert in_memory.dtype == torch.float32 and in_memory.shape[0] == len(dataset)

    cached = extract_features(lite, dataset, fabric, batch_size=3, max_memory_gb=0, cache_dir=tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"features-{cache_key(lite, dataset)}.npy"]  # no partial file left
    on_disk = np.load(tmp_path / files[0], mmap_mode="r")
    assert isinstance(on_disk, np.memmap)
    assert torch.equal(cached, in_memory)
    np.testing.assert_array_equal(on_disk, in_memory.numpy())

    # A second call reuses the file and does not run the backbone.
    def no_backbone(*args, **kwargs):
        raise AssertionError("features were computed again")

    monkeypatch.setattr(lite, "extract_features", no_backbone)
    again = extract_features(lite, dataset, fabric, max_memory_gb=0, cache_dir=tmp_path, progress=False)
    assert torch.equal(again, in_memory)


def test_over_the_memory_bound_without_a_cache_dir_raises(lite, splits, fabric):
    dataset = _dataset(lite, splits[CATEGORIES[0]].train)
    with pytest.raises(MemoryError, match="cache_dir"):
        extract_features(lite, dataset, fabric, max_memory_gb=0, progress=False)


def test_training_from_memory_mapped_features_gives_the_same_model(reference_run, splits, tmp_path):
    engine = make_engine(tmp_path, "memmap", cache_memory_gb=0)
    model = engine.fit(build_model(), splits[CATEGORIES[0]].train)
    assert len(list((engine.run_dir / "cache").glob("features-*.npy"))) == 1
    assert_same_state(trained_state(model), reference_run["state"])


def test_features_over_the_memory_bound_are_memory_mapped_under_the_run_folder(reference_run, splits, tmp_path):
    # 8 images x 152 x 8 x 8 float32 = 311 kB: over a 0.0001 GB (107 kB) bound, so memory-mapped.
    engine = make_engine(tmp_path, "over", cache_memory_gb=0.0001)
    model = engine.fit(build_model(), splits[CATEGORIES[0]].train)
    assert len(list((engine.run_dir / "cache").glob("features-*.npy"))) == 1
    assert_same_state(trained_state(model), reference_run["state"])
    # Under the bound (the reference run, 4 GB): kept in memory, nothing written.
    assert not (reference_run["run_dir"] / "cache").exists()


def test_training_with_the_cache_gives_the_same_model_as_features_every_step(reference_run, splits, tmp_path):
    engine = make_engine(tmp_path, "no-cache", cache_features=False)
    model = engine.fit(build_model(), splits[CATEGORIES[0]].train)
    state = trained_state(model)
    for key, tensor in reference_run["state"].items():
        # Only the backbone's batch composition differs (3 images per cache batch vs the
        # training batch), so agreement is to float32 round-off.
        torch.testing.assert_close(state[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


def test_caches_over_the_float16_bound_are_stored_as_float16(lite, splits, fabric, tmp_path):
    dataset = _dataset(lite, splits[CATEGORIES[0]].train)
    exact = extract_features(lite, dataset, fabric, batch_size=3, progress=False)
    half = extract_features(lite, dataset, fabric, batch_size=3, progress=False, float16_above_gb=0)
    assert exact.dtype == torch.float32 and half.dtype == torch.float16
    assert torch.equal(half, exact.half())
    mapped = extract_features(lite, dataset, fabric, batch_size=3, max_memory_gb=0, cache_dir=tmp_path,
                              progress=False, float16_above_gb=0)
    assert mapped.dtype == torch.float16 and torch.equal(mapped, half)
