"""ELPV image AUROC against the number of labelled defective cells in training.

Run by hand (not in CI):  python benchmarks/elpv_labelled.py [--counts 0 5 10 25 50] [--seeds 0]

For each cell type and each count N, runs the demo command with ``--train-defects N``
(``defectscope train --category <type> --train-defects N``: SuperSimpleNet, EfficientNet-Lite0,
the demo's epochs, batch and learning rate). N = 0 is the unsupervised demo; N > 0 trains weakly
supervised on N probability-1 cells with image labels only. The test cells are the same for every
N (ELPV split with its fixed pool of 50 labelled-defect cells). Writes
benchmarks/results/elpv_labelled.md and elpv_labelled.png.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run(cell: str, count: int, seed: int, results_path: Path) -> tuple[float, float]:
    from defectscope.cli import main

    name = f"{cell}-n{count}-s{seed}"
    started = time.time()
    code = main(["train", "--category", cell, "--train-defects", str(count), "--seed", str(seed),
                 "--results-path", str(results_path), "--group", "elpv-labelled", "--run-name", name,
                 "--no-images", "--no-progress"])
    if code != 0:
        raise SystemExit(f"run {name} failed with exit code {code}")
    with open(results_path / "defectscope" / "elpv-labelled" / name / "results.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["category"] == cell)
    return float(row["image_auroc"]), time.time() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 5, 10, 25, 50])
    ap.add_argument("--cells", nargs="+", default=["mono", "poly"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--results-path", default="results")
    args = ap.parse_args()
    table: dict[tuple[str, int], list[float]] = {}
    seconds: dict[tuple[str, int], list[float]] = {}
    for cell in args.cells:
        for count in args.counts:
            for seed in args.seeds:
                auroc, took = run(cell, count, seed, Path(args.results_path))
                table.setdefault((cell, count), []).append(auroc)
                seconds.setdefault((cell, count), []).append(took)
                print(f"{cell} N={count} seed={seed}: image AUROC {auroc:.3f} ({took:.0f} s)", flush=True)
    write_report(args, table, seconds)


def write_report(args, table, seconds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# ELPV: image AUROC against labelled defective cells in training",
        "",
        f"{time.strftime('%Y-%m-%d')}, 2 CPU cores, torch CPU. Command: `python benchmarks/elpv_labelled.py "
        f"--counts {' '.join(map(str, args.counts))} --seeds {' '.join(map(str, args.seeds))}`.",
        "Each run is `defectscope train --category <type> --train-defects N --seed S` (the demo's settings). "
        "N = 0: unsupervised; N > 0: weakly supervised (image labels only). Same test cells for every N "
        "(mono 147 good + 263 defective, poly 230 + 352). Mean over seeds (min-max in brackets when several).",
        "",
        "| labelled defective cells | " + " | ".join(args.cells) + " | seconds per run (" + ", ".join(args.cells) + ") |",
        "|---|" + "---|" * len(args.cells) + "---|",
    ]
    for count in args.counts:
        cells = []
        for cell in args.cells:
            values = table[(cell, count)]
            text = f"{np.mean(values):.3f}"
            if len(values) > 1:
                text += f" ({min(values):.3f}-{max(values):.3f})"
            cells.append(text)
        took = ", ".join(f"{np.mean(seconds[(cell, count)]):.0f}" for cell in args.cells)
        lines.append(f"| {count} | " + " | ".join(cells) + f" | {took} |")
    lines += ["", "![image AUROC against labelled defects](elpv_labelled.png)", ""]
    (RESULTS / "elpv_labelled.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for cell in args.cells:
        means = [np.mean(table[(cell, c)]) for c in args.counts]
        ax.plot(args.counts, means, marker="o", label=cell)
    ax.set_xlabel("labelled defective cells in training (image labels only)")
    ax.set_ylabel("image AUROC (held-out test cells)")
    ax.set_title("SuperSimpleNet on ELPV, EfficientNet-Lite0")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "elpv_labelled.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
