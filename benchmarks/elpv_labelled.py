"""ELPV image AUROC against the number of labelled defective cells in training.

Run by hand (not in CI):  python benchmarks/elpv_labelled.py [--counts 0 5 10 25 50] [--seeds 0 1] [--jobs 2]

For each cell type and each count N, runs the demo command with ``--train-defects N``
(``defectscope train --category <type> --train-defects N``: SuperSimpleNet, EfficientNet-Lite0,
the demo's epochs, batch and learning rate). N = 0 is the unsupervised demo; N > 0 trains weakly
supervised on N probability-1 cells with image labels only. The test cells are the same for every
N (ELPV split with its fixed pool of 50 labelled-defect cells). Appends every run to
benchmarks/results/elpv_labelled_runs.jsonl and writes elpv_labelled.md and elpv_labelled.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "elpv_labelled_runs.jsonl"


def run(cell: str, count: int, seed: int, results_path: str) -> dict:
    """Train one model with the demo command, then score its test cells with each image score."""
    import torch

    torch.set_num_threads(1)
    from sklearn.metrics import roc_auc_score

    from defectscope.cli import main
    from defectscope.data import elpv_split
    from defectscope.models import load_model

    name = f"{cell}-n{count}-s{seed}"
    started = time.time()
    code = main(["train", "--category", cell, "--train-defects", str(count), "--seed", str(seed),
                 "--results-path", results_path, "--group", "elpv-labelled", "--run-name", name,
                 "--no-images", "--no-progress"])
    if code != 0:
        raise SystemExit(f"run {name} failed with exit code {code}")
    took = time.time() - started
    run_dir = Path(results_path) / "defectscope" / "elpv-labelled" / name
    with open(run_dir / "results.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["category"] == cell)
    # The engine's own test (the model's default image score) ...
    out = dict(cell=cell, count=count, seed=seed, seconds=round(took, 1), auroc=float(row["image_auroc"]))
    # ... and each image score on the same model (image_score only changes inference).
    test = elpv_split(cell, seed=0, train_defects=count).test
    labels = [s.label for s in test]
    model = load_model(run_dir)
    out["regime"] = "unsupervised" if not model.supervised else "weakly"
    # Runs from before adaptor_init existed used the Xavier start (their runs file was kept apart).
    out["adaptor_init"] = model.hparams.get("adaptor_init", "xavier")
    for score in ("classifier", "map_max", "mean"):
        if score != "map_max" and getattr(model, "classifier_skipped", False):
            continue  # unsupervised and scored by the map maximum: the classifier was not trained
        model.image_score = score
        out[f"auroc_{score}"] = float(roc_auc_score(labels, [model.predict(s.path)[0] for s in test]))
    return out


def _runs() -> list[dict]:
    """Every run recorded so far in the runs file."""
    if not RUNS.exists():
        return []
    return [json.loads(line) for line in RUNS.read_text().splitlines() if line]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 5, 10, 25, 50])
    ap.add_argument("--cells", nargs="+", default=["mono", "poly"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--results-path", default="results")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the runs file")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = {(r["cell"], r["count"], r["seed"]) for r in _runs()}
    todo = [(c, n, s) for c in args.cells for n in args.counts for s in args.seeds if (c, n, s) not in done]
    if not args.report_only and todo:
        # Runs already in the runs file are kept (an interrupted benchmark resumes).
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run, c, n, s, args.results_path) for c, n, s in todo]
            for future in as_completed(futures):
                result = future.result()
                with open(RUNS, "a") as fh:
                    fh.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)
    runs = [r for r in _runs() if r["cell"] in args.cells and r["count"] in args.counts and r["seed"] in args.seeds]
    write_report(args, runs)


def write_report(args, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def values(cell, count, key):
        return [r[key] for r in runs if r["cell"] == cell and r["count"] == count and key in r]

    def cell_text(v):
        if not v:
            return "–"
        text = f"{np.mean(v):.3f}"
        return text + (f" ({min(v):.3f}-{max(v):.3f})" if len(v) > 1 else "")

    seeds = sorted({r["seed"] for r in runs})
    lines = [
        "# ELPV: image AUROC against labelled defective cells in training",
        "",
        f"{time.strftime('%Y-%m-%d')}, 2 CPU cores, torch CPU, each run on 1 thread ({args.jobs} at a time). "
        f"Command: `python benchmarks/elpv_labelled.py --counts {' '.join(map(str, args.counts))} "
        f"--seeds {' '.join(map(str, args.seeds))} --jobs {args.jobs}`; every run is kept in "
        "`elpv_labelled_runs.jsonl` (the report is rebuilt from it with `--report-only`).",
        "",
        "Each run is `defectscope train --category <type> --train-defects N --seed S` (the demo's settings: "
        "SuperSimpleNet, EfficientNet-Lite0, 3 epochs, batch 8). N = 0: unsupervised; N > 0: weakly supervised "
        "(image labels only). Same test cells for every N and seed (mono 147 good + 263 defective, poly 230 + 352). "
        f"Seeds {', '.join(map(str, seeds))}: mean (min-max).",
        "",
        "## The model's image score (`image_score=\"auto\"`: map maximum unsupervised, mean of classifier and "
        "map maximum with labels)",
        "",
        "| labelled defective cells | " + " | ".join(args.cells) + " | seconds per run (" + ", ".join(args.cells) + ") |",
        "|---|" + "---|" * len(args.cells) + "---|",
    ]
    for count in args.counts:
        cells = [cell_text(values(cell, count, "auroc")) for cell in args.cells]
        took = ", ".join(f"{np.mean(values(cell, count, 'seconds')):.0f}" if values(cell, count, "seconds") else "–"
                         for cell in args.cells)
        lines.append(f"| {count} | " + " | ".join(cells) + f" | {took} |")
    lines += [
        "",
        "## Each image score on the same models",
        "",
        "The classification head's score (`classifier`), the smoothed map's maximum (`map_max`) and their "
        "mean as probabilities (`mean`), computed on the same trained models (the image score only changes "
        "inference).",
        "",
        "| labelled defective cells | " + " | ".join(f"{c} classifier | {c} map max | {c} mean" for c in args.cells) + " |",
        "|---|" + "---|---|---|" * len(args.cells),
    ]
    for count in args.counts:
        cells = [" | ".join(cell_text(values(cell, count, f"auroc_{k}")) for k in ("classifier", "map_max", "mean"))
                 for cell in args.cells]
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    if any(r.get("mean_rescored") for r in runs):
        lines += ["", "Runs marked `mean_rescored` in the runs file were trained before the `mean` score existed; "
                  "their `mean` was computed afterwards from the same saved models' per-image classifier and map "
                  "scores (the classifier and map AUROCs recomputed that way matched the recorded ones)."]
    lines += [
        "",
        "![image AUROC against labelled defects](elpv_labelled.png)",
        "",
        "Earlier measurements (cached mono features, N = 10, 3 epochs, one seed), kept here because they set "
        "defaults: gradient clipping at 1 (the reference's supervised setting, `supervised_grad_clip=1.0`) gave "
        "0.879 against 0.909 without, so it is off by default; oversampling the labelled cells to a quarter of "
        "each epoch gave no gain (0.899).",
        "",
    ]
    (RESULTS / "elpv_labelled.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for cell in args.cells:
        counts = [c for c in args.counts if values(cell, c, "auroc")]
        means = [np.mean(values(cell, c, "auroc")) for c in counts]
        low = [means[i] - min(values(cell, c, "auroc")) for i, c in enumerate(counts)]
        high = [max(values(cell, c, "auroc")) - means[i] for i, c in enumerate(counts)]
        ax.errorbar(counts, means, yerr=[low, high], marker="o", capsize=3, label=cell)
    ax.set_xlabel("labelled defective cells in training (image labels only)")
    ax.set_ylabel("image AUROC (held-out test cells)")
    ax.set_title(f"SuperSimpleNet on ELPV, EfficientNet-Lite0 ({len(seeds)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "elpv_labelled.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
