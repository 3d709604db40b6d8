"""Command line: ``defectscope train | test | predict | export | serve | distill-teacher | simplenet``.

``defectscope train`` with no arguments is the demo: SuperSimpleNet on the packaged ELPV
solar-cell images (one model per cell type) with the packaged EfficientNet-Lite0 backbone.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

DEMO_EPOCHS = 3
# predict's default batch sizes, by measurement (benchmarks/predict_scale.py, results/predict.md).
PREDICT_BATCH_CPU = 8
PREDICT_BATCH_GPU = 32


class UsageError(ValueError):
    """A command line that cannot work; printed without a traceback, exit status 2."""


# ---- option values, checked as they are parsed (argparse ``type=``) ----------------------------
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def number(kind: type = float, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, note: str = ""):
    """An argparse ``type=`` reading an ``int`` or a finite ``float`` within ``[low, high]`` (``low_open`` /
    ``high_open``: that bound excluded); anything else is refused with the range it must be in.
    ``number(float, 0, low_open=True)("nan")`` raises ``ArgumentTypeError("expected a finite number > 0, got
    'nan'; nan and inf are refused")``, which argparse prints after ``argument --option:``.
    """
    import math

    def show(bound):
        return f"{bound:g}" if isinstance(bound, float) else str(bound)

    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {show(low)}"
    elif high is not None:
        bounds = f"{'<' if high_open else '<='} {show(high)}"
    else:
        bounds = ""
    expected = f"{'an integer' if kind is int else 'a finite number'} {bounds}".strip() + (f" ({note})" if note else "")

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}; nan and inf are refused")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse's fallback messages name the type
    return parse


SEED = number(int, 0, 2**32 - 1)


def devices_option(text: str) -> str:
    """``--devices``: a positive number of devices, or ``auto``; returned as text (``_engine`` converts)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return str(count)


def accelerator_option(text: str) -> str:
    """``--accelerator``: one of :data:`ACCELERATORS` (lower-cased); a close miss is named."""
    import difflib

    name = text.strip().lower()
    if name not in ACCELERATORS:
        close = difflib.get_close_matches(name, ACCELERATORS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise argparse.ArgumentTypeError(f"unknown accelerator {text!r}{hint}; choose from {', '.join(ACCELERATORS)}")
    return name


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=["elpv", "mvtec", "folder", "synthetic"], default="elpv",
                   help="data set layout: packaged ELPV solar cells, an MVTec AD folder, your own folders, "
                        "or a generated synthetic MVTec-layout set")
    g.add_argument("--data-path", default=None,
                   help="MVTec root (holds <category>/train/good ...) or where the synthetic set is written")
    g.add_argument("--category", nargs="+", default=None,
                   help="categories, one model each (ELPV: mono poly; MVTec: e.g. bottle; synthetic: any name)")
    g.add_argument("--normal-dir", default=None, help="folder layout: good images")
    g.add_argument("--abnormal-dir", default=None, help="folder layout: defective images (test)")
    g.add_argument("--mask-dir", default=None, help="folder layout: masks named like their images")
    g.add_argument("--test-split-ratio", type=number(float, 0, 1, low_open=True, high_open=True), default=0.2,
                   help="folder layout: share of good images held out for testing")
    g.add_argument("--split-seed", type=SEED, default=0, help="seed of the ELPV / folder train-test split")
    g.add_argument("--train-defects", type=number(int, 0), default=0,
                   help="ELPV: probability-1 cells per type added to training with image labels only "
                        "(weak supervision; drawn from a fixed pool of 50, so the test set stays the same)")
    g.add_argument("--train-defect-fraction", type=number(float, 0, 1, high_open=True), default=0.0,
                   help="MVTec / folder / synthetic: share of each defect type moved from test to training "
                        "(with masks where they exist)")
    g.add_argument("--train-abnormal-dir", default=None,
                   help="folder layout: labelled defective training images (masks from --mask-dir where they match)")
    _add_image_options(g)


def _add_image_options(g, wide_range_default: str | None = "fixed") -> None:
    g.add_argument("--wide-range", choices=["fixed", "stretch"], default=wide_range_default,
                   help="16-bit / 32-bit / float grey images to 8 bits: fixed (0..65535 or 0..1, so brightness "
                        "defects stay visible) or stretch (each image by its own min..max, for cameras that use "
                        "few levels); recorded with the model")
    g.add_argument("--max-pixels", type=number(int, 1), default=None,
                   help="largest image accepted, in pixels (checked before decoding; None: 100 megapixels)")


# Data options, as recorded in a run's run.json so that `test` can rebuild the same split.
DATA_OPTIONS = ("data", "data_path", "category", "normal_dir", "abnormal_dir", "mask_dir", "test_split_ratio",
                "split_seed", "train_defects", "train_defect_fraction", "train_abnormal_dir", "wide_range")
PATH_OPTIONS = ("data_path", "normal_dir", "abnormal_dir", "mask_dir", "train_abnormal_dir")
RUN_FILE = "run.json"


def _add_threshold_options(p: argparse.ArgumentParser, for_test: bool = False) -> None:
    g = p.add_argument_group("verdict threshold")
    if not for_test:
        g.add_argument("--val-fraction", type=number(float, 0, 1, high_open=True), default=0.2,
                       help="share of the good training images held out (seeded) to set the threshold on; "
                            "0: none (the threshold is then set on training images, which is optimistic)")
        g.add_argument("--select-epoch", choices=["validation", "last"], default="validation",
                       help="validation: keep the epoch whose weights had the lowest loss on the held-out good "
                            "images, for models whose loss measures good images (stfpm); last: the last epoch's")
    g.add_argument("--threshold-rule", choices=["false_reject", "f1"], default="false_reject",
                   help="false_reject: at most --max-false-reject of good images called defective; f1: best F1 on "
                        "held-out labelled defects (needs at least 2 labelled defective training images)")
    g.add_argument("--max-false-reject", type=number(float, 0, 1, low_open=True, high_open=True), default=0.01,
                   help="false-reject rate the threshold is set for (0.01: 1 in 100 good parts rejected)")


def _add_engine_options(p: argparse.ArgumentParser, for_test: bool = False) -> None:
    g = p.add_argument_group("run")
    if for_test:
        # None = not given: results.csv and overlays go to the model's own run folder.
        where = ("; none of the four given: the model's own run folder (its results.csv row for this data and "
                 "category is replaced). Give one to keep the test apart, e.g. on a second data set")
        g.add_argument("--results-path", default=None, help="root of the folder the test writes to; None: results"
                       + where)
        g.add_argument("--project", default=None, help="its level 1; None: defectscope")
        g.add_argument("--group", default=None, help="its level 2; None: the data set name")
        g.add_argument("--run-name", default=None, help="its level 3; None: the model's run name + '_test'")
    else:
        g.add_argument("--results-path", default="results", help="root of run folders")
        g.add_argument("--project", default="defectscope", help="run folder level 1")
        g.add_argument("--group", default=None, help="run folder level 2; None: the data set name")
        g.add_argument("--run-name", default=None, help="run folder level 3; None: a timestamp")
    g.add_argument("--batch-size", type=number(int, 1), default=None,
                   help="images per step; None: 8 (SuperSimpleNet's paper: 32; 8 learns more per CPU-minute), or "
                        "what the model trains at (efficientad: 1, as its reference)")
    g.add_argument("--seed", type=SEED, default=0, help="random seed (same seed, same model on CPU)")
    g.add_argument("--accelerator", type=accelerator_option, default="auto",
                   help="cpu, gpu (= cuda), mps, auto (Lightning Fabric)")
    g.add_argument("--devices", type=devices_option, default="1", help="number of devices or 'auto' (DDP when > 1)")
    g.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    g.add_argument("--num-nodes", type=number(int, 1), default=1, help="machines (Lightning; with --strategy ddp)")
    g.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 16-mixed, bf16-mixed")
    g.add_argument("--num-workers", type=number(int, 0), default=0, help="data-loading processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-images", action="store_true", help="do not write heat-map overlays")
    g.add_argument("--max-images", type=number(int, 0), default=60,
                   help="overlays per category: the highest-scoring good, lowest- and highest-scoring defective "
                        "images (0: all)")


def _epochs_help() -> str:
    """--epochs help, read from each model's ``default_epochs`` and ``min_default_steps`` (the
    numbers :func:`default_epochs` uses), so the help cannot drift from them."""
    from defectscope.models import MODELS

    epochs = ", ".join(f"{key} {getattr(cls, 'default_epochs', DEMO_EPOCHS)}" for key, cls in MODELS.items())
    steps = ", ".join(f"{key} {cls.min_default_steps:,}" for key, cls in MODELS.items()
                      if getattr(cls, "min_default_steps", None))
    return (f"training epochs; None: the model's default ({epochs}), raised on small training sets to a minimum "
            f"of optimizer steps ({steps}; the papers train far longer)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="defectscope", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{train,test,predict,export,serve,simplenet,distill-teacher}")
    # Parsed by defectscope.cli_simplenet (main dispatches to it); listed here for --help.
    sub.add_parser("simplenet", add_help=False, help="SimpleNet, reference command form: simplenet [main options] "
                   "net [model options] dataset [data options] mvtec <data_path> <subdataset>...")
    # Parsed by defectscope.cli_distill.
    sub.add_parser("distill-teacher", add_help=False, help="distil an EfficientAD PDN teacher (S or M) from a "
                   "packaged backbone, offline: distill-teacher --model-size s --output teacher_s.pth")
    from defectscope.cli_export import add_parser as add_export_parser

    add_export_parser(sub, fmt)
    from defectscope.cli_serve import add_parser as add_serve_parser

    add_serve_parser(sub, fmt)

    train = sub.add_parser("train", help="train (and test) a model; no arguments: the ELPV demo", formatter_class=fmt)
    _add_data_options(train)
    m = train.add_argument_group("model")
    m.add_argument("--model", default="supersimplenet",
                   help="supersimplenet, simplenet (which also takes `defectscope simplenet` net/dataset options), "
                        "stfpm or efficientad (their own settings below)")
    m.add_argument("--backbone", default=None,
                   help="efficientnet_lite0/1/2 (packaged), resnet18, wide_resnet50_2 (need --weights or a local "
                        "cache); None: efficientnet_lite0, or the model's own (stfpm: resnet18, with a packaged "
                        "fallback offline)")
    m.add_argument("--layers", nargs="+", default=None, help="backbone layers; None: the backbone's own")
    m.add_argument("--weights", default=None, help="backbone weights file (.pth/.safetensors)")
    m.add_argument("--image-size", type=number(int, 32, note="the models' smallest image_size"), default=256,
                   nargs="+", metavar=("W", "H"),
                   help="model input: one value, a square; two, width and height (images, or tiles with --tile, "
                        "are resized to it)")
    m.add_argument("--perlin-threshold", type=number(float, 0, 1, high_open=True), default=0.2,
                   help="Perlin noise threshold for synthetic anomalies")
    m.add_argument("--noise-std", type=number(float, 0, low_open=True), default=None,
                   help="synthetic feature-noise std in units of each channel's std; None: the model's (1.0)")
    m.add_argument("--adapt-cls-features", action="store_true", help="ICPR variant (default: JIMS)")
    m.add_argument("--image-score", choices=["auto", "classifier", "map_max", "mean", "fused"], default="auto",
                   help="image score: the classification head, the anomaly map's maximum, their mean, or fused (the map "
                        "maximum and a probe fitted on the labelled defects, weighed by how well each separates them); "
                        "auto: map_max when trained unsupervised, fused when trained with labelled defects")
    m.add_argument("--adaptor-init", choices=["orthogonal", "xavier"], default="orthogonal",
                   help="SuperSimpleNet adaptor's starting weights (xavier: the reference's; orthogonal keeps "
                        "every feature direction at the noise's scale)")
    m.add_argument("--regime", choices=["auto", "unsupervised", "weakly", "mixed", "supervised"], default="auto",
                   help="supervision regime; auto follows the training data (labelled defects with masks: "
                        "supervised, with image labels only: weakly, both: mixed, none: unsupervised)")
    m.add_argument("--defects-per-batch", type=number(int, 0), default=None,
                   help="labelled defective images in every training batch (drawn in turn, so each is seen "
                        "equally often); None: a quarter of the batch; 0: shuffle them in with the good images")
    m.add_argument("--upscale-factor", type=number(int, 1), default=1,
                   help="feature map size as a multiple of the largest backbone map (reference: 2, 4x slower)")
    m.add_argument("--epochs", type=number(int, 1), default=None, help=_epochs_help())
    m.add_argument("--lr-scale", type=number(float, 0, low_open=True), default=2.0, help="multiplies the reference learning rates")
    m.add_argument("--no-test", action="store_true", help="train only")
    m.add_argument("--no-resume", action="store_true", help="start again even if the run folder has a checkpoint")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the trainable heads (needs a C++ compiler on CPU). On CPU SuperSimpleNet's "
                        "fused map head is already faster: no gain there (0.99-1.02x per step)")
    m.add_argument("--roi", default=None, metavar="MASK",
                   help="region-of-interest mask image for the whole data set (non-zero = inside; resized to the "
                        "images with a notice): outside it the map is zero, the score ignores it and training adds "
                        "no synthetic noise there; saved with the model, so test and predict apply it")
    m.add_argument("--tile", type=number(int, 32), default=None, metavar="SIZE",
                   help="split images larger than the model's input into tiles SIZE pixels high (as wide as the "
                        "input's aspect ratio makes them) for training and inference; maps are stitched to the full "
                        "image and the score is the stitched map's maximum. Saved with the model")
    m.add_argument("--tile-overlap", type=number(int, 0), default=0, metavar="PX",
                   help="pixels shared by neighbouring tiles (blended in the stitched map; under half of --tile)")
    m.add_argument("--roi-dir", default=None, metavar="DIR",
                   help="per-image ROI masks named like the images (same file stem), applied to maps and scores "
                        "inside the --roi one; an image without one uses the --roi mask (said once)")
    _add_engine_options(train)
    _add_threshold_options(train)
    _add_generic_model_options(train)

    test = sub.add_parser("test", help="measure a trained run on its test split (never changes the model, unless "
                          "--update-threshold)", formatter_class=fmt)
    test.add_argument("--model-path", required=True, help="run folder (or its models/<n> folder)")
    _add_data_options(test)
    # None = not given: the run's own data settings (run.json) fill them in.
    test.set_defaults(**{name: None for name in DATA_OPTIONS})
    _add_engine_options(test, for_test=True)
    _add_threshold_options(test, for_test=True)
    test.add_argument("--update-threshold", action="store_true",
                      help="set the model's threshold again on this test set's scores (with --threshold-rule / "
                           "--max-false-reject) and save it; without it, test only reports")

    predict = sub.add_parser(
        "predict", formatter_class=fmt, usage="defectscope predict MODEL IMAGES_OR_FOLDERS... [options]",
        help="score images with a run folder or an exported model: CSV, regions, overlays and report.html out",
        description="MODEL: a run folder (or its "
                    "models/<n> folder), or an exported model (.onnx / .xml file, or its export folder). Writes to "
                    "--output, as each batch is scored: predictions.csv (file, score, verdict, threshold, seconds, "
                    "largest defect region's box x0,y0,x1,y1 in the image's pixels with x1/y1 exclusive, its area "
                    "and peak), regions.json (every connected region at or above the pixel threshold), images/ "
                    "(image | heat-map | predicted region), masks/ and maps/ on request, and report.html (one "
                    "self-contained page). Unreadable files are skipped with the reason and the run goes on. "
                    "Ground truth (adds image AUROC, F1-max, false-reject and escape rates to the report): an "
                    "input folder with a good/ sub-folder read with --recursive (MVTec test layout: images under "
                    "good/ are good, under its other sub-folders defective), or --labels CSV.",
    )
    predict.add_argument("inputs", nargs="+", metavar="PATH",
                         help="the model, then image files or folders (with --model-path: images and folders only)")
    predict.add_argument("--model-path", default=None,
                         help="the model, as older scripts pass it; then every positional argument is an image or folder")
    predict.add_argument("--recursive", action="store_true", help="also read the images in sub-folders of the folders")
    predict.add_argument("--category", default=None,
                         help="which model of a multi-category run (its categories are listed when it is missing)")
    predict.add_argument("--threshold", type=number(float), default=None,
                         help="verdict threshold for this run only (default: the model's saved one)")
    predict.add_argument("--pixel-threshold", type=number(float), default=None,
                         help="map level that marks defect regions for this run only (default: the model's saved "
                              "one; a model saved without one uses the image threshold, with a notice)")
    predict.add_argument("--output", default="predictions", help="folder for predictions.csv, regions.json, report.html, "
                                                                 "images/, masks/, maps/")
    predict.add_argument("--batch-size", type=number(int, 1), default=None,
                         help=f"images per batch; None: {PREDICT_BATCH_CPU} on CPU, {PREDICT_BATCH_GPU} on a GPU "
                              "(measured: benchmarks/results/predict.md)")
    predict.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    predict.add_argument("--no-progress", action="store_true", help="no progress bars")
    predict.add_argument("--no-images", action="store_true", help="do not write images/ overlays")
    predict.add_argument("--save-masks", action="store_true",
                         help="write masks/: the predicted defect regions as 0/255 PNG at each image's size")
    predict.add_argument("--save-maps", choices=["npy", "png16"], default=None,
                         help="write maps/: raw maps at each image's size, float32 .npy or 16-bit PNG (its value "
                              "range in the PNG text fields defectscope_min / defectscope_max)")
    predict.add_argument("--labels", default=None, metavar="CSV",
                         help="ground truth: a CSV with columns file,label (label 0/1, good/defect or ok/ng; files "
                              "matched by path, else by name); without it, a folder with a good/ sub-folder read "
                              "with --recursive gives the labels")
    predict.add_argument("--no-report", action="store_true", help="do not write report.html")
    predict.add_argument("--report-images", type=number(int, 0), default=40,
                         help="thumbnails in report.html: half the highest scores, half the lowest")
    _add_image_options(predict.add_argument_group("images"), wide_range_default=None)
    return parser


