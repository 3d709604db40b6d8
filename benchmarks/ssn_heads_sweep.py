"""Unsupervised SuperSimpleNet settings on ELPV against the nearest-neighbour floor.

Run by hand (not in CI):

    python benchmarks/ssn_heads_sweep.py --cells mono poly --seeds 0 1 2 \\
        --settings 1.0:2 0.5:2 0.5:4 1.0:2:xavier [--epochs 3] [--threads 2]

Each setting is ``noise_std:lr_scale[:adaptor_init]`` (adaptor_init: the model's default,
orthogonal, unless given). The demo's features (EfficientNet-Lite0 blocks.2 +
blocks.4, 256 px, 32x32 grid, the demo's split) are extracted once per cell type and kept in
``$BENCH_DIR`` (default /tmp/ssn_bench). The heads then train on them in the engine's steps
(batch 8, the model's own optimiser and schedule, a one-image last batch skipped; the shuffle comes
from torch's global generator, seeded per run, not the engine's per-epoch one), and every epoch is scored by the map maximum on the test
split. The floor is :mod:`nn_floor`'s score on the same features; for the first seed of each
setting a paired bootstrap (2,000 resamples of good and defective cells) gives the 95 %
interval of (model AUROC - floor AUROC) and how often the model is below the floor.
Appends a section to benchmarks/results/noise_scale.md.

(An earlier version of this script, on an older split with different options, produced the
first tables of noise_scale.md; it is in the git history, commit fad781f.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from nn_floor import nn_scores, patch_features
from sklearn.metrics import roc_auc_score

from defectscope.data import elpv_split
from defectscope.models import SuperSimpleNet

RESULTS = Path(__file__).parent / "results"
WORK = Path(os.environ.get("BENCH_DIR", "/tmp/ssn_bench"))
GRID = 32


def cached_features(cell: str) -> dict:
    path = WORK / f"elpv_{cell}_features.pt"
    if not path.exists():
        model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=1).eval()
        split = elpv_split(cell, seed=0)
        data = dict(train=patch_features(model, split.train).half(), test=patch_features(model, split.test).half(),
                    labels=[s.label for s in split.test])
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    return torch.load(path)


def as_grid(patches: torch.Tensor) -> torch.Tensor:
    """``[N, h*w, C]`` -> ``[N, C, h, w]``."""
    return patches.reshape(patches.shape[0], GRID, GRID, -1).permute(0, 3, 1, 2).contiguous()


def train_and_score(train, test, noise: float, lr_scale: float, epochs: int, seed: int, batch: int = 8,
                    adaptor_init: str = "orthogonal") -> list[np.ndarray]:
    """Map-maximum scores of the test cells after each epoch."""
    torch.manual_seed(seed)
    model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=1, noise_std=noise, lr_scale=lr_scale,
                           adaptor_init=adaptor_init)
    model.fit_feature_statistics(train.float())
    optimizer, scheduler = model.configure_optimizers(epochs)
    per_epoch = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train))
        for i in range(0, len(train), batch):
            idx = order[i : i + batch]
            if len(idx) < 2:  # batch norm needs two samples, as in the engine
                continue
            loss = model.training_step(train[idx].float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        with torch.inference_mode():
            scores = [model.forward_features(test[i : i + 64].float(), (256, 256))[1] for i in range(0, len(test), 64)]
        per_epoch.append(torch.cat(scores).numpy())
    return per_epoch


def paired_bootstrap(labels: np.ndarray, model: np.ndarray, floor: np.ndarray, reps: int = 2000) -> tuple[float, float, float]:
    rng = np.random.default_rng(0)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    diffs = []
    for _ in range(reps):
        i = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        diffs.append(roc_auc_score(labels[i], model[i]) - roc_auc_score(labels[i], floor[i]))
    diffs = np.array(diffs)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high), float((diffs < 0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=["mono", "poly"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["1.0:2", "0.5:2", "0.5:4"], help="noise_std:lr_scale[:adaptor_init]")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"## Demo split, {time.strftime('%Y-%m-%d')}: settings against the floor",
        "",
        f"Command: `python benchmarks/ssn_heads_sweep.py --cells {' '.join(args.cells)} --seeds "
        f"{' '.join(map(str, args.seeds))} --settings {' '.join(args.settings)} --epochs {args.epochs}` "
        f"({args.threads} threads). Image AUROC by the map maximum after the last epoch, mean (min-max) over "
        "seeds; 'vs floor' is the paired bootstrap of the first seed: 95 % interval of the difference and "
        "the share of resamples where the model is below the floor.",
        "",
        "| cells | noise std | lr scale | adaptor init | image AUROC | per epoch (mean over seeds) | NN floor | vs floor (first seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in args.cells:
        data = cached_features(cell)
        train, test, labels = as_grid(data["train"]), as_grid(data["test"]), np.array(data["labels"])
        floor = nn_scores(data["train"].float(), data["test"].float(), 20000)
        floor_auroc = roc_auc_score(labels, floor)
        for setting in args.settings:
            noise, lr_scale, *init = setting.split(":")
            noise, lr_scale, init = float(noise), float(lr_scale), init[0] if init else "orthogonal"
            runs = [train_and_score(train, test, noise, lr_scale, args.epochs, seed, adaptor_init=init) for seed in args.seeds]
            final = [roc_auc_score(labels, r[-1]) for r in runs]
            curve = " / ".join(f"{statistics.mean(roc_auc_score(labels, r[e]) for r in runs):.3f}" for e in range(args.epochs))
            low, high, below = paired_bootstrap(labels, runs[0][-1], floor)
            lines.append(f"| {cell} | {noise} | {lr_scale} | {init} | {statistics.mean(final):.3f} ({min(final):.3f}-{max(final):.3f}) | "
                         f"{curve} | {floor_auroc:.3f} | [{low:+.3f}, {high:+.3f}], below in {below:.0%} |")
            print(lines[-1], flush=True)
    with open(RESULTS / "noise_scale.md", "a") as fh:
        fh.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
