"""Each model's default recipe against a nearest-neighbour floor on the broadened synthetic set.

Run by hand (not in CI):
    python benchmarks/floor_synthetic.py [--models supersimplenet simplenet stfpm efficientad]
        [--categories grass gravel fabric] [--seeds 0] [--threads 1] [--image-size S]
        [--teacher FILE] [--quick] [--report-only] [--n-test-good N --n-test-defect N]
        [--trained RUN_DIR ...]

Data: one generated MVTec-layout category per texture (``make_synthetic_mvtec``, data seed 0, the
same images for every model and training seed): 40 good training images, 100 good + 120 defective
test images (20 per kind; the first runs had 20 + 40), 128 px, every defect kind of the broadened generator (scratch, stain, hole, thin
crack, flat foreign patch, soft smudge). Default textures: the stochastic natural ``grass`` and
``gravel`` and the default ``fabric``.

Models: ``defectscope train`` (in-process CLI) with each model's default recipe: its own default
epochs (SuperSimpleNet 10, the others 3), backbone, image size (256 unless ``--image-size``),
learning rates; ``--no-images``. EfficientAD needs a PDN teacher: ``--teacher`` (default: the
Lite0-distilled PDN-S the earlier student benchmarks used, /tmp/efficientad_teacher/teacher_s_lite0.pth;
make one with ``defectscope distill-teacher --model-size s --output FILE``, about 15 min on 2 cores).
Without one, leave efficientad out of ``--models``.

Per-image test scores: the trained model reloaded with ``load_model`` and ``model.predict(path)``.

NN floor, per model, over that model's own frozen part on that model's own pre-processed input
(no training): the training images' patch features are the memory bank; a test image's score is
the largest distance from one of its patches to its nearest bank patch.
- supersimplenet: ``model.extract_features`` (EfficientNet-Lite0 blocks.2 + blocks.4, 3x3
  neighbourhood average, upscale factor 1).
- simplenet: ``model.extract_features`` (its backbone's layers, patch-aggregated and
  average-pooled to the target embedding, as its discriminator sees them).
- stfpm: the teacher's maps (resnet18 layer1-3, or the packaged Lite0 fallback offline), each
  L2-normalised over channels as STFPM compares them, upsampled to the finest map and concatenated.
- efficientad: the PDN teacher's output, standardised with the channel mean / std the model
  fitted on its training images.
``--bank N`` caps the memory bank at N random training patches (0: all; the default 50,000 keeps
every patch of the Lite0 / ResNet models at 256 px and subsamples EfficientAD's finer grid).

Paired bootstrap: 2,000 rounds; the good and the defective test images are resampled apart with
replacement; per round the model's image AUROC (mean over training seeds) minus the floor's on the
same resample. Reported: mean difference, 95 % interval, share of rounds with the model below.

Writes benchmarks/results/floor_synthetic_test100+120.md and appends one JSON line per (category,
model, seed) to benchmarks/results/floor_synthetic_test100+120_runs.jsonl (floor_synthetic.md and
floor_synthetic_runs.jsonl: the first, 20 + 40 test set) (scores included), so an interrupted run
resumes and ``--report-only`` rebuilds the report; with ``--work DIR --resume-training`` a training
stopped mid-way continues from its checkpoint (EfficientAD on ELPV poly takes about 3 h on one
core). ``--quick`` (8 training images, 6 + 12 test images, 1 epoch) smoke-tests the whole path and writes
floor_synthetic_quick.{md,jsonl} instead.

Another test set (``--n-test-good``, ``--n-test-defect``; the training images stay the same, as
every generated image has its own random stream) writes floor_synthetic_testG+D.{md,jsonl}.
``--trained RUN_DIR ...`` tests models trained earlier on the same training images (checked byte
by byte against the run's recorded data folder) instead of training them again.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import report_notes  # benchmarks/report_notes.py (this folder is on sys.path when run as a script)

RESULTS = Path(__file__).parent / "results"
MODELS = ("supersimplenet", "simplenet", "stfpm", "efficientad")
CATEGORIES = ("grass", "gravel", "fabric")
# The test set: 100 good + 120 defective images (20 per kind). The first runs used 20 + 40, on which
# a category's 95 % interval was +-0.05 to +-0.2 and one image moved the AUROC by up to 0.05; their
# files keep the plain names (floor_synthetic.md, floor_synthetic_runs.jsonl), any other size gets
# its own (floor_synthetic_testG+D.*).
N_TEST_GOOD, N_TEST_DEFECT = 100, 120
FIRST_TEST_SET = (20, 40)
DEFAULT_TEACHER = "/tmp/efficientad_teacher/teacher_s_lite0.pth"
FLOOR_FEATURES = {
    "supersimplenet": "model.extract_features (Lite0 blocks.2+4, 3x3 avg)",
    "simplenet": "model.extract_features (aggregated, pooled to target dim)",
    "stfpm": "teacher maps, channel-L2-normalised, upsampled + concatenated",
    "efficientad": "PDN teacher output, standardised by the model's fitted mean/std",
}


# ---- data ---------------------------------------------------------------------------------
def make_data(root: Path, category: str, args) -> None:
    from defectscope.data import make_synthetic_mvtec
    from defectscope.data.synthetic import ALL_DEFECT_TYPES

    make_synthetic_mvtec(root, category=category, image_size=128, n_train=args.n_train,
                         n_test_good=args.n_test_good, n_test_defect=args.n_test_defect, seed=0,
                         textures=(category,), defect_kinds=ALL_DEFECT_TYPES)


# ---- NN floor -----------------------------------------------------------------------------
@torch.inference_mode()
def floor_patches(model, key: str, x: torch.Tensor) -> torch.Tensor:
    """Pre-processed images ``[B,3,H,W]`` -> the model's frozen patch features ``[B, h*w, C]``."""
    import torch.nn.functional as F

    if key in ("supersimplenet", "simplenet"):
        f = model.extract_features(x)
    elif key == "stfpm":
        maps = list(model.feature_extractor(model.roi_images(x)).values())
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        f = torch.cat([F.interpolate(F.normalize(m.float(), dim=1), size=tuple(size), mode="bilinear",
                                     align_corners=False) for m in maps], dim=1)
    elif key == "efficientad":
        f = model._teacher_standardized(model.extract_features(x).float())
    else:
        raise ValueError(key)
    f = f.float()
    if f.dim() != 4:
        raise ValueError(f"{key}: expected patch features [B,C,h,w], got {tuple(f.shape)}")
    return f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1])


