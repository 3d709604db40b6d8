"""Pieces shared by several models: Perlin masks, Gaussian smoothing, feature aggregation.

Everything here is a plain function or a small ``nn.Module`` with no state beyond
buffers, so a model file can use it without pulling in the engine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GaussianBlur2d",
    "FeatureStandardizer",
    "next_power_of_two",
    "perlin_noise",
    "perlin_masks",
    "upscale_and_concat",
]


def next_power_of_two(value: int) -> int:
    """Smallest power of two that is >= ``value`` (``value`` >= 1)."""
    return 1 << (int(value) - 1).bit_length()


def _fade(t: torch.Tensor) -> torch.Tensor:
    # Quintic interpolation curve of improved Perlin noise: zero first and second
    # derivatives at the lattice points, so the noise has no visible grid seams.
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    batch: int,
    height: int,
    width: int,
    scales: torch.Tensor | None = None,
    max_log2_scale: int = 6,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Batch of 2-D gradient (Perlin) noise, all samples computed at once.

    Each sample has its own lattice: ``scales[b] = (sy, sx)`` cells along height and
    width, drawn by default as ``2**k`` with ``k`` uniform in ``[0, max_log2_scale)``
    independently per axis (1 to 32 cells), as in DRAEM / SuperSimpleNet, but at most half
    the grid size (a 16-point axis gets at most 8 cells).
    Noise is computed on a power-of-two grid and resized to ``(height, width)``.

    Returns:
        Tensor ``[batch, height, width]``, values roughly in ``[-1, 1]``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    ph, pw = next_power_of_two(height), next_power_of_two(width)
    if scales is None:
        log2 = torch.randint(0, max_log2_scale, (batch, 2), generator=generator)
        # At most half as many cells as grid points: with more, every point falls on the
        # lattice, where gradient noise is 0, and a small grid would get all-zero noise.
        limit = torch.tensor([max(ph.bit_length() - 2, 0), max(pw.bit_length() - 2, 0)])
        scales = (2 ** torch.minimum(log2, limit)).to(torch.float32)
    scales = scales.to(torch.float32).cpu()
    max_cells = int(scales.max().item()) + 2
    angles = 2 * math.pi * torch.rand(batch, max_cells, max_cells, generator=generator)
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1).to(device)

    scales = scales.to(device)
    u = torch.arange(ph, device=device, dtype=torch.float32)[None] / ph * scales[:, 0:1]  # [B, ph]
    v = torch.arange(pw, device=device, dtype=torch.float32)[None] / pw * scales[:, 1:2]  # [B, pw]
    iu, iv = u.floor().long(), v.floor().long()
    fu, fv = (u - iu)[:, :, None], (v - iv)[:, None, :]  # [B, ph, 1], [B, 1, pw]
    b_idx = torch.arange(batch, device=device)[:, None, None]

    def corner(du: int, dv: int) -> torch.Tensor:
        g = gradients[b_idx, (iu + du)[:, :, None], (iv + dv)[:, None, :]]  # [B, ph, pw, 2]
        return g[..., 0] * (fu - du) + g[..., 1] * (fv - dv)

    tu, tv = _fade(fu), _fade(fv)
    top = torch.lerp(corner(0, 0), corner(1, 0), tu)
    bottom = torch.lerp(corner(0, 1), corner(1, 1), tu)
    noise = math.sqrt(2) * torch.lerp(top, bottom, tv)
    if (ph, pw) != (height, width):
        noise = F.interpolate(noise[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return noise


def perlin_masks(
    batch: int,
    height: int,
    width: int,
    threshold: float = 0.2,
    keep_probability: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Binary Perlin masks ``[batch, 1, height, width]`` (float 0/1) for synthetic anomalies.

    A sample's noise is thresholded at ``threshold``; if no value exceeds it, the noise is
    first stretched to ``[-1, 1]`` so the mask is never empty by accident. Each mask is
    then kept with probability ``keep_probability`` and zeroed otherwise, so about half
    of the perturbed copies stay normal, as in the reference SuperSimpleNet.
    """
    noise = perlin_noise(batch, height, width, generator=generator, device=device)
    flat = noise.reshape(batch, -1)
    empty = ~(flat > threshold).any(dim=1)
    if empty.any():
        lo = flat.min(dim=1, keepdim=True).values
        hi = flat.max(dim=1, keepdim=True).values
        stretched = (flat - lo) / (hi - lo).clamp_min(1e-12) * 2 - 1
        flat = torch.where(empty[:, None], stretched, flat)
    masks = (flat > threshold).to(torch.float32).reshape(batch, 1, height, width)
    keep = (torch.rand(batch, generator=generator) < keep_probability).to(device=masks.device, dtype=masks.dtype)
    return masks * keep[:, None, None, None]


