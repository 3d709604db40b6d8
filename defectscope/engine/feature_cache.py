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
import math
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
                "roi": getattr(model, "roi_info", None) or None,
            },
            sort_keys=True,
        ).encode()
    )
    for sample in dataset.samples:
        stat = Path(sample.path).stat()
        box = getattr(sample, "box", None)  # a tile (data/tiling.py)
        h.update(f"{sample.path}|{stat.st_size}|{stat.st_mtime_ns}{f'|{box}' if box else ''}\n".encode())
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
    the features exceed ``max_memory_gb``, which then needs a ``cache_dir``. Under DDP each
    process runs the backbone on its share of the images only and every process returns the
    complete features (see :func:`_extract_shared`).
    """
    key = cache_key(model, dataset)
    cache_file = Path(cache_dir) / f"features-{key}.npy" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        return _open(cache_file)
    if fabric.world_size > 1:
        return _extract_shared(model, dataset, fabric, batch_size, num_workers, max_memory_gb, cache_file, progress,
                               float16_above_gb)

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = fabric.device
    features = None
    start = 0
    with progress_bar("Extracting backbone features", total=len(dataset), enabled=progress) as advance:
        for batch in loader:
            feats = model.extract_features(batch["image"].to(device)).to("cpu", torch.float32).contiguous()
            if features is None:
                features = _empty_cache((len(dataset), *feats.shape[1:]), max_memory_gb, float16_above_gb, cache_file)
            features[start : start + len(feats)] = feats.numpy().astype(features.dtype, copy=False)
            start += len(feats)
            advance(len(feats))
    if isinstance(features, np.memmap):
        features.flush()
        del features  # close the map before the file is renamed
        _partial(cache_file).replace(cache_file)  # only complete files carry the name
        return _open(cache_file)
    return torch.from_numpy(features)


def _open(cache_file: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(cache_file, mmap_mode="r+"))


def _partial(cache_file: Path) -> Path:
    """Where a memory-mapped cache is written until it is complete."""
    return cache_file.with_suffix(".partial.npy")


def _cache_layout(shape, max_memory_gb: float, float16_above_gb: float, cache_file: Path | None):
    """(dtype, memory-mapped?) of a cache of ``shape``: float16 above ``float16_above_gb`` (as
    float32), memory-mapped above ``max_memory_gb``, which needs a ``cache_file``."""
    dtype = np.float32 if int(np.prod(shape)) * 4 <= float16_above_gb * 2**30 else np.float16
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    mapped = nbytes > max_memory_gb * 2**30
    if mapped and cache_file is None:
        raise MemoryError(
            f"Cached features need {nbytes / 2**30:.1f} GiB, over max_memory_gb={max_memory_gb}. "
            "Give a cache_dir for a memory-mapped file or raise the bound."
        )
    return dtype, mapped


def _empty_cache(shape, max_memory_gb: float, float16_above_gb: float, cache_file: Path | None) -> np.ndarray:
    """Uninitialised cache array: in memory, or a memory-mapped ``.partial.npy`` next to ``cache_file``."""
    dtype, mapped = _cache_layout(shape, max_memory_gb, float16_above_gb, cache_file)
    if not mapped:
        return np.empty(shape, dtype=dtype)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(_partial(cache_file), mode="w+", dtype=dtype, shape=shape)


def _extract_shared(
    model, dataset, fabric, batch_size, num_workers, max_memory_gb, cache_file, progress, float16_above_gb
) -> torch.Tensor:
    """:func:`extract_features` under DDP: each process extracts a share, all get every feature.

    The split is by whole batches of the single-process loop (images ``[k*B, (k+1)*B)`` form
    batch ``k``), dealt round-robin: in round ``j`` process ``r`` extracts batch ``j*W + r``.
    Splitting per batch rather than per image keeps every image in the batch it has on one
    process, so the features are bit-identical to one process's (a convolution's result can
    depend on the batch it runs in, in the last float bits).

    After each round the W batches are all-gathered, so every process fills its cache in
    dataset order while only W batches are in flight (a memory-mapped cache stays within its
    memory bound). Shares are unequal (the last batch may be short, and in the last round some
    processes may have no batch): each process pads its batch with zeros to B rows, and every
    process knows from (N, B, W) alone how many rows of each gathered batch are real.

    A memory-mapped cache is written by rank 0 only (every process writing the same file
    would race); the others open it once it is complete, so the cache folder must be visible
    to every process, as it is on one machine.
    """
    n, world, rank = len(dataset), fabric.world_size, fabric.global_rank
    device = fabric.device
    n_batches = math.ceil(n / batch_size)

    def rows(k: int) -> range:  # the images of batch k
        return range(k * batch_size, min((k + 1) * batch_size, n))

    mine = [list(rows(k)) for k in range(rank, n_batches, world)]
    batches = iter(DataLoader(dataset, batch_sampler=mine, num_workers=num_workers))
    features = padded = None
    mapped = False
    with progress_bar("Extracting backbone features", total=n, enabled=progress) as advance:
        for first in range(0, n_batches, world):  # one round: batches first .. first + world - 1
            feats = None
            if first + rank < n_batches:
                feats = model.extract_features(next(batches)["image"].to(device)).to(torch.float32)
            if padded is None:
                # Rank 0 always holds batch 0; its feature shape sizes every process's cache.
                shape = fabric.broadcast(tuple(feats.shape[1:]) if rank == 0 else None, src=0)
                _, mapped = _cache_layout((n, *shape), max_memory_gb, float16_above_gb, cache_file)
                if not mapped or rank == 0:
                    features = _empty_cache((n, *shape), max_memory_gb, float16_above_gb, cache_file)
                padded = torch.zeros(batch_size, *shape, device=device)
            padded.zero_()
            if feats is not None:
                padded[: len(feats)] = feats
            gathered = fabric.all_gather(padded).cpu()  # [world, batch_size, C, h, w]
            for r in range(world):
                if first + r < n_batches and features is not None:
                    k = rows(first + r)
                    features[k.start : k.stop] = gathered[r, : len(k)].numpy().astype(features.dtype, copy=False)
            advance(sum(len(rows(k)) for k in range(first, min(first + world, n_batches))))
    if not mapped:
        return torch.from_numpy(features)
    if rank == 0:
        features.flush()
        del features  # close the map before the file is renamed
        _partial(cache_file).replace(cache_file)  # only complete files carry the name
    fabric.barrier()  # the file is complete and renamed before anyone opens it
    return _open(cache_file)