def features_of(model, key: str, samples, batch: int = 8) -> list[torch.Tensor]:
    out = []
    for i in range(0, len(samples), batch):
        x = torch.cat([model.preprocess(s.path)[0] for s in samples[i:i + batch]])
        out.extend(floor_patches(model, key, x))
    return out


def nn_floor(model, key: str, split, bank_size: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    was_training = model.training
    model.eval()
    try:
        train = torch.cat(features_of(model, key, [s for s in split.train if s.label == 0]))
        test = features_of(model, key, split.test)
    finally:
        model.train(was_training)
    total = len(train)
    if bank_size and bank_size < total:
        train = train[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:bank_size]]
    scores = []
    for patches in test:
        nearest = torch.full((len(patches),), float("inf"))
        for start in range(0, len(train), 8192):
            nearest = torch.minimum(nearest, torch.cdist(patches, train[start:start + 8192]).amin(dim=1))
        scores.append(nearest.amax().item())
    info = {"bank": len(train), "patches": total, "patches_per_image": len(test[0]), "channels": train.shape[1]}
    return np.asarray(scores), info


# ---- one run ------------------------------------------------------------------------------
def train_one(args, data_root: Path, category: str, key: str, seed: int, work: Path) -> dict:
    run_name = f"{category}_{key}_s{seed}"
    results_path = work / "runs"
    data_args = (["--data", "elpv"] if args.data == "elpv" else ["--data", "mvtec", "--data-path", str(data_root)])
    argv = ["train", "--model", key, *data_args, "--category", category,
            "--results-path", str(results_path), "--run-name", run_name, "--no-images", "--no-progress",
            "--seed", str(seed)]
    if not args.resume_training:
        argv.append("--no-resume")
    if args.image_size:
        argv += ["--image-size", str(args.image_size)]
    if args.quick:
        argv += ["--epochs", "1"]
    if key == "efficientad":
        argv += ["--teacher-weights", args.teacher]
    started = time.time()
    _cli(argv)
    seconds = time.time() - started
    run_dir = results_path / "defectscope" / args.data_group / run_name
    return evaluate(args, data_root, category, key, seed, run_dir, run_dir, seconds)


