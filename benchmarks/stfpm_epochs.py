"""STFPM over its training: held-out good images and test AUROC every K epochs (run by hand).

Trains with `defectscope train` (its defaults unless more options are given) and, every K
epochs, scores three sets with the weights of that moment: the held-out good images (what the
engine's epoch selection sees: their validation loss, map mean and map maximum), 16 training
images, and the test images (image AUROC of the map maximum; analysis only, nothing is chosen
on it). Rows are appended to a JSON-lines file; `--report` turns such files into a table and a
picture.

    python benchmarks/stfpm_epochs.py --out benchmarks/results/stfpm_epochs_grass.jsonl --every 20 -- \\
        train --model stfpm --data mvtec --data-path DIR --category grass --seed 0 --no-images --no-progress
    python benchmarks/stfpm_epochs.py --report benchmarks/results/stfpm_epochs_*.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import report_notes  # benchmarks/report_notes.py (this folder is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results"


def record(out: Path, every: int, cli_args: list[str]) -> int:
    import defectscope.cli as cli
    from defectscope.data import hold_out_validation, mvtec_split
    from defectscope.engine import engine as engine_module

    state: dict = {}
    original_fit = engine_module.Engine.fit

    def scores(x: torch.Tensor):
        model = state["model"]
        maxima, means, losses = [], [], []
        with torch.no_grad():
            for i in range(0, len(x), 16):
                maps, score = model.raw_outputs(x[i:i + 16])[:2]
                maxima += score.flatten().tolist()
                means += maps.flatten(1).mean(1).tolist()
                losses += model.validation_loss(x[i:i + 16]).tolist()
        return np.array(maxima), np.array(means), np.array(losses)

    def callback(epoch: int, loss: float) -> None:
        if (epoch + 1) % every and epoch != 0:
            return
        model, started = state["model"], time.time()
        model.eval()
        val_max, val_mean, val_loss = scores(state["x"]["val"])
        train_max, train_mean, _ = scores(state["x"]["train"])
        test_max, test_mean, _ = scores(state["x"]["test"])
        model.train()
        row = dict(category=state["category"], epoch=epoch + 1, train_loss=loss, validation_loss=val_loss.mean(),
                   val_mapmean=val_mean.mean(), val_max_median=float(np.median(val_max)),
                   train_mapmean=train_mean.mean(), train_max_median=float(np.median(train_max)),
                   test_auroc=roc_auc_score(state["labels"], test_max),
                   test_auroc_mapmean=roc_auc_score(state["labels"], test_mean), eval_s=time.time() - started)
        with open(out, "a") as f:
            f.write(json.dumps({k: v if isinstance(v, (int, str)) else round(float(v), 5) for k, v in row.items()})
                    + "\n")

    def fit(self, model, samples, regime="auto"):
        _, validation, _ = hold_out_validation(samples, self.val_fraction, seed=self.seed,
                                              hold_out_defects=self.threshold_rule == "f1")
        held = {s.path for s in validation}
        test = mvtec_split(Path(self.data_info["data_path"]), self.data_info["category"]).test
        state.update(model=model, category=self.data_info["category"], labels=[int(s.label) for s in test])
        paths = {"val": [s.path for s in validation], "test": [s.path for s in test],
                 "train": [s.path for s in samples if s.path not in held][:16]}
        state["x"] = {k: torch.cat([model.preprocess(p)[0] for p in v]) for k, v in paths.items()}
        self.on_epoch_end = callback
        return original_fit(self, model, samples, regime)

    engine_module.Engine.fit = fit
    return cli.main(cli_args)


def report(files: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs[path.stem.removeprefix("stfpm_epochs_")] = [r for r in rows if r["epoch"] > 1]
    lines = ["# STFPM over its training (`benchmarks/stfpm_epochs.py`)", "",
             "Every K epochs: mean map value of the held-out good images (what rises when the student",
             "memorises its training images), and image AUROC on the test images (analysis only).", ""]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], runs.items()):
        lines += [f"## {name}", "", "| epoch | held-out map mean | training map mean | test image AUROC |", "|---|---|---|---|"]
        lines += [f"| {r['epoch']} | {r['val_mapmean']:.5f} | {r['train_mapmean']:.5f} | {r['test_auroc']:.3f} |"
                  for r in rows]
        lowest = min(rows, key=lambda r: r["val_mapmean"])
        lines += ["", f"Lowest held-out map mean at epoch {lowest['epoch']} (test AUROC {lowest['test_auroc']:.3f}); "
                  f"last row epoch {rows[-1]['epoch']}: {rows[-1]['test_auroc']:.3f}.", ""]
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["test_auroc"] for r in rows], "o-", color="tab:blue", label="test image AUROC")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test image AUROC", color="tab:blue")
        ax.set_title(name)
        twin = ax.twinx()
        twin.plot(epochs, [r["val_mapmean"] for r in rows], "s--", color="tab:red", label="held-out map mean")
        twin.plot(epochs, [r["train_mapmean"] for r in rows], ":", color="tab:gray", label="training map mean")
        twin.set_ylabel("map mean", color="tab:red")
        ax.axvline(lowest["epoch"], color="tab:red", alpha=0.3)
    fig.tight_layout()
    picture = RESULTS / "stfpm_epochs.png"
    fig.savefig(picture, dpi=110)
    path = RESULTS / "stfpm_epochs_curves.md"
    report_notes.write_report(path, "\n".join(lines + [f"![curves]({picture.name})", ""]))
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="JSON-lines file the rows are appended to")
    parser.add_argument("--every", type=int, default=20, help="score every this many epochs")
    parser.add_argument("--report", type=Path, nargs="+", help="make the table and picture from these files")
    parser.add_argument("cli_args", nargs=argparse.REMAINDER, help="-- then the defectscope command line")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return 0
    cli_args = args.cli_args[1:] if args.cli_args[:1] == ["--"] else args.cli_args
    if not args.out or not cli_args:
        parser.error("give --out and, after --, a `defectscope train` command line (or --report FILES)")
    return record(args.out, args.every, cli_args)


if __name__ == "__main__":
    sys.exit(main())