def _splits(args) -> list[tuple[str, object]]:
    """(category, DataSplit) pairs for the chosen data set."""
    from defectscope import data

    if args.data == "elpv":
        return [(c, data.elpv_split(c, seed=args.split_seed, train_defects=args.train_defects))
                for c in (args.category or ["mono", "poly"])]
    if args.train_defects:
        raise UsageError("--train-defects is for --data elpv; use --train-defect-fraction for MVTec / folder / synthetic")
    fraction = args.train_defect_fraction
    if args.data == "mvtec":
        if not args.data_path or not args.category:
            raise UsageError("--data mvtec needs --data-path <root> and --category <name> [...]")
        return [(c, data.mvtec_split(args.data_path, c, train_defect_fraction=fraction, seed=args.split_seed))
                for c in args.category]
    if args.data == "synthetic":
        root = Path(args.data_path or "results/synthetic-data")
        out = []
        for i, c in enumerate(args.category or ["synthetic"]):
            data.make_synthetic_mvtec(root, category=c, seed=args.split_seed + i)
            out.append((c, data.mvtec_split(root, c, train_defect_fraction=fraction, seed=args.split_seed)))
        return out
    if not args.normal_dir:
        raise UsageError("--data folder needs --normal-dir (and usually --abnormal-dir, --mask-dir)")
    split = data.folder_split(args.normal_dir, args.abnormal_dir, args.mask_dir,
                              test_split_ratio=args.test_split_ratio, seed=args.split_seed,
                              train_abnormal_dir=args.train_abnormal_dir, train_defect_fraction=fraction)
    return [(Path(args.normal_dir).name, split)]


