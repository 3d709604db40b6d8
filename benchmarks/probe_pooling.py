"""Does another pooling of the label probe raise SuperSimpleNet's fused image AUROC on ELPV?

Measured without retraining, on the 24 saved labelled runs of ``benchmarks/elpv_labelled.py``
(``results/defectscope/elpv-labelled/{mono,poly}-n{5,10,25,50}-s{0,1,2}``) and the frozen features
cached by ``benchmarks/labels_recipe.py`` (``/tmp/labels_recipe/{mono,poly}.pt``; same extractor and
split, checked against ``model.extract_features`` on a few images of each run's cell type).

Run by hand (not in CI), one thread::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_pooling.py [--cells mono poly] [--counts 5 10 25 50]
        [--seeds 0 1 2] [--cache /tmp/labels_recipe] [--out benchmarks/results/probe_pooling_runs.jsonl] [--report]

Per run: the trained heads on the cached features give the map-maximum logit of the test cells,
the run's held-out good cells (its own ``validation_images``) and its labelled training defects.
Step 1 reproduces the stored fused test AUROC (``elpv_labelled_runs_probe.jsonl``) with the model's
own probe and fusion buffers, and again with the probe refitted here (mean+max) — both must agree
within 0.002. Step 2 refits the probe (``LabelProbe.solve``, C=0.1, on the run's training good
cells + its labelled cells, features standardised by the run's own standardiser) with each pooling:

* ``mean+max``: channel means and maxima (the product's pooling until 2026-11-30);
* ``mean+max+min+std``: also channel minima and standard deviations over positions;
* ``mean+top1%``: channel means and the mean of each channel's top 1 % positions (10 of 32x32;
  the product's pooling since, computed by ``LabelProbe.pool``);
* ``avg2-mean+max``: means and maxima after a 2x2 average pooling of the map (stride 2);

and fuses it with the map maximum by the product's rule (each part z-scored against the held-out
good cells, weighted by AUROC - 0.5 on the labelled defects, the probe's from 5-fold cross-fitting).
Reported per run: test fused AUROC (and probe alone), and two training-side criteria that never
touch the test cells: the cross-fitted probe AUROC (labelled defects, each scored by a probe
fitted without it, vs held-out good cells) and the fused score's AUROC on the same cells (defects'
parts: map maximum and cross-fitted probe). ``--report`` writes ``results/probe_pooling.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

HERE = Path(__file__).parent
RESULTS = HERE / "results"
RUNS_FILE = RESULTS / "elpv_labelled_runs_probe.jsonl"
RUN_ROOT = HERE.parent / "results" / "defectscope" / "elpv-labelled"
POOLINGS = ("mean+max", "mean+max+min+std", "mean+top1%", "avg2-mean+max")
ADOPTED = "mean+top1%"  # LabelProbe's default since 2026-11-30
PARTS = {  # pooling -> statistics concatenated (in this order)
    "mean+max": ("mean", "max"),
    "mean+max+min+std": ("mean", "max", "min", "std"),
    "mean+top1%": ("mean", "top1"),
    "avg2-mean+max": ("mean", "avg2max"),  # the mean is unchanged by a 2x2 average pooling of a 32x32 map
}


def cached_paths(cell: str) -> dict[str, list[str]]:
    """Paths of the cached features, in the order of ``labels_recipe.cached``."""
    from defectscope.data import elpv_split
    from defectscope.data.samples import hold_out_validation

    split = elpv_split(cell, seed=0, train_defects=50)
    good = [s for s in split.train if s.label == 0]
    pool = [s for s in split.train if s.label == 1]
    train, held, _ = hold_out_validation(good, 0.2, seed=0)
    return {k: [str(s.path) for s in v] for k, v in
            dict(train=train, held=held, pool=pool, test=split.test).items()}


@torch.inference_mode()
def check_features(model, data: dict, paths: dict, per_key: int = 2) -> float:
    """Largest |cached - model.extract_features| over a few images of each kind."""
    worst = 0.0
    for key in ("train", "held", "pool", "test"):
        x = torch.cat([model.preprocess(p)[0] for p in paths[key][:per_key]])
        worst = max(worst, float((model.extract_features(x).float() - data[key][:per_key]).abs().max()))
    return worst


@torch.inference_mode()
def statistics(model, feats: torch.Tensor, batch: int = 64) -> dict[str, torch.Tensor]:
    """Pooled statistics of the standardised features [N,C] each, and the map-max / probe logits [N]."""
    from defectscope.models.supersimplenet import LabelProbe

    out: dict[str, list] = {k: [] for k in ("mean", "max", "min", "std", "top1", "avg2max", "map_max", "probe")}
    for i in range(0, len(feats), batch):
        f = feats[i:i + batch].to(torch.float32)
        s = model._standardize(f).float()
        out["mean"].append(s.mean(dim=(2, 3)))
        out["max"].append(s.amax(dim=(2, 3)))
        out["min"].append(s.amin(dim=(2, 3)))
        out["std"].append(s.std(dim=(2, 3)))
        out["top1"].append(LabelProbe.pool(s, "mean+top1%")[:, s.shape[1]:])  # the product's top-1 % mean
        out["avg2max"].append(torch.nn.functional.avg_pool2d(s, 2).amax(dim=(2, 3)))
        _, parts = model._map_and_parts(f, tuple(model.image_size))
        out["map_max"].append(parts[:, 0].double())
        out["probe"].append(parts[:, 1].double())
    return {k: torch.cat(v) for k, v in out.items()}


def auc(good, bad) -> float:
    good, bad = np.asarray(good, float), np.asarray(bad, float)
    return float(roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad]))


def evaluate(pool_fn, stats_train: dict, defect_order: np.ndarray, stats_held: dict, stats_test: dict,
             test_labels: np.ndarray, train_is_defect: np.ndarray) -> dict:
    """The product's fit and fusion (fit_on_training_features, calibrate, fusion_weights) for one pooling."""
    from defectscope.models.supersimplenet import LabelProbe, cross_fitted_probe_logits, fusion_weights

    x = pool_fn(stats_train)
    y = torch.as_tensor(train_is_defect, dtype=torch.float32)
    weight, bias = LabelProbe.solve(x, y)
    defects = torch.as_tensor(defect_order)
    unseen = cross_fitted_probe_logits(x, y, defects, min(5, len(defects)))
    defect_parts = torch.stack((stats_train["map_max"][defects], unseen), dim=1)

    def parts(stats):
        return torch.stack((stats["map_max"], pool_fn(stats).double() @ weight + bias), dim=1)

    good_parts, test_parts = parts(stats_held), parts(stats_test)
    center, scale = good_parts.mean(dim=0), good_parts.std(dim=0).clamp_min(1e-6)
    fw = fusion_weights(defect_parts, good_parts)

    def fuse(p):
        return (((p - center) / scale) * fw).sum(dim=1).numpy()

    test_fused = fuse(test_parts)
    lab = test_labels.astype(bool)
    return {
        "test_fused": auc(test_fused[~lab], test_fused[lab]),
        "test_probe": auc(test_parts[~lab, 1].numpy(), test_parts[lab, 1].numpy()),
        "cv_probe": auc(good_parts[:, 1].numpy(), unseen.numpy()),
        "cv_fused": auc(fuse(good_parts), fuse(defect_parts)),
        "weight_probe": float(fw[1]),
        "test_scores": test_fused,
    }


