"""Label-probe and fusion choices for SuperSimpleNet, measured without training (issue 16).

Run by hand after ``benchmarks/labels_recipe.py`` has cached the ELPV features (and, for
``fusion``, dumped each trained model's per-cell scores under ``<cache>/scores``)::

    python benchmarks/labels_offline.py probe --cells mono poly      # the probe's C and pooling
    python benchmarks/labels_offline.py fusion --c 0.1               # fused scores of the dumped models

``probe``: a logistic probe on pooled standardised features of the training cells and the first N
labelled cells, scored on the test cells (image AUROC), for several C and poolings.
``fusion``: for each dumped model, the map maximum, the probe and their z-score fusions with equal
weights, AUROC-based weights (the product's rule) and median-z weights, where the weights come from
the labelled training cells only (the probe's from 5-fold cross-fitting).
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score


def pooled_features(cell: str, cache: Path, kind: str = "mean+max") -> dict:
    data = torch.load(cache / f"{cell}.pt", weights_only=True)
    good = data["train"]
    mean, std = good.mean((0, 2, 3)), good.std((0, 2, 3)) + 1e-6

    def pool(x):
        x = (x - mean[None, :, None, None]) / std[None, :, None, None]
        parts = [x.mean((2, 3)), x.amax((2, 3))]
        if "min" in kind:
            parts += [x.amin((2, 3)), x.std((2, 3))]
        return torch.cat(parts, 1).numpy()

    out = {k: pool(data[k]) for k in ("train", "pool", "test", "held")}
    out["labels"] = data["labels"].numpy()
    return out


def probe(args) -> None:
    for cell in args.cells:
        for kind in ("mean+max", "mean+max+min+std"):
            f = pooled_features(cell, Path(args.cache), kind)
            for count in (5, 10, 25, 50):
                x = np.concatenate([f["train"], f["pool"][:count]])
                y = np.r_[np.zeros(len(f["train"])), np.ones(count)]
                row = []
                for c in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
                    p = LogisticRegression(C=c, max_iter=5000).fit(x, y)
                    row.append(f"C={c}: {roc_auc_score(f['labels'], p.decision_function(f['test'])):.3f}")
                print(f"{cell} {kind} N={count}: " + ", ".join(row), flush=True)


def _auc(good, defects):
    return roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(defects))], np.r_[good, defects])


def fusion(args) -> None:
    features = {}
    for path in sorted(glob.glob(str(Path(args.cache) / "scores" / "*.npz"))):
        d = np.load(path)
        name = Path(path).stem
        cell, count = name.split("_")[0], int(name.split("_")[1])
        f = features.setdefault(cell, pooled_features(cell, Path(args.cache)))
        x = np.concatenate([f["train"], f["pool"][:count]])
        y = np.r_[np.zeros(len(f["train"])), np.ones(count)]
        p = LogisticRegression(C=args.c, max_iter=5000).fit(x, y)
        test_probe, held_probe = p.decision_function(f["test"]), p.decision_function(f["held"])
        cross = np.zeros(count)
        folds = min(5, count)
        for k in range(folds):
            out = np.arange(count) % folds == k
            xx = np.concatenate([f["train"], f["pool"][:count][~out]])
            yy = np.r_[np.zeros(len(f["train"])), np.ones((~out).sum())]
            cross[out] = LogisticRegression(C=args.c, max_iter=5000).fit(xx, yy).decision_function(f["pool"][:count][out])
        held_map, test_map, defect_map = d["held_map_max"], d["test_map_max"], d["defects_map_max"]
        z_map = (test_map - held_map.mean()) / held_map.std(ddof=1)
        z_probe = (test_probe - held_probe.mean()) / held_probe.std(ddof=1)
        labels = d["labels"]
        auc_w = np.clip([_auc(held_map, defect_map) - 0.5, _auc(held_probe, cross) - 0.5], 0, None)
        auc_w = auc_w / auc_w.sum()
        med_w = np.clip([np.median((defect_map - held_map.mean()) / held_map.std(ddof=1)),
                         np.median((cross - held_probe.mean()) / held_probe.std(ddof=1))], 0, None)
        med_w = med_w / med_w.sum()
        print(f"{name:24s} map {roc_auc_score(labels, test_map):.3f}  probe {roc_auc_score(labels, test_probe):.3f}  "
              f"equal {roc_auc_score(labels, z_map + z_probe):.3f}  "
              f"AUROC-weighted {roc_auc_score(labels, auc_w[0] * z_map + auc_w[1] * z_probe):.3f} (probe {auc_w[1]:.2f})  "
              f"median-z {roc_auc_score(labels, med_w[0] * z_map + med_w[1] * z_probe):.3f} (probe {med_w[1]:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["probe", "fusion"])
    ap.add_argument("--cells", nargs="+", default=["mono", "poly"])
    ap.add_argument("--c", type=float, default=0.1)
    ap.add_argument("--cache", default="/tmp/labels_recipe")
    args = ap.parse_args()
    torch.set_num_threads(1)
    probe(args) if args.what == "probe" else fusion(args)


if __name__ == "__main__":
    main()