def _cli(argv: list[str]) -> None:
    """Run ``defectscope ARGV`` in this process, its output shown only when it fails."""
    from defectscope.cli import main as cli

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            rc = cli(argv)
    except BaseException:
        sys.stdout.write(log.getvalue())
        raise
    if rc:
        sys.stdout.write(log.getvalue())
        raise RuntimeError(f"defectscope {' '.join(argv)} exited with {rc}")


def trained_run_info(run_dir: Path) -> dict:
    """A run folder's model, category, training seed and training-image folder (from its params.json)."""
    params_files = sorted(Path(run_dir).glob("models/*/params.json"))
    if len(params_files) != 1:
        raise ValueError(f"{run_dir}: expected one models/<n>/params.json (a one-category run), found {len(params_files)}")
    params = json.loads(params_files[0].read_text())
    data = params.get("data") or {}
    if data.get("data") != "mvtec" or not data.get("data_path"):
        raise ValueError(f"{run_dir}: not trained on an MVTec-layout folder ({data.get('data')!r})")
    return {"model": params["model"], "category": data["category"], "seed": params["training"]["seed"],
            "train_dir": Path(data["data_path"]) / data["category"] / "train" / "good"}


def check_same_training_images(run_dir: Path, train_dir: Path, data_root: Path, category: str) -> None:
    """Refuse a trained run whose training images differ from this benchmark's (byte by byte)."""
    ours = data_root / category / "train" / "good"
    theirs = sorted(p.name for p in train_dir.glob("*.png")) if train_dir.is_dir() else []
    if not theirs:
        raise ValueError(f"{run_dir}: its training images ({train_dir}) are gone, so it cannot be checked against "
                         "this benchmark's data. Fix: train it again here (leave it out of --trained).")
    mine = sorted(p.name for p in ours.glob("*.png"))
    if theirs != mine or any((train_dir / n).read_bytes() != (ours / n).read_bytes() for n in mine):
        raise ValueError(f"{run_dir}: trained on other images than {ours} ({train_dir}). Fix: pass --n-train and the "
                         "data seed it was trained with, or train it again here.")


def rescore_one(args, data_root: Path, category: str, run_dir: Path, work: Path) -> dict:
    """A model trained earlier on the same training images, tested on this benchmark's test set."""
    info = trained_run_info(run_dir)
    check_same_training_images(run_dir, info["train_dir"], data_root, category)
    run_name = f"{category}_{info['model']}_s{info['seed']}_test"
    results_path = work / "tests"
    _cli(["test", "--model-path", str(run_dir), "--data", "mvtec", "--data-path", str(data_root),
          "--category", category, "--results-path", str(results_path), "--run-name", run_name,
          "--no-images", "--no-progress"])
    test_dir = results_path / "defectscope" / args.data_group / run_name
    result = evaluate(args, data_root, category, info["model"], info["seed"], run_dir, test_dir, None)
    result["trained_run"] = str(run_dir)
    return result


