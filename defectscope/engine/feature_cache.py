"""Frozen-backbone features computed once per run and reused every epoch.

The backbone never trains and pre-processing is deterministic (no augmentation), so an
image's features are the same in every epoch: computing them once turns an epoch into
the heads' arithmetic alone. Features are stored as float32 (exactly what the backbone gave,
so training from the cache gives the same model as computing features every step) up to
``float16_above_gb``; larger caches are stored as float16, which halves their memory and rounds
each value to float16 (relative error below 5e-4). They are kept in memory when they fit under
``max_memory_gb``, otherwise in a memory-mapped file. The cache key covers the
backbone fingerprint (name, layers, weights), the feature settings and every image file's
path, size and modification time, so a stale entry can never be reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from defectscope.engine.progress import progress_bar


def cache_key(model, dataset) -> str:
    """Hex digest identifying the features ``model.extract_features`` gives for ``dataset``."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "model": model.name,
                "backbone": model.feature_extractor.fingerprint,
                "feature_params": model.feature_params(),
                "image_size": list(model.image_size),
                "mean": list(model.mean),
                "std": list(model.std),
            },
            sort_keys=True,
        ).encode()
    )
    for sample in dataset.samples:
        stat = Path(sample.path).stat()
        h.update(f"{sample.path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def extract_features(
    model,
    dataset,
    fabric,
    batch_size: int = 32,
    num_workers: int = 0,
    max_memory_gb: float = 4.0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    float16_above_gb: float = 1.0,
) -> torch.Tensor:
    """Features ``[N, C, h, w]`` (float32, or float16 above ``float16_above_gb``; CPU) of every
    image in ``dataset``, in order.

    Reuses ``<cache_dir>/features-<key>.npy`` when present; writes it (memory-mapped) when
    the features exceed ``max_memory_gb``, which then needs a ``cache_dir``.
    """
    key = cache_key(model, dataset)
    cache_file = Path(cache_dir) / f"features-{key}.npy" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        return torch.from_numpy(np.load(cache_file, mmap_mode="r+"))

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = fabric.device
    features = None
    start = 0
    with progress_bar("Extracting backbone features", total=len(dataset), enabled=progress) as advance:
        for batch in loader:
            feats = model.extract_features(batch["image"].to(device)).to("cpu", torch.float32).contiguous()
            if features is None:
                shape = (len(dataset), *feats.shape[1:])
                dtype = np.float32 if int(np.prod(shape)) * 4 <= float16_above_gb * 2**30 else np.float16
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                if nbytes > max_memory_gb * 2**30:
                    if cache_file is None:
                        raise MemoryError(
                            f"Cached features need {nbytes / 2**30:.1f} GiB, over max_memory_gb={max_memory_gb}. "
                            "Give a cache_dir for a memory-mapped file or raise the bound."
                        )
                    cache_file.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cache_file.with_suffix(".partial.npy")
                    features = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
                else:
                    features = np.empty(shape, dtype=dtype)
            features[start : start + len(feats)] = feats.numpy().astype(features.dtype, copy=False)
            start += len(feats)
            advance(len(feats))
    if isinstance(features, np.memmap):
        features.flush()
        del features
        tmp.replace(cache_file)
        return torch.from_numpy(np.load(cache_file, mmap_mode="r+"))
    return torch.from_numpy(features)