def run_one(cell, count, seed, data, paths, index, stored, cache_stats) -> dict:
    from defectscope.models import load_model

    name = f"{cell}-n{count}-s{seed}"
    model = load_model(RUN_ROOT / name).eval()
    started = time.time()
    max_diff = check_features(model, data, paths) if seed == 0 else None
    train_paths = model.data_info["train_images"]
    val_paths = model.data_info["validation_images"]
    pool_set = set(paths["pool"])
    labelled = [p for p in train_paths if p in pool_set]
    assert labelled == paths["pool"][:count], f"{name}: labelled cells are not the first {count} of the pool"
    assert not (set(val_paths) & pool_set)

    def feats(ps):
        return torch.stack([data[index[p][0]][index[p][1]] for p in ps])

    s_train = statistics(model, feats(train_paths))
    s_held = statistics(model, feats(val_paths))
    s_test = statistics(model, data["test"])
    test_labels = data["labels"].numpy()
    is_defect = np.array([p in pool_set for p in train_paths])
    defect_order = np.flatnonzero(is_defect)
    out = dict(cell=cell, count=count, seed=seed, max_feature_diff=max_diff,
               stored_auroc=stored["auroc"], stored_auroc_fused=stored.get("auroc_fused"))
    # Step 1a: the saved model's own probe and fusion buffers on the cached features.
    center, scale, weight = (t.double() for t in model.fusion)
    own = ((torch.stack((s_test["map_max"], s_test["probe"]), 1) - center) / scale * weight).sum(1).numpy()
    lab = test_labels.astype(bool)
    out["repro_own"] = auc(own[~lab], own[lab])
    stored_scores = np.asarray(stored["scores"])
    out["spearman_stored"] = float(spearmanr(stored_scores, own).correlation)  # stored scores are post-processed
    out["test_map_max"] = auc(s_test["map_max"][~lab].numpy(), s_test["map_max"][lab].numpy())
    for pooling in POOLINGS:
        fn = lambda st, keys=PARTS[pooling]: torch.cat([st[k] for k in keys], dim=1)  # noqa: E731
        r = evaluate(fn, s_train, defect_order, s_held, s_test, test_labels, is_defect)
        scores = r.pop("test_scores")
        if pooling == ADOPTED:  # per test cell, for elpv_labelled.py's plot and bootstrap (--runs)
            out["scores_adopted"] = [round(float(v), 6) for v in scores]
        out[pooling] = r
    out["weight_probe_saved"] = float(weight[1])
    out["seconds"] = round(time.time() - started, 1)
    return out


