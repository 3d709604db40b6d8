"""Sanity floor: a plain nearest-neighbour score over the same frozen features the models use.

Run by hand (not in CI):  python benchmarks/nn_floor.py [--cells mono poly] [--bank 20000]

For each ELPV cell type (the demo's split): the SuperSimpleNet feature extractor of the demo
(EfficientNet-Lite0 ``blocks.2`` + ``blocks.4``, 256 px, 3x3 neighbourhood average, 32x32 grid)
turns every training cell into patch features; a random subset of ``--bank`` training patches is
the memory bank. A test cell's score is the largest distance from one of its patches to its
nearest bank patch. No training. A trained model that scores below this floor is wasting the
features it was given. Appends a section to benchmarks/results/nn_floor.md and, when
benchmarks/results/elpv_labelled_runs.jsonl has unsupervised (N = 0) runs, puts the trained
SuperSimpleNet's image AUROC (both image scores) beside the floor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

RESULTS = Path(__file__).parent / "results"


@torch.inference_mode()
def patch_features(model, samples, batch: int = 32) -> torch.Tensor:
    """Samples -> ``[N, h*w, C]`` float32 patch features."""
    out = []
    for i in range(0, len(samples), batch):
        x = torch.cat([model.preprocess(s.path)[0] for s in samples[i:i + batch]])
        f = model.extract_features(x).float()
        out.append(f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1]))
    return torch.cat(out)


def nn_scores(train: torch.Tensor, test: torch.Tensor, bank_size: int, seed: int = 0) -> np.ndarray:
    bank = train.reshape(-1, train.shape[-1])
    if bank_size and bank_size < len(bank):
        bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[:bank_size]]
    return np.array([torch.cdist(patches, bank).amin(dim=1).amax().item() for patches in test])


def main() -> None:
    from defectscope.data import elpv_split
    from defectscope.models import SuperSimpleNet

    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", nargs="+", default=["mono", "poly"])
    ap.add_argument("--bank", type=int, default=20000, help="memory-bank patches (0: all training patches)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=1).eval()
    runs = []
    runs_file = RESULTS / "elpv_labelled_runs.jsonl"
    if runs_file.exists():
        runs = [r for r in map(json.loads, runs_file.read_text().splitlines()) if r and r["count"] == 0]
    lines = [
        f"## ELPV, {time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `python benchmarks/nn_floor.py --cells {' '.join(args.cells)} --bank {args.bank}` "
        f"({args.threads} threads). Features: EfficientNet-Lite0 blocks.2 + blocks.4, 256 px, 32x32 grid, "
        "as in the demo. Trained rows: the demo's SuperSimpleNet (3 epochs), from elpv_labelled_runs.jsonl, "
        "mean (min-max) over seeds.",
        "",
        "| cells | NN floor image AUROC | SuperSimpleNet map max | SuperSimpleNet classifier | seconds (floor) |",
        "|---|---|---|---|---|",
    ]
    for cell in args.cells:
        split = elpv_split(cell, seed=0)
        started = time.time()
        train = patch_features(model, split.train)
        test = patch_features(model, split.test)
        auroc = roc_auc_score([s.label for s in split.test], nn_scores(train, test, args.bank))
        took = time.time() - started

        def trained(key):
            v = [r[key] for r in runs if r["cell"] == cell]
            return f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "–"

        lines.append(f"| {cell} | {auroc:.3f} | {trained('auroc_map_max')} | {trained('auroc_classifier')} | {took:.0f} |")
        print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "nn_floor.md"
    head = "" if path.exists() else "# Nearest-neighbour floor against trained models\n\n"
    with open(path, "a") as fh:
        fh.write(head + "\n".join(lines) + "\n\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