def evaluate(args, data_root: Path, category: str, key: str, seed: int, run_dir: Path, results_dir: Path,
             seconds: float | None) -> dict:
    """Score the trained model in ``run_dir`` on the test set (``model.predict``) and the NN floor;
    results_dir/results.csv holds the engine's metrics on the same test set."""
    from sklearn.metrics import roc_auc_score

    from defectscope.data import elpv_split, mvtec_split
    from defectscope.models import load_model

    with open(results_dir / "results.csv") as fh:
        row = next(r for r in csv.DictReader(fh) if r.get("category") == category)
    split = elpv_split(category, seed=0) if args.data == "elpv" else mvtec_split(data_root, category)
    model = load_model(run_dir)
    started_scores = time.time()
    scores = np.asarray([float(model.predict(s.path)[0]) for s in split.test])
    labels = [int(s.label) for s in split.test]
    score_seconds = time.time() - started_scores
    started_floor = time.time()
    floor, floor_info = nn_floor(model, key, split, args.bank)
    floor_seconds = time.time() - started_floor
    params = model.params()

    def metric(name):
        value = row.get(name)
        return float(value) if value not in (None, "", "nan") else None

    return {
        "category": category, "model": key, "seed": seed, "quick": bool(args.quick),
        "image_size": args.image_size, "n_train": args.n_train, "n_test_good": args.n_test_good,
        "n_test_defect": args.n_test_defect, "epochs": 1 if args.quick else None,
        "image_auroc": metric("image_auroc"), "pixel_auroc": metric("pixel_auroc"), "aupro": metric("aupro"),
        "image_auroc_predict": float(roc_auc_score(labels, scores)),
        "floor_image_auroc": float(roc_auc_score(labels, floor)),
        "seconds": round(seconds, 1) if seconds is not None else None, "score_seconds": round(score_seconds, 1),
        "floor_seconds": round(floor_seconds, 1),
        "backbone": params["hparams"].get("backbone"), "layers": params["hparams"].get("layers"),
        "backbone_fallback": params.get("backbone_fallback"), "trained_epochs": params["training"].get("epochs"),
        "model_image_size": list(model.image_size) if isinstance(model.image_size, (tuple, list)) else model.image_size,
        "floor_features": FLOOR_FEATURES[key], "floor_info": floor_info,
        "teacher": args.teacher if key == "efficientad" else None,
        "data": args.data,
        "paths": [Path(s.path).relative_to(data_root).as_posix() if args.data != "elpv" else Path(s.path).name
                  for s in split.test],
        "labels": labels, "scores": [float(v) for v in scores], "floor_scores": [float(v) for v in floor],
    }