class GaussianBlur2d(nn.Module):
    """Separable Gaussian smoothing of ``[B, C, H, W]`` maps with reflect padding.

    ``kernel_size`` defaults to ``2 * ceil(3 * sigma) + 1`` (covers +-3 sigma).
    """

    def __init__(self, sigma: float = 4.0, kernel_size: int | None = None) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        kernel_size = kernel_size or 2 * math.ceil(3 * sigma) + 1
        x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)
        self.sigma = sigma
        self.kernel_size = kernel_size
        # Banded smoothing matrices by (side, padding mode, dtype), built on first use (_matrix).
        self._matrices: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, C, H, W]`` smoothed, same dtype."""
        b, c, h, w = maps.shape
        pad = self.kernel_size // 2
        mode = "reflect" if min(h, w) > pad else "replicate"
        k = self.kernel.to(maps.dtype)
        if maps.device.type == "cpu" and max(h, w) <= MATMUL_BLUR_MAX_SIZE and self._matmul_ready(h, w, mode, k):
            # The same sums as two products with banded matrices (padding folded in): a
            # one-channel convolution runs far below a matrix product's speed on a CPU
            # (32 maps of 256x256: 203 -> 24 ms on one thread; 512: 191 -> 51 ms; 1024: 194 -> 91 ms).
            x = maps.reshape(b * c, h, w) @ self._matrix(int(w), mode, k)
            x = self._matrix(int(h), mode, k).t() @ x
            return x.reshape(b, c, h, w)
        x = maps.reshape(b * c, 1, h, w)
        x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), k.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), k.view(1, 1, -1, 1))
        return x.reshape(b, c, h, w)

    def _matmul_ready(self, h, w, mode: str, kernel: torch.Tensor) -> bool:
        """Whether the matrix products may run: always in eager mode; while a graph is traced for
        export (the legacy ONNX exporter's tracer, torch.export) only with both matrices already
        cached, so that they enter the graph as constants. Built inside a trace, the matrix's
        accumulating scatter exports as an overwriting one (ONNX ScatterND) and the exported blur
        is wrong, most at the border; the convolution below exports exactly."""
        if not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
            return True
        return all((int(n), mode, kernel.dtype) in self._matrices for n in (h, w))

    def _matrix(self, n: int, mode: str, kernel: torch.Tensor) -> torch.Tensor:
        """``[n, n]`` matrix ``M`` with ``(x @ M)[j] = sum_t kernel[t] x[pad(j + t - r)]``: the 1-D
        smoothing of a length-``n`` signal with ``mode`` padding (r = radius). Cached per size."""
        key = (n, mode, kernel.dtype)
        cache = self._matrices
        if key not in cache:
            # A normal tensor even when first built under torch.inference_mode (scoring a
            # validation set): an inference tensor in the cache would break later autograd use.
            with torch.inference_mode(False):
                cache[key] = self._build_matrix(n, mode, kernel.clone())
        return cache[key]

    @staticmethod
    def _build_matrix(n: int, mode: str, kernel: torch.Tensor) -> torch.Tensor:
        size = len(kernel)
        pos = torch.arange(n)[:, None] + torch.arange(size)[None, :] - size // 2
        if mode == "reflect":  # -1 -> 1, n -> n - 2 (edge not repeated), as F.pad's reflect
            pos = pos.abs()
            pos = torch.where(pos >= n, 2 * (n - 1) - pos, pos)
        else:
            pos = pos.clamp(0, n - 1)
        matrix = torch.zeros(n, n, dtype=kernel.dtype)
        cols = torch.arange(n).repeat_interleave(size)
        matrix.index_put_((pos.reshape(-1), cols), kernel.cpu().repeat(n), accumulate=True)
        return matrix


# Largest map side smoothed by matrix products on CPU (above it the convolution is cheaper:
# the products cost O(side) per pixel, the convolution O(kernel size)).
MATMUL_BLUR_MAX_SIZE = 1024


class FeatureStandardizer(nn.Module):
    """Per-channel standardisation ``(x - mean_c) / std_c`` with statistics fitted on training features.

    Why: constants of the reference models (SuperSimpleNet's noise std 0.015, SimpleNet's
    noise) were tuned on WideResNet-50 activations; other backbones have other scales.
    Standardising makes every backbone's features unit-variance per channel, so a noise
    level means the same thing whatever the backbone. Until :meth:`fit` runs it is the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, chunk: int = 64) -> None:
        """Fit on features ``[N, C, H, W]`` (any float dtype, may be memory-mapped); statistics
        over N, H, W, accumulated in float64 a chunk of images at a time."""
        n, c = features.shape[:2]
        total = torch.zeros(c, dtype=torch.float64)
        total_sq = torch.zeros(c, dtype=torch.float64)
        for start in range(0, n, chunk):
            x = features[start : start + chunk].to(torch.float64)
            total += x.sum(dim=(0, 2, 3)).cpu()
            total_sq += (x * x).sum(dim=(0, 2, 3)).cpu()
        count = n * features.shape[2] * features.shape[3]
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0) * count / max(count - 1, 1)
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(var.sqrt().clamp_min(1e-6).to(self.std))
        self.fitted.fill_(True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean[None, :, None, None]) / self.std[None, :, None, None]


def upscale_and_concat(features: list[torch.Tensor], size: tuple[int, int], patch_size: int = 3) -> torch.Tensor:
    """Resize every map to ``size`` (bilinear), concatenate channels, and average-pool each
    position with its ``patch_size`` x ``patch_size`` neighbours (local context).

    ``[B, C_i, H_i, W_i]`` list -> ``[B, sum C_i, size[0], size[1]]``.
    """
    resized = [f if f.shape[-2:] == tuple(size) else F.interpolate(f, size=size, mode="bilinear") for f in features]
    x = torch.cat(resized, dim=1)
    if patch_size > 1:
        x = F.avg_pool2d(x, kernel_size=patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)
    return x


class SettingError(ValueError):
    """A model setting out of range; ``setting`` names the constructor argument (so the CLI can
    name its option instead)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def check_setting(name: str, value, low: float | None = None, high: float | None = None, *,
                  low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Refuse a model setting that is not a finite number in range (NaN passes ``value <= 0``
    checks silently and trains a NaN model), with one :class:`SettingError` (a ``ValueError``)
    naming the setting."""
    import numbers

    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        raise SettingError(name, f"{name} must be {kind}{' ' + ' and '.join(bounds) if bounds else ''}, got {value!r}")