# Models whose own settings the train parser builds from their constructor signatures (the
# SuperSimpleNet and SimpleNet options above are spelt out by hand).
GENERIC_MODELS = ("stfpm", "efficientad")
# Constructor arguments every model takes, set by the shared options above.
SHARED_MODEL_ARGS = {"backbone", "layers", "weights", "image_size", "pretrained", "pre_processor", "post_processor",
                     "evaluator", "visualizer", "feature_extractor", "self"}


def _generic_model_params() -> dict[str, dict]:
    """``{name: {"default": ..., "models": {model: default}, "help": ...}}`` for the constructor
    arguments of :data:`GENERIC_MODELS`, from their signatures and ``Args:`` docstrings."""
    import inspect

    from defectscope.models import MODELS

    params: dict[str, dict] = {}
    for key in GENERIC_MODELS:
        cls = MODELS.get(key)
        if cls is None:
            continue
        docs = _args_docs(cls.__doc__ or "") | _args_docs(cls.__init__.__doc__ or "")
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name in SHARED_MODEL_ARGS or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                continue
            entry = params.setdefault(name, {"models": {}, "docs": {}, "default": param.default})
            entry["models"][key] = param.default
            entry["docs"][key] = docs.get(name, "")
    return params


def _args_docs(doc: str) -> dict[str, str]:
    """``name: text`` of a Google-style ``Args:`` section (continuation lines joined)."""
    import re

    out, current, inside = {}, None, False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            inside = True
            continue
        if inside:
            match = re.match(r"^(\w+)(?: \([^)]*\))?:\s*(.*)$", stripped)
            if match and line.startswith(" " * 8) and not line.startswith(" " * 12):
                current = match.group(1)
                out[current] = match.group(2)
            elif stripped and current and line.startswith(" " * 12):
                out[current] += " " + stripped
            elif not stripped:
                current = None
            elif not line.startswith(" " * 8):
                inside = False
    return out