# ---- bootstrap and report -----------------------------------------------------------------
def paired_bootstrap(labels, model_scores: list, other, rounds: int = 2000, seed: int = 0):
    """As benchmarks/elpv_labelled.py: resample the good and the defective test images apart with
    replacement; per round, the mean over seeds of the model's image AUROC minus the other score's.
    Returns (mean, 2.5 %, 97.5 %, share of rounds where the model is below)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    rng = np.random.default_rng(seed)
    model_scores = [np.asarray(s) for s in model_scores]
    other = np.asarray(other)
    diffs = []
    for _ in range(rounds):
        idx = np.concatenate([rng.choice(good, len(good)), rng.choice(bad, len(bad))])
        y = labels[idx]
        diffs.append(np.mean([roc_auc_score(y, s[idx]) for s in model_scores]) - roc_auc_score(y, other[idx]))
    diffs = np.asarray(diffs)
    return float(diffs.mean()), float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975)), float((diffs < 0).mean())


def _same_config(r: dict, args) -> bool:
    if args.data == "elpv":
        return r.get("data") == "elpv" and r.get("image_size") == args.image_size
    return (r.get("data", "synthetic") == "synthetic" and r.get("quick") == bool(args.quick) and r.get("image_size") == args.image_size
            and r.get("n_train") == args.n_train and r.get("n_test_good") == args.n_test_good
            and r.get("n_test_defect") == args.n_test_defect)


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def per_kind_table(rows: list[dict], models) -> list[str]:
    """Markdown lines: per model, the image AUROC of the good test images against each defect kind
    alone (mean over seeds), with the floor's beside it, so a gap can be traced to the kinds it
    comes from."""
    lines = []
    for key in models:
        if not any(r["model"] == key for r in rows):
            continue
        names, model, floor = kind_aurocs(rows, key)
        if not lines:
            counts = Counter(_kind(p) for p, y in zip(rows[0]["paths"], rows[0]["labels"]) if y == 1)
            lines = ["Per defect kind (good test images against that kind only): model, mean over seeds (NN floor).",
                     "", "| model | " + " | ".join(f"{n} ({counts[n]})" for n in names) + " |",
                     "|---|" + "---|" * len(names)]
        lines.append(f"| {key} | " + " | ".join(f"{m:.3f} ({f:.3f})" for m, f in zip(model, floor)) + " |")
    return lines


def _kind(path: str) -> str:
    """The defect kind of a test image from its recorded path (<category>/test/<kind>/<file>)."""
    parts = Path(path).parts
    return parts[2] if len(parts) > 3 else "?"


def kind_aurocs(rows: list[dict], key: str) -> tuple[list[str], list[float], list[float]]:
    """Defect kinds, the model's image AUROC on good vs each kind alone (mean over seeds) and the floor's."""
    from sklearn.metrics import roc_auc_score

    mine = [r for r in rows if r["model"] == key]
    kinds = np.asarray([_kind(p) for p in mine[0]["paths"]])
    labels = np.asarray(mine[0]["labels"])
    names = sorted({k for k, y in zip(kinds, labels) if y == 1})
    model, floor = [], []
    for name in names:
        pick = (labels == 0) | (kinds == name)
        model.append(float(np.mean([roc_auc_score(labels[pick], np.asarray(r["scores"])[pick]) for r in mine])))
        floor.append(float(roc_auc_score(labels[pick], np.asarray(mine[0]["floor_scores"])[pick])))
    return names, model, floor


def plot_kinds(runs: list[dict], args, path: Path) -> bool:
    """One panel per category: per model and defect kind, image AUROC minus the floor's (colour) with
    the model's AUROC written in; False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = [c for c in args.categories if any(r["category"] == c for r in runs)]
    if not categories:
        return False
    models = [m for m in args.models if any(r["model"] == m for r in runs)]
    fig, axes = plt.subplots(1, len(categories), figsize=(4.2 * len(categories), 3.2), squeeze=False)
    for ax, category in zip(axes[0], categories):
        rows = [r for r in runs if r["category"] == category]
        # Each model present on this category, scored once: {model: (kinds, AUROCs, floor AUROCs)}.
        scored = {m: kind_aurocs(rows, m) for m in models if any(r["model"] == m for r in rows)}
        names = next(iter(scored.values()))[0]
        grid = np.full((len(models), len(names)), np.nan)
        values = np.full((len(models), len(names)), np.nan)
        for i, key in enumerate(models):
            if key in scored:
                _, model, floor = scored[key]
                grid[i], values[i] = np.subtract(model, floor), model
        image = ax.imshow(grid, cmap="RdBu", vmin=-0.25, vmax=0.25)
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if value != value:  # this model was not run on this category
                    continue
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(grid[i][j]) > 0.15 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        # Model names on the first panel only (the panels' rows are the same models).
        ax.set_yticks(range(len(models)), models if ax is axes[0][0] else [], fontsize=8)
        ax.set_title(category, fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="image AUROC - NN floor's")
    fig.suptitle("Good vs one defect kind: model image AUROC (text), minus the floor's (colour)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _seconds(runs: list[dict]) -> str:
    """Mean training + test seconds of the runs trained by this benchmark ('earlier run' for reused ones)."""
    timed = [r["seconds"] for r in runs if r.get("seconds") is not None]
    text = f"{np.mean(timed):.0f}" if timed else ""
    reused = len(runs) - len(timed)
    return (text + (" + " if text else "") + f"{reused} earlier run{'s' if reused > 1 else ''}") if reused else text


def write_report(args, runs: list[dict], path: Path, command: str) -> None:
    runs = [r for r in runs if _same_config(r, args) and r["model"] in args.models
            and r["category"] in args.categories and r["seed"] in args.seeds]
    lines = [
        (f"# Default recipes against a nearest-neighbour floor, "
         f"{'ELPV (demo split)' if args.data == 'elpv' else 'broadened synthetic set'} ({time.strftime('%Y-%m-%d')})"),
        "",
        f"Command: `{command}` ({args.threads} thread{'s' if args.threads != 1 else ''}).",
        "",
        ("Data: the packaged ELPV cells, the demo's split (split seed 0): mono 441 training / 410 test cells, "
         "poly 690 / 582." if args.data == "elpv" else
         f"Data: `make_synthetic_mvtec`, data seed 0, 128 px, texture = category, every defect kind "
         f"(scratch, stain, hole, crack, patch, smudge); {args.n_train} good training images, "
         f"{args.n_test_good} good + {args.n_test_defect} defective test images."
         + (" **Quick smoke run (1 epoch): not a result.**" if args.quick else "")),
        ("Models: `defectscope train` with each model's defaults (SuperSimpleNet 10 epochs, STFPM and SimpleNet 3, "
         "EfficientAD 3, each raised to the model's minimum of optimizer steps where it has one, see the column "
         "'epochs'; "
         f"image size {args.image_size or 'the default 256'}). Metrics: the run's results.csv, mean "
         "(min-max) over training seeds."),
        ("NN floor: the model's own frozen features on its own input (column 'floor features'); memory bank = "
         "patches of all good training images (the model itself trains on 80 % and calibrates on 20 % of them; "
         f"`--bank` {args.bank or 'all'}); image score = max over patches of the distance to the nearest bank patch."),
        (f"Bootstrap: {args.rounds} rounds, good and defective test images resampled apart; diff = image AUROC "
         "(from `model.predict`, mean over seeds) minus the floor's; 95 % interval; share of rounds below the floor."),
        "",
    ]
    for category in args.categories:
        rows = [r for r in runs if r["category"] == category]
        if not rows:
            continue
        lines += [f"## {category}", "",
                  ("| model | backbone | seeds | image AUROC | pixel AUROC | AUPRO | NN floor image AUROC | "
                   "diff (model - floor) [95 % CI] | share below | epochs | seconds (train+test) | seconds (floor) | "
                   "floor features |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in args.models:
            mine = sorted((r for r in rows if r["model"] == key), key=lambda r: r["seed"])
            if not mine:
                continue
            if any(r["labels"] != mine[0]["labels"] or r["paths"] != mine[0]["paths"] for r in mine):
                raise ValueError(f"{category}/{key}: test images differ between seeds")
            mean, low, high, below = paired_bootstrap(mine[0]["labels"], [r["scores"] for r in mine],
                                                      mine[0]["floor_scores"], rounds=args.rounds)
            backbone = f"{mine[0]['backbone'] or '-'} {'+'.join(mine[0].get('layers') or [])}".strip()
            if mine[0].get("backbone_fallback"):
                backbone += " (offline fallback)"
            info = mine[0]["floor_info"]
            lines.append(
                f"| {key} | {backbone} | {len(mine)} | {_summary([r['image_auroc'] for r in mine])} | "
                f"{_summary([r['pixel_auroc'] for r in mine])} | {_summary([r['aupro'] for r in mine])} | "
                f"{_summary([r['floor_image_auroc'] for r in mine])} | {mean:+.3f} [{low:+.3f}, {high:+.3f}] | "
                f"{below:.2f} | {mine[0].get('trained_epochs') or '-'} | {_seconds(mine)} | {mine[0]['floor_seconds']:.0f} | "
                f"{mine[0]['floor_features']}; {info['patches_per_image']} patches x {info['channels']} ch, "
                f"bank {info['bank']} |")
        if args.data != "elpv":
            lines += ["", *per_kind_table(rows, args.models)]
        reused = [r for r in rows if r.get("trained_run")]
        if reused:
            lines += ["", "Trained earlier on the same training images and tested here (`--trained`): "
                      + ", ".join(f"{r['model']} seed {r['seed']} (`{r['trained_run']}`)" for r in reused) + "."]
        mismatch = [r for r in rows if r["image_auroc"] is not None
                    and abs(r["image_auroc"] - r["image_auroc_predict"]) > 1e-3]
        if mismatch:
            lines += ["", "Note: image AUROC from `model.predict` differs from results.csv for "
                      + ", ".join(f"{r['model']} seed {r['seed']} ({r['image_auroc_predict']:.3f})" for r in mismatch)
                      + "; the bootstrap uses the predict scores."]
        lines.append("")
    if args.data != "elpv" and plot_kinds(runs, args, path.with_name(path.stem + "_kinds.png")):
        lines[2:2] = [f"![per-kind AUROC against the floor]({path.stem}_kinds.png)", ""]
    report_notes.write_report(path, "\n".join(lines))  # keeps the "## Notes" written by hand
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("synthetic", "elpv"), default="synthetic",
                    help="elpv: the packaged solar cells, demo split (categories mono poly); own output files")
    ap.add_argument("--categories", nargs="+", default=list(CATEGORIES),
                    help="textures: fabric, wood, stone, grass, gravel (one category each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    ap.add_argument("--image-size", type=int, default=None, help="model input; None: the models' default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher", default=DEFAULT_TEACHER, help="EfficientAD's PDN-S teacher file")
    ap.add_argument("--bank", type=int, default=50000, help="memory-bank patches (0: every training patch)")
    ap.add_argument("--rounds", type=int, default=2000, help="bootstrap rounds")
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-test-good", type=int, default=N_TEST_GOOD)
    ap.add_argument("--n-test-defect", type=int, default=N_TEST_DEFECT)
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 training and 6 + 12 test images, 1 epoch, own output files")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the runs file")
    ap.add_argument("--work", default=None, help="folder for data and run folders (default: a temporary one, removed)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--trained", nargs="+", default=[], type=Path, metavar="RUN_DIR",
                    help="run folders of models trained earlier on this benchmark's training images (same "
                         "--n-train, data seed 0; checked byte by byte): they are tested on this test set "
                         "instead of trained again (e.g. a larger --n-test-good / --n-test-defect)")
    ap.add_argument("--resume-training", action="store_true",
                    help="with --work: continue a stopped training from its run folder's last.ckpt instead of "
                         "starting it again (the engine refuses a checkpoint written with other settings)")
    args = ap.parse_args()
    if args.resume_training and not args.work:
        ap.error("--resume-training needs --work DIR, the folder of the stopped run (without it the run folders "
                 "are in a new temporary folder, with nothing to resume)")
    args.data_group = "elpv" if args.data == "elpv" else "mvtec"
    if args.data == "elpv" and set(args.categories) - {"mono", "poly"}:
        args.categories = ["mono", "poly"]
    if args.quick:
        args.n_train, args.n_test_good, args.n_test_defect = 8, 6, 12
    torch.set_num_threads(args.threads)
    if args.trained and args.data == "elpv":
        ap.error("--trained is for the synthetic set only")
    stem = ("floor_elpv" if args.data == "elpv" else "floor_synthetic") + ("_quick" if args.quick else "")
    if args.data != "elpv" and not args.quick and (args.n_test_good, args.n_test_defect) != FIRST_TEST_SET:
        # Each test set has its own report and runs file (see N_TEST_GOOD).
        stem += f"_test{args.n_test_good}+{args.n_test_defect}"
    runs_file, report = RESULTS / f"{stem}_runs.jsonl", RESULTS / f"{stem}.md"
    command = "python benchmarks/floor_synthetic.py " + " ".join(a for a in sys.argv[1:] if a != "--report-only")
    RESULTS.mkdir(exist_ok=True)
    if not args.report_only:
        if "efficientad" in args.models and not Path(args.teacher).is_file():
            sys.exit(f"EfficientAD needs a PDN-S teacher and {args.teacher} does not exist. Fix: pass --teacher FILE "
                     "(e.g. made by `defectscope distill-teacher --model-size s --output FILE`, ~15 min), "
                     "or leave efficientad out of --models.")
        done = {(r["category"], r["model"], r["seed"]) for r in load_runs(runs_file) if _same_config(r, args)}
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="floor_synthetic_"))
        try:
            trained = {}
            for run_dir in args.trained:
                info = trained_run_info(run_dir)
                if info["model"] in args.models and info["seed"] in args.seeds:
                    trained[(info["category"], info["model"], info["seed"])] = run_dir
            for category in args.categories:
                todo = [(k, s) for k in args.models for s in args.seeds if (category, k, s) not in done]
                if not todo:
                    continue
                data_root = work / "data"
                if args.data != "elpv":
                    make_data(data_root, category, args)
                for key, seed in todo:
                    run_dir = trained.get((category, key, seed))
                    print(f"[{category}] {key} seed {seed} {'(trained: ' + str(run_dir) + ')' if run_dir else ''}...",
                          flush=True)
                    if run_dir:
                        result = rescore_one(args, data_root, category, run_dir, work)
                    else:
                        result = train_one(args, data_root, category, key, seed, work)
                    with open(runs_file, "a") as fh:
                        fh.write(json.dumps(result) + "\n")
                    print(f"[{category}] {key} seed {seed}: image {result['image_auroc']} pixel {result['pixel_auroc']} "
                          f"aupro {result['aupro']} floor {result['floor_image_auroc']:.3f} "
                          f"({_seconds([result])}{' s' if result['seconds'] is not None else ''} + floor "
                          f"{result['floor_seconds']:.0f} s)", flush=True)
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    write_report(args, load_runs(runs_file), report, command)


if __name__ == "__main__":
    main()
