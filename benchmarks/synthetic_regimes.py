"""What masks add over image labels: SuperSimpleNet on the synthetic MVTec-layout set in each regime.

Run by hand (not in CI):  python benchmarks/synthetic_regimes.py [--seeds 0 1 2] [--epochs 10]

One generated set (60 good training images, 30 good + 60 defective test images, 128 px, the
stochastic grass texture and every defect kind); a quarter of each defect kind moves from test to training (the same images
for every regime). Regimes on the same images: unsupervised (the defects left out), weakly (image
labels only), mixed (the first half of the defects keep their masks) and supervised (every mask).
The demo's model (EfficientNet-Lite0, 256 px input, 32x32 map, default image score: map maximum
unsupervised, fused with labels). Image AUROC, pixel AUROC and AUPRO on the test images, mean
(min-max) over training seeds. Writes benchmarks/results/synthetic_regimes.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
REGIMES = ("unsupervised", "weakly", "mixed", "supervised")


def variant(train, regime: str):
    from defectscope.data import Sample

    good = [s for s in train if s.label == 0]
    defects = [s for s in train if s.label == 1]
    if regime == "unsupervised":
        return good
    if regime == "weakly":
        return good + [Sample(s.path, 1, None, s.defect_type) for s in defects]
    if regime == "mixed":
        half = len(defects) // 2
        return good + defects[:half] + [Sample(s.path, 1, None, s.defect_type) for s in defects[half:]]
    return good + defects


def main() -> None:
    from defectscope.data import make_synthetic_mvtec, mvtec_split
    from defectscope.engine import Engine
    from defectscope.models import SuperSimpleNet

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=SuperSimpleNet.default_epochs)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="synthetic_regimes_"))
    from defectscope.data.synthetic import ALL_DEFECT_TYPES

    # The broadened generator's hard cases: a stochastic natural texture (grass) and every defect
    # kind, thin cracks, flat foreign patches and soft smudges included.
    make_synthetic_mvtec(work / "data", category="mix", image_size=128, n_train=60, n_test_good=30,
                         n_test_defect=60, seed=0, textures="grass", defect_kinds=ALL_DEFECT_TYPES)
    split = mvtec_split(work / "data", "mix", train_defect_fraction=0.25, seed=0)
    rows = {}
    for regime in REGIMES:
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=1, lr_scale=2.0, visualizer=False)
            engine = Engine(results_path=work / "results", project="p", group=regime, run_name=f"s{seed}",
                            max_epochs=args.epochs, batch_size=8, seed=seed, accelerator="cpu", progress=False)
            started = time.time()
            engine.fit(model, variant(split.train, regime), regime=regime)
            metrics = engine.test(model, split.test, save_images=False)
            took = time.time() - started
            row = {k: float(metrics[k]) for k in ("image_auroc", "pixel_auroc", "aupro") if k in metrics}
            row["seconds"] = took
            print(regime, seed, {k: round(v, 4) for k, v in row.items()}, flush=True)
            rows.setdefault(regime, []).append(row)

    def text(regime, key):
        v = [r[key] for r in rows[regime] if key in r]
        return f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "–"

    n_defects = sum(s.label == 1 for s in split.train)
    lines = [
        "# Masks against image labels: SuperSimpleNet on the synthetic set",
        "",
        f"{time.strftime('%Y-%m-%d')}, `python benchmarks/synthetic_regimes.py --seeds {' '.join(map(str, args.seeds))} "
        f"--epochs {args.epochs}` ({args.threads} thread). Generated set: 60 good training images and {n_defects} "
        f"labelled defects (a quarter of each kind), tested on {sum(s.label == 0 for s in split.test)} good and "
        f"{sum(s.label == 1 for s in split.test)} defective images; 128 px images, 256 px input, EfficientNet-Lite0, "
        f"grass texture, every defect kind (scratch, stain, hole, crack, patch, smudge), 32x32 map, {args.epochs} epochs, batch 8. Mixed: the first half of the labelled defects keep their masks. "
        f"Seeds {', '.join(map(str, args.seeds))}: mean (min-max).",
        "",
        "| regime | image AUROC | pixel AUROC | AUPRO | seconds per run (train + test) |",
        "|---|---|---|---|---|",
    ]
    for regime in REGIMES:
        took = np.mean([r["seconds"] for r in rows[regime]])
        lines.append(f"| {regime} | {text(regime, 'image_auroc')} | {text(regime, 'pixel_auroc')} | "
                     f"{text(regime, 'aupro')} | {took:.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "synthetic_regimes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
