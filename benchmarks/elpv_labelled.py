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
# Runs of the label-probe recipe (balanced batches, fused image score); the runs file of the recipe
# before it (mean of classifier and map maximum, plain shuffling) is kept as elpv_labelled_runs.jsonl.
RUNS = RESULTS / "elpv_labelled_runs_probe.jsonl"
BASELINES = RESULTS / "elpv_labelled_baselines.json"


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
    out["label_probe"] = model.probe_info
    for score in ("fused", "map_max", "classifier", "mean"):
        if score in ("classifier", "mean") and getattr(model, "classifier_skipped", False):
            continue  # unsupervised and scored by the map maximum: the classifier was not trained
        if score == "fused" and not model.supervised:
            continue
        model.image_score = score
        scores = [float(model.predict(s.path)[0]) for s in test]
        out[f"auroc_{score}"] = float(roc_auc_score(labels, scores))
        if score == ("fused" if model.supervised else "map_max"):
            out["scores"] = [round(v, 6) for v in scores]  # the default score per test cell (bootstrap)
    return out


def baselines(cells: list[str], counts: list[int]) -> dict:
    """Issue 16's label-free and labelled baselines on the same frozen features and split: the
    nearest-neighbour floor, a logistic probe (scikit-learn defaults) on pooled standardised
    features, and the two fused by mean rank; per-cell scores kept for the bootstrap."""
    import torch

    from labels_recipe import baselines as compute, cached

    torch.set_num_threads(2)
    out = json.loads(BASELINES.read_text()) if BASELINES.exists() else {}
    for cell in cells:
        for count in counts:
            key = f"{cell}-{count}"
            if key not in out:
                data = cached(cell, Path("/tmp/labels_recipe"))
                known = next((v["scores_nn"] for k, v in out.items() if k.startswith(f"{cell}-")), None)
                out[key] = compute(data, count, keep_scores=True, nn=known)
                BASELINES.write_text(json.dumps(out))
    return out


def _runs() -> list[dict]:
    """Every run recorded so far in the runs file."""
    if not RUNS.exists():
        return []
    return [json.loads(line) for line in RUNS.read_text().splitlines() if line]


