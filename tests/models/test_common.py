"""Shared model pieces: Perlin noise and masks, Gaussian smoothing, feature standardisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from defectscope.models import common
from defectscope.models.common import (
    FeatureStandardizer,
    GaussianBlur2d,
    next_power_of_two,
    perlin_masks,
    perlin_noise,
    upscale_and_concat,
)

# ---------------------------------------------------------------------------------------------
# An independent Perlin reference: one sample at a time, written from the textbook definition.


def _quintic(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def reference_perlin(height: int, width: int, cells_y: int, cells_x: int, rng: np.random.Generator) -> np.ndarray:
    """Gradient noise over a ``cells_y`` x ``cells_x`` lattice with random unit gradients,
    quintic fade, scaled by sqrt(2) so that its range is [-1, 1]."""
    angles = rng.uniform(0, 2 * np.pi, size=(cells_y + 1, cells_x + 1))
    grad_y, grad_x = np.cos(angles), np.sin(angles)
    y = np.arange(height)[:, None] / height * cells_y + np.zeros((1, width))
    x = np.arange(width)[None, :] / width * cells_x + np.zeros((height, 1))
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - iy, x - ix

    def influence(dy: int, dx: int) -> np.ndarray:
        return grad_y[iy + dy, ix + dx] * (fy - dy) + grad_x[iy + dy, ix + dx] * (fx - dx)

    wy, wx = _quintic(fy), _quintic(fx)
    top = influence(0, 0) * (1 - wy) + influence(1, 0) * wy
    bottom = influence(0, 1) * (1 - wy) + influence(1, 1) * wy
    return math.sqrt(2) * (top * (1 - wx) + bottom * wx)


def reference_mask_coverages(n: int, size: int, threshold: float, seed: int) -> np.ndarray:
    """Per-sample coverage of masks drawn as documented for ``perlin_masks``: scales 2**k,
    k in 0..5 per axis; threshold; an all-below-threshold noise is stretched to [-1, 1] first;
    each mask kept with probability 0.5."""
    rng = np.random.default_rng(seed)
    coverages = np.empty(n)
    for i in range(n):
        cells_y, cells_x = 2 ** rng.integers(0, 6, size=2)
        noise = reference_perlin(size, size, int(cells_y), int(cells_x), rng)
        if not (noise > threshold).any():
            noise = (noise - noise.min()) / (noise.max() - noise.min()) * 2 - 1
        mask = noise > threshold
        coverages[i] = mask.mean() if rng.random() < 0.5 else 0.0
    return coverages


# ---------------------------------------------------------------------------------------------
# Perlin noise


@pytest.mark.parametrize("size", [(32, 32), (20, 48), (7, 5)])
def test_perlin_noise_shape_and_range(size):
    noise = perlin_noise(6, *size, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (6, *size)
    assert noise.dtype == torch.float32
    assert torch.isfinite(noise).all()
    # sqrt(2) x 2-D Perlin noise with unit gradients lies in [-1, 1] (bilinear resizing keeps it).
    assert noise.abs().max() <= 1 + 1e-5
    assert noise.std() > 0.05  # not degenerate


def test_perlin_noise_is_zero_on_the_lattice():
    # Gradient noise vanishes at every lattice point, whatever the gradients.
    height, width = 32, 64
    scales = torch.tensor([[1.0, 1.0], [2.0, 8.0], [4.0, 32.0], [32.0, 2.0]])
    noise = perlin_noise(len(scales), height, width, scales=scales, generator=torch.Generator().manual_seed(3))
    for b, (sy, sx) in enumerate(scales.tolist()):
        rows = torch.arange(0, height, height // int(sy))
        cols = torch.arange(0, width, width // int(sx))
        on_lattice = noise[b][rows][:, cols]
        assert torch.allclose(on_lattice, torch.zeros_like(on_lattice), atol=1e-6)
        off = torch.ones(height, width, dtype=torch.bool)
        off[rows[:, None], cols[None, :]] = False
        assert noise[b][off].abs().max() > 0.05


def test_perlin_noise_determinism():
    a = perlin_noise(4, 16, 16, generator=torch.Generator().manual_seed(7))
    b = perlin_noise(4, 16, 16, generator=torch.Generator().manual_seed(7))
    c = perlin_noise(4, 16, 16, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# Perlin masks


def test_perlin_masks_shape_binary_and_half_empty():
    n = 600
    masks = perlin_masks(n, 24, 40, threshold=0.2, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (n, 1, 24, 40)
    assert masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    empty = (masks.flatten(1).sum(dim=1) == 0).float().mean().item()
    # Binomial(600, 0.5): standard deviation ~0.02.
    assert 0.42 < empty < 0.58
    # A kept mask is never empty by accident, and never covers everything.
    coverage = masks.flatten(1).mean(dim=1)
    kept = coverage[coverage > 0]
    assert kept.max() < 1


@pytest.mark.parametrize("size", [(64, 64), (16, 16), (8, 8), (4, 6)])
def test_perlin_masks_keep_probability_extremes(size):
    # Small grids matter: feature maps of 64-256 px images are 8-32 points wide, and a
    # lattice finer than the grid would give all-zero noise (hence empty "kept" masks).
    generator = torch.Generator().manual_seed(1)
    none_kept = perlin_masks(200, *size, keep_probability=0.0, generator=generator)
    all_kept = perlin_masks(200, *size, keep_probability=1.0, generator=generator)
    assert none_kept.sum() == 0
    assert (all_kept.flatten(1).sum(dim=1) > 0).all()


def test_perlin_masks_determinism_with_generator():
    a = perlin_masks(32, 16, 16, generator=torch.Generator().manual_seed(5))
    b = perlin_masks(32, 16, 16, generator=torch.Generator().manual_seed(5))
    c = perlin_masks(32, 16, 16, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_perlin_masks_threshold_monotone():
    low = perlin_masks(16, 32, 32, threshold=0.1, keep_probability=1.0, generator=torch.Generator().manual_seed(2))
    high = perlin_masks(16, 32, 32, threshold=0.5, keep_probability=1.0, generator=torch.Generator().manual_seed(2))
    # Same noise, higher threshold: the masks shrink.
    assert (high <= low).all()
    assert high.sum() < low.sum()


def test_perlin_mask_coverage_matches_reference_distribution():
    """Mean coverage of kept masks (and the kept share) agree with a per-sample reference."""
    # 64 x 64 (SuperSimpleNet's feature grid): every lattice scale 1..32 is finer than the grid.
    size, threshold = 64, 0.2
    ours = perlin_masks(2000, size, size, threshold=threshold, generator=torch.Generator().manual_seed(11))
    ours = ours.flatten(1).mean(dim=1).double().numpy()
    ref = reference_mask_coverages(1500, size, threshold, seed=12)

    def summary(coverages):
        kept = coverages[coverages > 0]
        return kept.mean(), kept.std(ddof=1) / math.sqrt(len(kept)), len(kept) / len(coverages)

    ours_mean, ours_se, ours_kept = summary(ours)
    ref_mean, ref_se, ref_kept = summary(ref)
    assert 0.1 < ref_mean < 0.4  # the reference itself is sane
    assert abs(ours_mean - ref_mean) < 4 * math.hypot(ours_se, ref_se) + 0.005, (ours_mean, ref_mean)
    assert abs(ours_kept - ref_kept) < 0.08
    # Spread of the coverage across samples (driven by the lattice scales) agrees too.
    ours_q = np.quantile(ours[ours > 0], [0.1, 0.5, 0.9])
    ref_q = np.quantile(ref[ref > 0], [0.1, 0.5, 0.9])
    assert np.allclose(ours_q, ref_q, atol=0.03), (ours_q, ref_q)


# ---------------------------------------------------------------------------------------------
# Gaussian smoothing


@pytest.fixture(params=["matmul", "conv"])
def blur_path(request, monkeypatch):
    """Run a smoothing test through the banded-matrix products (maps up to
    MATMUL_BLUR_MAX_SIZE on CPU) and through the convolutions (larger maps, GPU)."""
    if request.param == "conv":
        monkeypatch.setattr(common, "MATMUL_BLUR_MAX_SIZE", 0)
    return request.param


@pytest.mark.parametrize("sigma", [1.5, 4.0])
def test_gaussian_blur_matches_scipy_away_from_borders(sigma, blur_path):
    blur = GaussianBlur2d(sigma=sigma)
    radius = blur.kernel_size // 2
    assert blur.kernel_size == 2 * math.ceil(3 * sigma) + 1
    maps = torch.rand(2, 3, 2 * radius + 20, 2 * radius + 27, generator=torch.Generator().manual_seed(0))
    ours = blur(maps).numpy()
    assert ours.shape == maps.shape
    reference = ndimage.gaussian_filter(
        maps.double().numpy(), sigma=(0, 0, sigma, sigma), mode="reflect", truncate=radius / sigma
    )
    inner = (slice(None), slice(None), slice(radius, -radius), slice(radius, -radius))
    np.testing.assert_allclose(ours[inner], reference[inner], atol=1e-5)
    # torch's "reflect" padding is scipy's "mirror" mode: the whole map agrees then.
    mirror = ndimage.gaussian_filter(
        maps.double().numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=radius / sigma
    )
    np.testing.assert_allclose(ours, mirror, atol=1e-5)


def test_gaussian_blur_small_map_replicates_edges(blur_path):
    # Smaller than the kernel radius: reflect padding is impossible, edges are replicated.
    blur = GaussianBlur2d(sigma=4.0)
    maps = torch.rand(1, 1, 9, 11, generator=torch.Generator().manual_seed(1))
    reference = ndimage.gaussian_filter(maps[0, 0].double().numpy(), sigma=4.0, mode="nearest", truncate=12 / 4.0)
    np.testing.assert_allclose(blur(maps)[0, 0].numpy(), reference, atol=1e-5)


def test_gaussian_blur_paths_agree_on_a_model_sized_map(monkeypatch):
    blur = GaussianBlur2d(sigma=4.0)
    maps = torch.randn(3, 1, 256, 200, generator=torch.Generator().manual_seed(2))
    fast = blur(maps)
    monkeypatch.setattr(common, "MATMUL_BLUR_MAX_SIZE", 0)
    torch.testing.assert_close(fast, blur(maps), rtol=1e-5, atol=1e-6)
    assert len(blur._matrices) == 2  # one matrix per side length, built once


def test_gaussian_blur_rejects_bad_sigma():
    with pytest.raises(ValueError, match="sigma"):
        GaussianBlur2d(sigma=0)


# ---------------------------------------------------------------------------------------------
# Feature standardisation


def _scaled_features(dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([-3.0, 0.0, 5.0, 120.0, 0.2]).view(1, 5, 1, 1)
    scales = torch.tensor([0.01, 1.0, 7.0, 40.0, 0.5]).view(1, 5, 1, 1)
    return (torch.randn(13, 5, 6, 7, generator=generator) * scales + offsets).to(dtype)


def test_feature_standardizer_is_identity_until_fitted():
    x = _scaled_features()
    standardizer = FeatureStandardizer(5)
    assert not bool(standardizer.fitted)
    assert torch.equal(standardizer(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_feature_standardizer_fit_gives_zero_mean_unit_std(dtype):
    x = _scaled_features(dtype)
    standardizer = FeatureStandardizer(5)
    standardizer.fit(x)
    assert bool(standardizer.fitted)
    x64 = x.double()
    np.testing.assert_allclose(standardizer.mean.numpy(), x64.mean(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    reference_std = x64.transpose(0, 1).reshape(5, -1).std(dim=1, unbiased=True)
    np.testing.assert_allclose(standardizer.std.numpy(), reference_std.numpy(), rtol=1e-4)
    out = standardizer(x.float()).double()
    np.testing.assert_allclose(out.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(out.transpose(0, 1).reshape(5, -1).std(dim=1).numpy(), 1, atol=1e-4)


def test_feature_standardizer_chunks_equal_whole(tmp_path):
    x = _scaled_features()
    whole, chunked, memmapped = FeatureStandardizer(5), FeatureStandardizer(5), FeatureStandardizer(5)
    whole.fit(x, chunk=len(x))
    chunked.fit(x, chunk=4)  # 13 images: chunks of 4, 4, 4, 1
    array = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=tuple(x.shape))
    array[:] = x.numpy()
    memmapped.fit(torch.from_numpy(array), chunk=5)
    for other in (chunked, memmapped):
        np.testing.assert_allclose(other.mean.numpy(), whole.mean.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(other.std.numpy(), whole.std.numpy(), rtol=1e-6)


def test_feature_standardizer_constant_channel_does_not_divide_by_zero():
    x = torch.randn(4, 2, 3, 3)
    x[:, 1] = 2.5
    standardizer = FeatureStandardizer(2)
    standardizer.fit(x)
    out = standardizer(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 1], torch.zeros_like(out[:, 1]))


# ---------------------------------------------------------------------------------------------
# Small helpers


def test_next_power_of_two():
    for value in range(1, 1100):
        expected = 1
        while expected < value:
            expected *= 2
        assert next_power_of_two(value) == expected


def test_upscale_and_concat():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 8, 8, generator=generator)
    b = torch.rand(2, 5, 4, 4, generator=generator)
    out = upscale_and_concat([a, b], size=(8, 8), patch_size=1)
    assert out.shape == (2, 8, 8, 8)
    assert torch.equal(out[:, :3], a)  # already at the size: untouched
    # Bilinear x2 (half-pixel centres): output (1, 1) sits at source (0.25, 0.25).
    expected = 0.5625 * b[..., 0, 0] + 0.1875 * (b[..., 0, 1] + b[..., 1, 0]) + 0.0625 * b[..., 1, 1]
    np.testing.assert_allclose(out[:, 3:, 1, 1].numpy(), expected.numpy(), rtol=1e-5)

    pooled = upscale_and_concat([a, b], size=(8, 8), patch_size=3)
    # Interior positions: the plain mean of the 3x3 neighbourhood.
    full = out.numpy()
    for y, x in [(1, 1), (4, 5), (6, 2)]:
        np.testing.assert_allclose(
            pooled[:, :, y, x].numpy(), full[:, :, y - 1 : y + 2, x - 1 : x + 2].mean(axis=(2, 3)), rtol=1e-5
        )
    # Borders: zero padding counted (count_include_pad), as in the reference average pooling.
    np.testing.assert_allclose(pooled[:, :, 0, 0].numpy(), full[:, :, :2, :2].sum(axis=(2, 3)) / 9, rtol=1e-5)