def _option_type(default):
    if isinstance(default, bool):
        return None
    if isinstance(default, int):
        return number(int)
    if isinstance(default, float):
        return number(float)
    return str


def _add_generic_model_options(p: argparse.ArgumentParser) -> None:
    """One option per constructor argument of the models in :data:`GENERIC_MODELS`; None (the
    default) leaves the model's own default, which the help names for each model."""
    params = _generic_model_params()
    if not params:
        return
    g = p.add_argument_group("stfpm / efficientad settings (None: the model's own default)")
    taken = {o for a in p._actions for o in a.option_strings}
    for name, entry in params.items():
        flag = "--" + name.replace("_", "-")
        if flag in taken:
            continue
        # One model: its own words; shared by several (--lr): each model's words and default.
        if len(entry["models"]) == 1:
            (model, default), = entry["models"].items()
            text = f"{entry['docs'][model]} [{model}: {default!r}]".strip()
        else:
            text = "; ".join(f"{model}: {entry['docs'][model]} [{default!r}]".replace(":  [", ": [")
                             for model, default in entry["models"].items())
        text = text.replace("%", "%%")  # argparse formats help with %
        if isinstance(entry["default"], bool):
            g.add_argument(flag, dest=f"model_{name}", type=_bool_option, default=None, metavar="{true,false}",
                           help=text)
        else:
            g.add_argument(flag, dest=f"model_{name}", type=_option_type(entry["default"]), default=None,
                           metavar=name.upper(), help=text)


