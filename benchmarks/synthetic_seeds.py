"""SuperSimpleNet (unsupervised) on the synthetic MVTec-layout set, several generator seeds.

Run by hand (not in CI):

    python benchmarks/synthetic_seeds.py [--seeds 0 1 2] [--epochs 8] [--option adaptor_init=xavier ...]

For each generator seed: ``make_synthetic_mvtec`` (256 px, 48 training images, 16 good + 24
defective test images, as in ``vs_anomalib.py``), then our ``Engine`` fits SuperSimpleNet
(EfficientNet-Lite0, 32x32 map, lr x2, batch 8, seed 0) and tests it. Each ``--option`` is a
model keyword (``name=value``) giving one more row; the first row is always the defaults.
Appends a table (image AUROC, pixel AUROC, AUPRO per generator seed and their mean) to
benchmarks/results/synthetic_seeds.md.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import tempfile
import time
from pathlib import Path

import torch

from defectscope.data import make_synthetic_mvtec, mvtec_split
from defectscope.engine import Engine
from defectscope.models import SuperSimpleNet

RESULTS = Path(__file__).parent / "results"
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def parse_option(text: str) -> dict:
    if not text:
        return {}
    name, _, value = text.partition("=")
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a bare string such as xavier
    return {name: value}


def run(root: Path, options: dict, epochs: int, work: Path) -> dict:
    split = mvtec_split(root, "synthetic")
    torch.manual_seed(0)
    model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=1, lr_scale=2.0, visualizer=False, **options)
    engine = Engine(results_path=work, run_name="run", max_epochs=epochs, batch_size=8, seed=0, accelerator="cpu",
                    progress=False, resume=False)
    engine.fit(model, split.train)
    return engine.test(model, split.test, save_images=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="generator seeds")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--option", action="append", default=[], help="model keyword name=value for one more row")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = [""] + args.option
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        roots = {s: make_synthetic_mvtec(tmp / f"data{s}", image_size=256, n_train=48, n_test_good=16, n_test_defect=24, seed=s).parent
                 for s in args.seeds}
        for setting in settings:
            per_seed = []
            for s in args.seeds:
                start = time.perf_counter()
                m = run(roots[s], parse_option(setting), args.epochs, tmp / "runs")
                per_seed.append(m)
                print(setting or "defaults", s, {k: round(m[k], 3) for k in METRICS}, f"{time.perf_counter() - start:.0f} s", flush=True)
            cells = [" / ".join(f"{m[k]:.3f}" for m in per_seed) + f" (mean {statistics.mean(m[k] for m in per_seed):.3f})"
                     for k in METRICS]
            rows.append(f"| {setting or 'defaults'} | " + " | ".join(cells) + " |")
    lines = [
        f"## {time.strftime('%Y-%m-%d')}: generator seeds {' '.join(map(str, args.seeds))}; {args.epochs} epochs",
        "",
        f"Command: `python benchmarks/synthetic_seeds.py --seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs}"
        + "".join(f" --option {o}" for o in args.option) + f"` ({args.threads} threads). Values per generator seed.",
        "",
        "| model options | image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|",
        *rows,
    ]
    path = RESULTS / "synthetic_seeds.md"
    header = "" if path.exists() else "# SuperSimpleNet on synthetic MVTec-layout sets\n"
    with open(path, "a") as fh:
        fh.write(header + "\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