def main() -> None:
    global RUNS
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 5, 10, 25, 50])
    ap.add_argument("--cells", nargs="+", default=["mono", "poly"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--results-path", default="results")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the runs file")
    ap.add_argument("--runs", default=None, help=f"runs file (default {RUNS.name}); with --report-only, e.g. "
                    "elpv_labelled_runs_top1.jsonl (the same runs rescored by probe_pooling.py --adopted-runs)")
    args = ap.parse_args()
    if args.runs:
        RUNS = RESULTS / Path(args.runs).name
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


def paired_bootstrap(labels, model_scores: list, other, rounds: int = 2000, seed: int = 0):
    """Resample the test cells (good and defective apart) with replacement; per round, the mean over
    seeds of the model's image AUROC minus the other score's. Returns (mean, 2.5 %, 97.5 %, share of
    rounds where the model is below)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    rng = np.random.default_rng(seed)
    diffs = []
    model_scores = [np.asarray(s) for s in model_scores]
    other = np.asarray(other)
    for _ in range(rounds):
        idx = np.concatenate([rng.choice(good, len(good)), rng.choice(bad, len(bad))])
        y = labels[idx]
        base = roc_auc_score(y, other[idx])
        diffs.append(np.mean([roc_auc_score(y, s[idx]) for s in model_scores]) - base)
    diffs = np.asarray(diffs)
    return float(diffs.mean()), float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975)), float((diffs < 0).mean())


def write_report(args, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    base = baselines(args.cells, args.counts)

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
        f"`{RUNS.name}` (the report is rebuilt from it with `--report-only`), the baselines in `{BASELINES.name}`.",
        "",
        "Each run is `defectscope train --category <type> --train-defects N --seed S` (the demo's settings: "
        "SuperSimpleNet, EfficientNet-Lite0, 10 epochs, batch 8, 20 % of the good cells held out for the threshold, "
        "the classification head not trained since no default score uses it). N = 0: unsupervised, scored by the "
        "map maximum; N > 0: weakly supervised (image labels only), scored by the fused score (map maximum and the "
        "label probe fitted after training, each a z-score against the held-out good cells, weighed by their "
        "AUROC on the labelled cells). Same test cells for every N and seed (mono 147 good + 263 defective, "
        f"poly 230 + 352). Seeds {', '.join(map(str, seeds))}: mean (min-max). Seconds per run: train and test "
        "of one cell type on 1 thread, with another run and other benchmarks on the second core.",
        "",
        "Baselines (issue 16), no trained heads, same features (EfficientNet-Lite0 blocks.2 + blocks.4, 32x32), "
        "same training cells after the hold-out and the same labelled pool: the nearest-neighbour floor (largest "
        "distance of a test patch to 20,000 training patches), a logistic probe (scikit-learn defaults) on mean- and "
        "max-pooled standardised features, and the two fused by mean rank over the test cells.",
        "",
        "| labelled cells | " + " | ".join(f"{c}: model | {c}: fused baseline | {c}: NN floor" for c in args.cells)
        + " | seconds per run (" + ", ".join(args.cells) + ") |",
        "|---|" + "---|---|---|" * len(args.cells) + "---|",
    ]
    for count in args.counts:
        cells = []
        for cell in args.cells:
            b = base.get(f"{cell}-{count}", {})
            cells.append(f"{cell_text(values(cell, count, 'auroc'))} | "
                         f"{b['fused']:.3f}" if "fused" in b else f"{cell_text(values(cell, count, 'auroc'))} | –")
            cells[-1] += f" | {b['nn']:.3f}" if "nn" in b else " | –"
        took = ", ".join(f"{np.mean(values(cell, count, 'seconds')):.0f}" if values(cell, count, "seconds") else "–"
                         for cell in args.cells)
        lines.append(f"| {count} | " + " | ".join(cells) + f" | {took} |")
    lines += [
        "",
        "## Paired bootstrap against the baselines",
        "",
        "2,000 resamplings of the test cells (good and defective resampled apart); per resampling the mean over "
        "seeds of the model's AUROC minus the baseline's. Reported: mean difference, 95 % interval, and the share "
        "of resamplings where the model is below.",
        "",
        "| cells | labelled | vs fused baseline | vs NN floor |",
        "|---|---|---|---|",
    ]
    for cell in args.cells:
        for count in args.counts:
            rs = [r for r in runs if r["cell"] == cell and r["count"] == count and "scores" in r]
            b = base.get(f"{cell}-{count}", {})
            if not rs or "labels" not in b:
                continue
            model_scores = [r["scores"] for r in rs]
            parts = []
            for key in ("scores_fused", "scores_nn"):
                if key in b:
                    m, lo, hi, below = paired_bootstrap(b["labels"], model_scores, b[key])
                    parts.append(f"{m:+.3f} ({lo:+.3f} to {hi:+.3f}), below in {below:.0%}")
                else:
                    parts.append("–")
            lines.append(f"| {cell} | {count} | " + " | ".join(parts) + " |")
    lines += [
        "",
        "## Each image score on the same models",
        "",
        "The fused score (`fused`, the default with labels), the smoothed map's maximum (`map_max`), the "
        "classification head (`classifier`) and the mean of classifier and map maximum as probabilities (`mean`, "
        "the default with labels before the label probe), on the same trained models (the image score only changes "
        "inference).",
        "",
        "| labelled cells | " + " | ".join(f"{c} fused | {c} map max | {c} classifier | {c} mean" for c in args.cells) + " |",
        "|---|" + "---|---|---|---|" * len(args.cells),
    ]
    for count in args.counts:
        cells = [" | ".join(cell_text(values(cell, count, f"auroc_{k}")) for k in ("fused", "map_max", "classifier", "mean"))
                 for cell in args.cells]
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    lines += ["", "![image AUROC against labelled defects](elpv_labelled.png)", ""]
    (RESULTS / "elpv_labelled.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=120)
    for i, cell in enumerate(args.cells):
        color = f"C{i}"
        counts = [c for c in args.counts if values(cell, c, "auroc")]
        means = [np.mean(values(cell, c, "auroc")) for c in counts]
        low = [means[k] - min(values(cell, c, "auroc")) for k, c in enumerate(counts)]
        high = [max(values(cell, c, "auroc")) - means[k] for k, c in enumerate(counts)]
        ax.errorbar(counts, means, yerr=[low, high], marker="o", capsize=3, color=color, label=f"{cell}: model")
        fused = [(c, base[f"{cell}-{c}"]["fused"]) for c in args.counts if "fused" in base.get(f"{cell}-{c}", {})]
        if fused:
            ax.plot(*zip(*fused), linestyle="--", marker="s", color=color, alpha=0.6, label=f"{cell}: NN + probe baseline")
        if f"{cell}-0" in base:
            ax.axhline(base[f"{cell}-0"]["nn"], linestyle=":", color=color, alpha=0.6, label=f"{cell}: NN floor")
    ax.set_xlabel("labelled defective cells in training (image labels only)")
    ax.set_ylabel("image AUROC (held-out test cells)")
    ax.set_title(f"SuperSimpleNet on ELPV, EfficientNet-Lite0 ({len(seeds)} seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "elpv_labelled.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