def _bool_option(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _generic_model_kwargs(args, key: str) -> dict:
    """Constructor arguments for a model of :data:`GENERIC_MODELS` from the command line: the
    shared options and the given model settings; a setting of another model is refused."""
    params = _generic_model_params()
    kwargs = {"image_size": args.image_size, "visualizer": not args.no_images}
    for name in ("backbone", "layers", "weights"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    for name, entry in params.items():
        value = getattr(args, f"model_{name}", None)
        if value is None:
            continue
        if key not in entry["models"]:
            owners = ", ".join(entry["models"])
            raise UsageError(f"--{name.replace('_', '-')} is a setting of {owners}, not of {key}. Fix: leave it out.")
        kwargs[name] = value
    import inspect

    from defectscope.models import MODELS

    accepted = inspect.signature(MODELS[key].__init__).parameters
    for name in ("backbone", "layers", "weights"):
        if name in kwargs and name not in accepted:
            raise UsageError(f"{key} takes no --{name} (its frozen part is not a timm backbone). Fix: leave it out.")
    return kwargs


def _engine(args, run_name=None, results_path=None, project=None, group=None, epochs=1, data_info=None,
            model=None):
    from defectscope.engine import Engine

    batch_size = _batch_size(args, model)

    devices = args.devices if args.devices == "auto" else int(args.devices)
    return Engine(
        results_path=results_path or args.results_path, project=project or args.project,
        group=group or args.group or args.data, run_name=run_name or args.run_name, max_epochs=epochs,
        batch_size=batch_size, seed=args.seed, accelerator=args.accelerator, devices=devices,
        strategy=args.strategy, precision=args.precision, num_nodes=args.num_nodes, num_workers=args.num_workers,
        progress=not args.no_progress, resume=not getattr(args, "no_resume", False),
        compile_heads=getattr(args, "compile", False), val_fraction=getattr(args, "val_fraction", 0.2),
        threshold_rule=getattr(args, "threshold_rule", "false_reject"),
        select_epoch=getattr(args, "select_epoch", "validation"),
        defects_per_batch=_defects_per_batch(args, batch_size),
        max_false_reject=getattr(args, "max_false_reject", 0.01), data_info=data_info,
    )


def _batch_size(args, model) -> int:
    """--batch-size, else 8, or the batch size the model trains at when it allows only one."""
    return args.batch_size or (getattr(model, "max_batch_size", None) or 8)


def default_epochs(model, n_train: int, args) -> int:
    """Epochs when --epochs is not given: the model's ``default_epochs``, raised so that training
    takes at least the model's ``min_default_steps`` optimizer steps (a small training set gives
    few steps per epoch), after the threshold hold-out (--val-fraction)."""
    import math

    epochs = int(getattr(model, "default_epochs", DEMO_EPOCHS))
    min_steps = getattr(model, "min_default_steps", None)
    if not min_steps:
        return epochs
    trained = max(1, n_train - round(n_train * getattr(args, "val_fraction", 0.2)))
    steps_per_epoch = max(1, trained // _batch_size(args, model))
    return max(epochs, math.ceil(min_steps / steps_per_epoch))


def _defects_per_batch(args, batch_size: int) -> int | None:
    value = getattr(args, "defects_per_batch", None)
    if value is not None and value >= batch_size:
        raise UsageError(f"--defects-per-batch {value} leaves no room for good images in a batch of {batch_size}. "
                         f"Fix: at most {batch_size - 1}, or a larger --batch-size.")
    return value


def data_settings(args) -> dict:
    """The data options of ``args`` as recorded in run.json (paths made absolute, so that
    ``test`` finds the data from any working directory)."""
    settings = {name: getattr(args, name, None) for name in DATA_OPTIONS}
    for name in PATH_OPTIONS:
        if settings[name] is not None:
            settings[name] = str(Path(settings[name]).resolve())
    return settings


def write_run_file(run_dir: Path, settings: dict, models: dict[str, str], model_name: str) -> None:
    """run.json: the data a run was trained on and which models/<n> holds which category."""
    from defectscope.models.base import atomic_save

    atomic_save({"format": "defectscope-run", "format_version": 1, "model": model_name, "data": settings,
                 "models": models}, run_dir / RUN_FILE, use_torch=False)


def read_run_file(run_dir: Path) -> dict | None:
    """run.json of ``run_dir`` (None when the run was trained before runs recorded their data)."""
    import json

    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}). Fix: pass the data options (--data ...) explicitly.") from err
    if not isinstance(run, dict) or run.get("format") != "defectscope-run" or not isinstance(run.get("data"), dict):
        raise UsageError(f"{path} is not a defectscope run file. Fix: pass the data options (--data ...) explicitly.")
    return run


def _print_metrics(rows: list[dict], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Results ({run_dir})")
    for col in ["category", "image AUROC", "pixel AUROC", "AUPRO", "F1-max", "threshold", "false rejects",
                "escapes", "test images"]:
        table.add_column(col)
    for r in rows:
        f = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"  # noqa: E731 (NaN-aware)
        pct = lambda v: "n/a" if v is None or v != v else f"{v:.1%}"  # noqa: E731
        table.add_row(r["category"], f(r["image_auroc"]), f(r["pixel_auroc"]), f(r["aupro"]),
                      f(r["image_f1_max"]), f"{r['threshold']:.4g}",
                      f"{pct(r['false_reject_rate'])} of {r['n_good']}", f"{pct(r['escape_rate'])} of {r['n_defect']}",
                      str(r["n_test"]))
    # Piped to a file or CI log, rich assumes 80 columns and squeezes the headers; 120 fits them.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(table)
    for r in rows:
        for note in r["notes"]:
            console.print(f"[yellow]note[/] ({r['category']}): {note}")


def _merge_notes(split_notes: list[str], metric_notes: list[str]) -> list[str]:
    """The split's notes, then the metrics' notes that say something new."""
    pixel_explained = any("pixel AUROC" in n for n in split_notes)
    return list(split_notes) + [n for n in metric_notes if not (pixel_explained and n.startswith("pixel AUROC and AUPRO need"))]


def _check_test_images(model, split) -> None:
    """Decode every test image and mask before training, so a bad test file does not surface
    only after the training time is spent."""
    from defectscope.data import AnomalyDataset, DataError

    if split.test:
        try:
            AnomalyDataset(split.test, image_size=model.image_size, mean=model.mean, std=model.std).validate()
        except DataError as err:
            raise DataError(f"Test set of {split.name!r} (checked before training): {err}") from err


def _image_size_option(values, model: str):
    """``--image-size S`` -> S; ``--image-size W H`` -> (H, W), the models' (height, width)."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1:
        return values[0]
    if len(values) != 2:
        raise UsageError(f"--image-size takes one value (a square) or two (width height), got {len(values)}.")
    width, height = values
    if width == height:
        return width
    from defectscope.models import model_key

    if model_key(model) == "simplenet":
        raise UsageError("simplenet takes a square --image-size (it centre-crops a square). Fix: pass one value.")
    return (height, width)


def _check_tile_options(args) -> None:
    if args.tile is None:
        if args.tile_overlap:
            raise UsageError("--tile-overlap needs --tile SIZE. Fix: add --tile, or leave out --tile-overlap.")
        return
    if args.tile_overlap * 2 >= args.tile:
        raise UsageError(f"--tile-overlap {args.tile_overlap} must be under half of --tile {args.tile}. Fix: a smaller "
                         "overlap (an eighth of the tile is plenty for blending).")
    if args.roi is not None or args.roi_dir is not None:
        raise UsageError("--tile with --roi / --roi-dir is not supported yet (a ROI is kept at the model's input size, "
                         "not the full image's). Fix: leave out one of them.")
    from defectscope.models import model_key

    if model_key(args.model) == "simplenet":
        raise UsageError("--tile is not supported for simplenet yet. Fix: use supersimplenet, stfpm or efficientad.")


def cmd_train(args) -> int:
    import torch

    from defectscope.models import create_model, model_key
    from defectscope.models.common import SettingError

    args.image_size = _image_size_option(args.image_size, args.model)
    _check_tile_options(args)
    if model_key(args.model) == "simplenet":
        from defectscope.cli_simplenet import train_from_args

        return train_from_args(args)  # epochs: SimpleNet's defaults, per category (cli_simplenet)

    from defectscope.data import summarise

    started = time.time()
    splits = _splits(args)
    run_name = args.run_name or time.strftime("%Y%m%d-%H%M%S")
    settings = data_settings(args)
    if settings["data"] != "folder":  # the categories trained (the default ones too), for `test`
        settings["category"] = [category for category, _ in splits]
    models: dict[str, str] = {}
    rows, run_dir = [], None
    built = []
    key = model_key(args.model)
    for index, (category, split) in enumerate(splits):
        torch.manual_seed(args.seed)  # the heads' initial weights, so --seed fixes the whole model
        if key in GENERIC_MODELS:
            generic_kwargs = _generic_model_kwargs(args, key)
            try:
                model = create_model(args.model, **generic_kwargs)
            except SettingError as error:
                # Named as the option the user typed (--hard-fraction, not hard_fraction).
                if error.setting not in generic_kwargs:
                    raise
                flag = f"--{error.setting.replace('_', '-')}"
                raise UsageError(str(error).replace(error.setting, flag, 1)) from error
            if not args.no_test:
                _check_test_images(model, split)
            built.append(model)
            continue
        kwargs = dict(backbone=args.backbone or "efficientnet_lite0", layers=args.layers, weights=args.weights, image_size=args.image_size,
                      perlin_threshold=args.perlin_threshold, adapt_cls_features=args.adapt_cls_features,
                      upscale_factor=args.upscale_factor, lr_scale=args.lr_scale, visualizer=not args.no_images)
        if model_key(args.model) == "supersimplenet":
            kwargs["image_score"] = args.image_score
            kwargs["adaptor_init"] = args.adaptor_init
        if args.noise_std is not None:
            kwargs["noise_std"] = args.noise_std
        model = create_model(args.model, **kwargs)
        if not args.no_test:
            _check_test_images(model, split)
        built.append(model)
    for index, ((category, split), model) in enumerate(zip(splits, built)):
        # Without --epochs: the model's own default (SuperSimpleNet: 10, more on small sets).
        epochs = args.epochs if args.epochs is not None else default_epochs(model, len(split.train), args)
        engine = _engine(args, run_name=run_name, epochs=epochs,
                         data_info={**settings, "category": category}, model=model)
        engine.model_index = index
        run_dir = engine.run_dir
        models[str(index)] = category
        print(f"[{category}] {summarise(split)}")
        if args.roi is not None or args.roi_dir is not None:
            from defectscope.data.roi import configure_roi

            engine.image_rois = configure_roi(model, args.roi, args.roi_dir, split.train)  # an Engine argument
        if args.tile is not None:
            from defectscope.data.tiling import Tiler

            engine.tiler = Tiler(args.tile, args.tile_overlap, batch_size=engine.batch_size)
        engine.fit(model, split.train, regime=args.regime)
        if engine.fabric.is_global_zero:
            write_run_file(run_dir, settings, models, model.name)
        if not args.no_test:
            metrics = engine.test(model, split.test, category=category, max_images=args.max_images or None,
                                  data_name=args.data)
            metrics["notes"] = _merge_notes(split.notes, metrics["notes"])
            rows.append(metrics)
    if rows:
        _print_metrics(rows, run_dir)
    print(f"Run folder: {run_dir}  ({time.time() - started:.0f} s)")
    return 0


def _run_dir_of(path: Path) -> Path:
    """The run folder of a run folder, its models/ folder, a models/<n> folder or a file in one."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if path.name.isdigit() and path.parent.name == "models":
        return path.parent.parent
    if path.name == "models":
        return path.parent
    return path


def _test_data_args(args, run: dict | None):
    """The data options for ``test``: the ones given, else the run's own (run.json)."""
    parser = argparse.ArgumentParser()
    _add_data_options(parser)
    defaults = parser.parse_args([])
    given = {name: getattr(args, name) for name in DATA_OPTIONS if getattr(args, name) is not None}
    if "data" not in given:
        if run is None:
            raise UsageError(
                "This run does not record which data it was trained on (no run.json: trained by an older "
                "defectscope). Fix: pass the data options it was trained with, e.g. --data elpv or --data mvtec "
                "--data-path <root> --category <name>."
            )
        base = dict(run["data"])
        if "category" in given:
            base["category"] = given.pop("category")
        if given:
            raise UsageError(
                f"--{'/--'.join(n.replace('_', '-') for n in given)} given without --data: the run's own data "
                "settings are used as a whole. Fix: also pass --data (and every data option) to test on other data."
            )
    else:
        base = {name: getattr(defaults, name) for name in DATA_OPTIONS}
        base.update(given)
    for name, value in base.items():
        setattr(args, name, value)
    return args


def cmd_test(args) -> int:
    from defectscope.models import find_model_dir, load_model
    from defectscope.models.base import model_category

    if not Path(args.model_path).exists():
        find_model_dir(args.model_path)  # the not-found error, with its fix
    run_dir = _run_dir_of(args.model_path)
    chosen = Path(args.model_path)
    chosen = chosen.parent if chosen.is_file() else chosen
    own_category = model_category(chosen) if chosen != run_dir else None
    if args.category is None and own_category:
        args.category = [own_category]  # a models/<n> folder: test its own category
    run = read_run_file(run_dir)
    own_data = args.data is None
    _test_data_args(args, run)
    if args.wide_range:
        from defectscope.data import images

        images.WIDE_RANGE = args.wide_range  # as the run read its images (run.json), unless given
    if own_data and run is not None:
        print(f"Testing on the run's own data ({RUN_FILE}): --data {args.data}"
              + (f" --category {' '.join(args.category)}" if args.category else ""))
    if any(v is not None for v in (args.results_path, args.project, args.group, args.run_name)):
        if args.update_threshold:
            raise UsageError("--update-threshold saves the model in its own run folder, so its test results go "
                             "there too. Fix: leave out --results-path, --project, --group and --run-name, or test "
                             "without --update-threshold.")
        out = dict(results_path=args.results_path or "results", project=args.project or "defectscope",
                   group=args.group or args.data, run_name=args.run_name or f"{run_dir.name}_test")
    else:
        out = dict(results_path=run_dir.parent.parent.parent, project=run_dir.parent.parent.name,
                   group=run_dir.parent.name, run_name=run_dir.name)
    out_dir = Path(out["results_path"]) / out["project"] / out["group"] / out["run_name"]
    rows = []
    for category, split in _splits(args):
        folder = find_model_dir(args.model_path, category=category)
        model = load_model(folder)
        engine = _engine(args, **out)
        engine.model_index = int(folder.name) if folder.name.isdigit() else 0
        metrics = engine.test(model, split.test, category=category, save_images=not args.no_images,
                              max_images=args.max_images or None, update_threshold=args.update_threshold,
                              data_name=args.data)
        metrics["notes"] = _merge_notes(split.notes, metrics["notes"])
        rows.append(metrics)
    _print_metrics(rows, out_dir)
    return 0


EXPORTED_SUFFIXES = (".onnx", ".xml")


def _model_kind(path: Path) -> str | None:
    """``"run"`` (a run folder, models/<n> folder or a file in one), ``"exported"`` (an .onnx /
    .xml file or a folder holding one) or None: not a model."""
    if path.is_file():
        if path.suffix.lower() in EXPORTED_SUFFIXES:
            return "exported"
        if path.name in ("ckpt.pth", "params.json"):
            return "run"
        if path.suffix.lower() == ".json" and any(path.with_suffix(s).is_file() for s in EXPORTED_SUFFIXES):
            return "exported"
        return None
    if not path.is_dir():
        return None
    if (path / "params.json").is_file() or (path / "ckpt.pth").is_file() or (path / "models").is_dir():
        return "run"
    if any(p.suffix.lower() in EXPORTED_SUFFIXES for p in path.iterdir() if p.is_file()):
        return "exported"
    return None


def _predict_model_and_inputs(args) -> tuple[Path, list[str], str]:
    """The model, the image inputs and the model's kind, from ``MODEL IMAGES...`` or the older
    ``IMAGES... --model-path MODEL``; a first argument that is not a model is refused clearly."""
    inputs = list(args.inputs)
    model = args.model_path
    if model is None:
        if len(inputs) < 2:
            raise UsageError("predict needs the model and at least one image or folder: defectscope predict "
                             "<run folder or exported model> <images or folders>... (see `defectscope predict --help`)")
        model, inputs = inputs[0], inputs[1:]
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"No model at '{path}': the path does not exist. The first argument of predict is "
                                "the model: a run folder such as results/<project>/<group>/<run_name> (written by "
                                "`defectscope train`), its models/<n> folder, or an exported .onnx / .xml file.")
    kind = _model_kind(path)
    if kind is None:
        from defectscope.data import IMAGE_EXTENSIONS

        looks = ""
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            looks = " (it is an image file)"
        elif path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
            looks = " (it is a folder of images)"
        raise UsageError(
            f"'{path}' is not a model{looks}: predict takes the model first, then the images. Expected a run folder "
            "(holding models/<n>/params.json, written by `defectscope train`), its models/<n> folder, or an "
            "exported model (.onnx / .xml file, or the folder `defectscope export` wrote). Fix: defectscope predict "
            "<model> <images or folders>..., or pass the model with --model-path."
        )
    from defectscope.deploy.outputs import image_files

    for item in map(Path, inputs):
        if not item.is_dir():
            continue
        if not args.recursive and _only_sub_folders(item):
            raise UsageError(f"'{item}' holds no images, only sub-folders. Fix: add --recursive to read them "
                             "(a folder with good/ and defect sub-folders then also gives the ground truth).")
        if next(iter(image_files([item], recursive=args.recursive)), None) is None:  # lazy: stops at the first
            raise UsageError(f"No images in the folder '{item}'. Fix: point predict at a folder that holds image "
                             "files (png, jpg, bmp, tif, ...), or at the files themselves.")
    return path, inputs, kind


def _only_sub_folders(folder: Path) -> bool:
    from defectscope.deploy.outputs import IMAGE_EXTENSIONS

    has_folder = False
    for entry in folder.iterdir():
        if entry.suffix.lower() in IMAGE_EXTENSIONS and not entry.is_dir():
            return False
        has_folder = has_folder or entry.is_dir()
    return has_folder


def _predict_batch_size(args) -> int:
    if args.batch_size:
        return args.batch_size
    if args.accelerator in ("gpu", "cuda") or args.accelerator == "auto" and _cuda_available():
        return PREDICT_BATCH_GPU
    return PREDICT_BATCH_CPU


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_predict(args) -> int:
    from defectscope.deploy.outputs import PredictionWriter, image_files, labels_from_csv, labels_from_layout

    model_path, inputs, kind = _predict_model_and_inputs(args)
    files = image_files(inputs, recursive=args.recursive)
    label_for = labels_from_csv(args.labels) if args.labels else labels_from_layout(inputs) if args.recursive else None
    options = dict(save_images=not args.no_images, save_masks=args.save_masks, save_maps=args.save_maps,
                   report=not args.no_report, report_images=args.report_images, label_for=label_for,
                   model_source=str(model_path))
    if kind == "exported":
        inferencer = _load_inferencer(model_path)
        threshold = float(inferencer.threshold) if args.threshold is None else args.threshold
        pixel = args.pixel_threshold if args.pixel_threshold is not None else getattr(inferencer, "pixel_threshold", None)
        writer = PredictionWriter(args.output, threshold, pixel, model_name=str(getattr(inferencer, "model_name", "")),
                                  **options)
        from defectscope.deploy.outputs import predict_files

        try:
            predict_files(inferencer, files, writer, batch_size=args.batch_size or PREDICT_BATCH_CPU)
        finally:
            summary = writer.close()
    else:
        from defectscope.engine import Engine
        from defectscope.models import load_model

        model = load_model(model_path, category=args.category)
        if args.wide_range is None and model.data_info.get("wide_range"):
            from defectscope.data import images

            images.WIDE_RANGE = model.data_info["wide_range"]  # read new images as the training images were
        threshold = float(model.threshold) if args.threshold is None else args.threshold
        pixel = args.pixel_threshold if args.pixel_threshold is not None else getattr(model, "pixel_threshold", None)
        engine = Engine(results_path=args.output, batch_size=_predict_batch_size(args), accelerator=args.accelerator,
                        progress=not args.no_progress, max_epochs=1)
        writer = PredictionWriter(args.output, threshold, pixel, model_name=model.name,
                                  map_range=(0.0, 1.0) if model.post_processor else None, **options)
        try:
            engine.predict(model, files, threshold=threshold, pixel_threshold=pixel, writer=writer,
                           return_results=False)
        finally:
            summary = writer.close()
    source = "given with --threshold" if args.threshold is not None else "the model's"
    wrote = ", ".join(str(p) for p in (summary["csv"], summary["regions"], summary["report"]) if p)
    print(f"{summary['n_scored']} images scored, {summary['n_defect']} at or above the threshold "
          f"{summary['threshold']:.4g} ({source}), {summary['n_skipped']} skipped; wrote {wrote}")
    metrics = summary["metrics"]
    if metrics is not None:
        print(f"ground truth for {metrics['n_labelled']} images: image AUROC {metrics['image_auroc']:.4f}, "
              f"false-reject rate {metrics['false_reject_rate']:.2%}, escape rate {metrics['escape_rate']:.2%}")
    return 0


def _load_inferencer(path: Path):
    """The torch-free inferencer of an exported model (defectscope.deploy.inferencer)."""
    try:
        from defectscope.deploy.inferencer import load_inferencer
    except ImportError as err:
        raise UsageError(f"'{path}' is an exported model, but this defectscope cannot run exported models yet "
                         f"({err}). Fix: predict with the run folder it was exported from.") from None
    return load_inferencer(path)


def _closest_options(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> str:
    """' (did you mean: --epohcs -> --epochs? ...)' for misspelt options of ``command``, else ''."""
    import difflib

    sub = next((a.choices.get(command) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return ""
    valid = [o for action in sub._actions for o in action.option_strings if o.startswith("--")]
    hints = []
    for item in extra:
        if item.startswith("--"):
            match = difflib.get_close_matches(item.split("=")[0], valid, n=1, cutoff=0.6)
            if match:
                hints.append(f"{item.split('=')[0]} -> {match[0]}")
    return f" (did you mean: {', '.join(hints)}? See `defectscope {command} --help`)" if hints else ""


COMMANDS = ("train", "test", "predict", "export", "serve", "simplenet", "distill-teacher")
# Exceptions that mean "this input cannot work" (exit status 2): UsageError, DataError and the weights
# errors are ValueError / FileNotFoundError subclasses; a path of the wrong kind or without permission too.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def package_version() -> str:
    """The installed distribution's version, else ``defectscope.__version__`` (a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("defectscope")
    except PackageNotFoundError:
        import defectscope

        return defectscope.__version__


def report_error(err: BaseException, debug: bool = False) -> int:
    """Print ``err`` as one ``error: ...`` statement on stderr (after the traceback with ``debug``);
    return the exit status: 2 for a usage or data error, 130 for Ctrl-C, 1 for anything unexpected."""
    if debug:
        import traceback

        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    if isinstance(err, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    if isinstance(err, EXPECTED_ERRORS):
        print(f"error: {err}", file=sys.stderr)
        return 2
    lines = str(err).strip().splitlines()
    message = f"{type(err).__name__}: {lines[0]}{' ...' if len(lines) > 1 else ''}" if lines else type(err).__name__
    if "out of memory" in str(err).lower():
        message += " (try a smaller --batch-size or --image-size)"
    hint = "" if debug else "; run again with --debug for the traceback"
    print(f"error: {message} (unexpected error{hint})", file=sys.stderr)
    return 1


def _raise_usage_errors(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` and its sub-command parsers raise :class:`UsageError` (printed by :func:`main`
    as one ``error:`` line naming the help to read) instead of printing usage and exiting."""
    parsers = [parser] + [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                          for p in a.choices.values()]
    for p in parsers:
        def error(message: str, prog: str = p.prog):
            raise UsageError(f"{message} (see `{prog} --help`)")

        p.error = error


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before any work, what the parser's ``type=`` checks cannot see: a device that is not
    there, a ``predict --output`` that is a file; and ``predict``'s own numbers."""
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise UsageError(f"argument --batch-size: expected an integer >= 1, got {args.batch_size}")
    accelerator = getattr(args, "accelerator", "auto")
    try:
        accelerator = args.accelerator = accelerator_option(accelerator)
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"argument --accelerator: {err}") from None
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            why = (f"this torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else
                   f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU: no device, no driver, "
                   "or CUDA_VISIBLE_DEVICES hides it")
            raise UsageError(f"--accelerator {accelerator}: no CUDA GPU is visible ({why}); "
                             "use --accelerator cpu (or auto)")
        devices = getattr(args, "devices", "1")
        if devices != "auto" and int(devices) > torch.cuda.device_count():
            raise UsageError(f"--devices {devices}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if accelerator == "mps":
        import torch

        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError("--accelerator mps: no Apple-silicon GPU (MPS) is available; use --accelerator cpu")
    if args.command == "predict":
        output = Path(args.output)
        existing = next((p for p in (output, *output.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "is" if existing == output else f"is inside {str(existing)!r}, which is"
            raise UsageError(f"--output {str(output)!r} {where} a file; predict writes a folder "
                             "(predictions.csv and images/): pass a folder path, e.g. --output predictions")


@contextlib.contextmanager
def image_settings(wide_range: str | None, max_pixels: int | None):
    """Apply ``--wide-range`` / ``--max-pixels`` to every image this command reads, and put the
    defaults back afterwards (main() may run several commands in one process)."""
    from defectscope.data import images

    before = images.WIDE_RANGE, images.MAX_PIXELS
    try:
        images.WIDE_RANGE = wide_range or before[0]
        images.MAX_PIXELS = max_pixels or before[1]
        yield
    finally:
        images.WIDE_RANGE, images.MAX_PIXELS = before


@contextlib.contextmanager
def notices_printed(torch_free: bool = False):
    """Print each :class:`~defectscope.data.images.DataNotice` (a conversion the data needed: a
    16-bit image read on its fixed range, an alpha channel dropped, ...) as one ``notice: ...``
    line on stderr instead of Python's warning format; other warnings pass through.
    ``torch_free``: take DataNotice from defectscope/data/images.py without importing
    defectscope.data (whose __init__ imports torch), as the torch-free inferencer reads images."""
    import warnings

    if torch_free:
        from defectscope.deploy.inferencer import _images_module

        DataNotice = _images_module().DataNotice
    else:
        from defectscope.data.images import DataNotice

    with warnings.catch_warnings():
        warnings.simplefilter("always", DataNotice)  # defectscope says each notice once itself
        # The models' own notices (a fallback backbone, no penalty images), also every time.
        warnings.filterwarnings("always", category=UserWarning, module=r"defectscope\.")
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DataNotice) or (
                issubclass(category, UserWarning) and category.__module__.startswith("defectscope")
            ):
                print(f"notice: {message}", file=sys.stderr, flush=True)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    """``defectscope ...``; returns the exit status: 0, 2 (usage or data error), 1 (unexpected
    error), 130 (interrupted). Errors print one ``error: ...`` statement, with the traceback only
    under ``--debug`` (accepted anywhere on the line)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv[:1] in (["--version"], ["-V"]):
            print(f"defectscope {package_version()}")
            return 0
        if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
            argv = ["train", *argv]  # no command: train (no arguments at all: the ELPV demo)
        if argv[0] not in COMMANDS and not argv[0].startswith("-"):
            import difflib

            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown command {argv[0]!r}{hint}; commands: {', '.join(COMMANDS)} "
                             "(see `defectscope --help`)")
        if argv[0] == "simplenet":
            from defectscope.cli_simplenet import main as simplenet_main

            return simplenet_main(argv[1:], debug=debug)
        if argv[0] == "serve":  # its own parser: serving an exported model never imports torch
            from defectscope.cli_serve import main as serve_main

            return serve_main(argv[1:])
        if argv[0] == "distill-teacher":
            from defectscope.cli_distill import main as distill_main

            with notices_printed():
                return distill_main(argv[1:])
        parser = build_parser()
        parser.add_argument("--version", "-V", action="version", version=f"%(prog)s {package_version()}")
        parser.add_argument("--debug", action="store_true", help="on an error, show the traceback too (any position)")
        _raise_usage_errors(parser)
        args, extra = parser.parse_known_args(argv)
        from defectscope.models import model_key

        # Only SimpleNet's train takes options beyond these (its model / augmentation options).
        if extra and not (args.command == "train" and model_key(args.model) == "simplenet"):
            hints = _closest_options(parser, args.command, extra) or f" (see `defectscope {args.command} --help`)"
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}{hints}")
        args.extra = extra
        if args.command is None:
            parser.print_help()
            return 2
        check_args(args)
        from defectscope.cli_export import cmd_export

        # ("serve" was handed to cli_serve.main above, with its own parser.)
        handlers = {"train": cmd_train, "test": cmd_test, "predict": cmd_predict, "export": cmd_export}
        with notices_printed(), image_settings(getattr(args, "wide_range", None), getattr(args, "max_pixels", None)):
            return handlers[args.command](args)
    except (Exception, KeyboardInterrupt) as err:
        return report_error(err, debug)
    finally:
        if "torch.distributed" in sys.modules:  # nothing to close before torch is imported
            _close_process_group()


def _close_process_group() -> None:
    """End a DDP run's process group: a gloo process that exits with its group still alive
    can abort at interpreter shutdown ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