def load_cell(cell: str, cache: Path):
    data = torch.load(cache / f"{cell}.pt", weights_only=True)
    paths = cached_paths(cell)
    for k in ("train", "held", "pool", "test"):
        assert len(paths[k]) == len(data[k]), (cell, k, len(paths[k]), len(data[k]))
    index = {p: (k, i) for k in ("train", "held") for i, p in enumerate(paths[k])}
    index.update({p: ("pool", i) for i, p in enumerate(paths["pool"])})
    return data, paths, index


def report(rows: list[dict], out_md: Path, header: str) -> str:
    def m(cell, count, pooling, key):
        v = [r[pooling][key] for r in rows if r["cell"] == cell and r["count"] == count]
        return float(np.mean(v)) if v else float("nan")

    cells = sorted({r["cell"] for r in rows})
    counts = sorted({r["count"] for r in rows})
    lines = [header, "", "## Step 1: reproduction (current mean+max probe)", "",
             "| run | stored AUROC | saved buffers on cached features | refit here (mean+max) | Spearman vs stored scores | max feature diff |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["cell"], r["count"], r["seed"])):
        diff = "" if r["max_feature_diff"] is None else f"{r['max_feature_diff']:.1e}"
        lines.append(f"| {r['cell']}-n{r['count']}-s{r['seed']} | {r['stored_auroc']:.4f} | {r['repro_own']:.4f} "
                     f"| {r['mean+max']['test_fused']:.4f} | {r['spearman_stored']:.5f} | {diff} |")
    worst = max(max(abs(r["repro_own"] - r["stored_auroc"]), abs(r["mean+max"]["test_fused"] - r["stored_auroc"]))
                for r in rows)
    lines += ["", f"Largest |difference| to the stored AUROC: {worst:.4f}.", ""]
    for key, title in (("test_fused", "Test fused AUROC (mean of 3 seeds)"),
                       ("cv_probe", "Training-side: cross-fitted probe AUROC, labelled defects vs held-out good (mean of 3 seeds)"),
                       ("cv_fused", "Training-side: fused AUROC with cross-fitted probe part, labelled defects vs held-out good (mean of 3 seeds)"),
                       ("test_probe", "Test probe-alone AUROC (mean of 3 seeds)"),
                       ("weight_probe", "Probe weight in the fusion (mean of 3 seeds)")):
        lines += [f"## {title}", "", "| cell | N | " + " | ".join(POOLINGS) + " |",
                  "|---|---|" + "---|" * len(POOLINGS)]
        for cell in cells:
            for count in counts:
                vals = [m(cell, count, p, key) for p in POOLINGS]
                best = int(np.nanargmax(vals)) if key != "weight_probe" else -1
                lines.append(f"| {cell} | {count} | " + " | ".join(
                    (f"**{v:.4f}**" if i == best else f"{v:.4f}") for i, v in enumerate(vals)) + " |")
        lines.append("")
    # Selection summary: average of each criterion over every (cell, count).
    lines += ["## Selection", "", "| pooling | mean cv_probe | mean cv_fused | mean test fused | "
              "mean test fused at N=25 (mono, poly) | at N=50 (mono, poly) |", "|---|---|---|---|---|---|"]
    for p in POOLINGS:
        allv = {k: np.mean([r[p][k] for r in rows]) for k in ("cv_probe", "cv_fused", "test_fused")}
        n25 = ", ".join(f"{m(c, 25, p, 'test_fused'):.4f}" for c in cells)
        n50 = ", ".join(f"{m(c, 50, p, 'test_fused'):.4f}" for c in cells)
        lines.append(f"| {p} | {allv['cv_probe']:.4f} | {allv['cv_fused']:.4f} | {allv['test_fused']:.4f} | {n25} | {n50} |")
    # Paired, per run: how often each pooling beats mean+max, on the test and on the training side.
    lines += ["", "## Per run against mean+max (24 runs: how many higher / lower)", "",
              "| pooling | test fused higher/lower | cv_fused higher/lower | cv_probe higher/lower |", "|---|---|---|---|"]
    for p in POOLINGS[1:]:
        cnt = [(sum(r[p][k] > r["mean+max"][k] for r in rows), sum(r[p][k] < r["mean+max"][k] for r in rows))
               for k in ("test_fused", "cv_fused", "cv_probe")]
        lines.append(f"| {p} | " + " | ".join(f"{a}/{b}" for a, b in cnt) + " |")
    # Per-run selection: each run takes the pooling with the highest training-side fused AUROC.
    lines += ["", "## Per-run selection by the training-side fused AUROC (ties: mean+max)", "",
              "| cell | N | mean+max test | selected test | poolings selected |", "|---|---|---|---|---|"]
    for cell in cells:
        for count in counts:
            rs = [r for r in rows if r["cell"] == cell and r["count"] == count]
            picks = [max(POOLINGS, key=lambda p, r=r: (r[p]["cv_fused"], p == "mean+max")) for r in rs]
            sel = np.mean([r[p]["test_fused"] for r, p in zip(rs, picks)])
            lines.append(f"| {cell} | {count} | {m(cell, count, 'mean+max', 'test_fused'):.4f} | {sel:.4f} | "
                         + ", ".join(picks) + " |")
    text = "\n".join(lines) + "\n"
    out_md.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", nargs="+", default=["mono", "poly"])
    ap.add_argument("--counts", type=int, nargs="+", default=[5, 10, 25, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache", default="/tmp/labels_recipe")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_pooling_runs.jsonl"))
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown from --out")
    ap.add_argument("--notes", help="a text file whose contents go under the report's header (date, load)")
    ap.add_argument("--adopted-runs", help="also write the runs with the adopted pooling's test scores in "
                    "elpv_labelled.py's runs format (the unsupervised runs copied) to this file")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in out.read_text().splitlines() if line] if out.exists() else []
    if not args.report:
        stored = {(r["cell"], r["count"], r["seed"]): r for r in map(json.loads, RUNS_FILE.read_text().splitlines())}
        have = {(r["cell"], r["count"], r["seed"]) for r in done}
        for cell in args.cells:
            todo = [(n, s) for n in args.counts for s in args.seeds if (cell, n, s) not in have]
            if not todo:
                continue
            data, paths, index = load_cell(cell, Path(args.cache))
            for count, seed in todo:
                r = run_one(cell, count, seed, data, paths, index, stored[(cell, count, seed)], None)
                with open(out, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
                done.append(r)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                  if not isinstance(v, dict)}),
                      {p: round(r[p]["test_fused"], 4) for p in POOLINGS}, flush=True)
            del data
    rows = [r for r in done if r["cell"] in args.cells and r["count"] in args.counts and r["seed"] in args.seeds]
    header = (f"# Label-probe pooling on ELPV (no retraining)\n\n"
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `OMP_NUM_THREADS=1 .venv/bin/python "
              f"benchmarks/probe_pooling.py`; {len(rows)} runs.")
    if args.notes:
        header += "\n\n" + Path(args.notes).read_text().strip()
    print(report(rows, RESULTS / "probe_pooling.md", header))
    if args.adopted_runs:
        write_adopted_runs(rows, Path(args.adopted_runs))


def write_adopted_runs(rows: list[dict], path: Path) -> None:
    """elpv_labelled.py's runs, the labelled ones rescored with the adopted pooling (AUROC and
    per-cell scores of the fused score; the map-only scores are the same models' and are kept)."""
    rescored = {(r["cell"], r["count"], r["seed"]): r for r in rows if "scores_adopted" in r}
    lines = []
    for stored in map(json.loads, RUNS_FILE.read_text().splitlines()):
        key = (stored["cell"], stored["count"], stored["seed"])
        if key in rescored:
            new = rescored[key]
            stored = {**stored, "auroc": round(new[ADOPTED]["test_fused"], 4),
                      "auroc_fused": new[ADOPTED]["test_fused"], "scores": new["scores_adopted"],
                      "label_probe": {**stored.get("label_probe", {}), "pooling": ADOPTED},
                      "rescored_by": "benchmarks/probe_pooling.py"}
        elif stored["count"] > 0:
            continue  # a labelled run not rescored here would mix the two poolings
        lines.append(json.dumps(stored))
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({len(rescored)} rescored runs)")


if __name__ == "__main__":
    main()
