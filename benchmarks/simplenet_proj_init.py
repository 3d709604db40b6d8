"""SimpleNet's projection start: Xavier-normal (the reference's) against orthogonal.

Run by hand (not in CI):

    python benchmarks/simplenet_proj_init.py [--seeds 0 1] [--epochs 4] [--size 128] [--threads 2]

For each seed: ``make_synthetic_mvtec`` (``--size`` px, 24 training images, 8 good + 12 defective
test images, generator seed = seed), then SimpleNet (packaged EfficientNet-Lite0, resize = imagesize
= ``--size``, ``pre_proj`` 1, ``noise_std`` 1.0 in feature-std units, batch 8, model seed = seed)
is trained for ``--epochs`` meta-epochs and tested, once with each start of the projection's
weights (set explicitly after construction, so the result does not depend on the model's
default). Prints one line per run and a Markdown table (image AUROC, pixel AUROC, AUPRO).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from defectscope.data import make_synthetic_mvtec, mvtec_split
from defectscope.engine import Engine
from defectscope.models import SimpleNet

METRICS = ("image_auroc", "pixel_auroc", "aupro")
INITS = {"xavier": nn.init.xavier_normal_, "orthogonal": nn.init.orthogonal_}


def run(root: Path, init: str, seed: int, epochs: int, size: int, work: Path) -> dict:
    split = mvtec_split(root, "synthetic")
    torch.manual_seed(seed)
    model = SimpleNet(resize=size, imagesize=size, pre_proj=1, noise_std=1.0, meta_epochs=epochs, visualizer=False)
    torch.manual_seed(seed)
    for layer in model.pre_projection:
        if isinstance(layer, nn.Linear):
            INITS[init](layer.weight)
    engine = Engine(results_path=work, run_name=f"{init}{seed}", max_epochs=model.epochs, batch_size=8, seed=seed,
                    accelerator="cpu", progress=False, resume=False)
    engine.fit(model, split.train)
    return engine.test(model, split.test, save_images=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {init: [] for init in INITS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            root = make_synthetic_mvtec(tmp / f"data{seed}", image_size=args.size, seed=seed).parent
            for init in INITS:
                start = time.perf_counter()
                m = run(root, init, seed, args.epochs, args.size, tmp / "runs")
                results[init].append(m)
                print(init, seed, {k: round(m[k], 4) for k in METRICS}, f"{time.perf_counter() - start:.0f} s",
                      flush=True)
    print(f"\n{args.size} px, {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}\n")
    print("| projection start | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for init, rows in results.items():
        cells = [" / ".join(f"{m[k]:.3f}" for m in rows) + f" (mean {statistics.mean(m[k] for m in rows):.3f})"
                 for k in METRICS]
        print(f"| {init} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
