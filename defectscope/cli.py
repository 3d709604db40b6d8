"""Command line: ``defectscope train | test | predict``.

``defectscope train`` with no arguments is the demo: SuperSimpleNet on the packaged ELPV
solar-cell images (one model per cell type) with the packaged EfficientNet-Lite0 backbone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_EPOCHS = 3


class UsageError(ValueError):
    """A command line that cannot work; printed without a traceback, exit status 2."""


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
    g.add_argument("--test-split-ratio", type=float, default=0.2,
                   help="folder layout: share of good images held out for testing")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the ELPV / folder train-test split")
    g.add_argument("--train-defects", type=int, default=0,
                   help="ELPV: probability-1 cells per type added to training with image labels only "
                        "(weak supervision; drawn from a fixed pool of 50, so the test set stays the same)")
    g.add_argument("--train-defect-fraction", type=float, default=0.0,
                   help="MVTec / folder / synthetic: share of each defect type moved from test to training "
                        "(with masks where they exist)")
    g.add_argument("--train-abnormal-dir", default=None,
                   help="folder layout: labelled defective training images (masks from --mask-dir where they match)")


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--results-path", default="results", help="root of run folders")
    g.add_argument("--project", default="defectscope", help="run folder level 1")
    g.add_argument("--group", default=None, help="run folder level 2; None: the data set name")
    g.add_argument("--run-name", default=None, help="run folder level 3; None: a timestamp")
    g.add_argument("--batch-size", type=int, default=8, help="images per step (the paper: 32; 8 learns more per CPU-minute)")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed, same model on CPU)")
    g.add_argument("--accelerator", default="auto", help="cpu, gpu, auto (Lightning Fabric)")
    g.add_argument("--devices", default="1", help="number of devices or 'auto' (DDP when > 1)")
    g.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    g.add_argument("--num-nodes", type=int, default=1, help="machines (Lightning; with --strategy ddp)")
    g.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 16-mixed, bf16-mixed")
    g.add_argument("--num-workers", type=int, default=0, help="data-loading processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-images", action="store_true", help="do not write heat-map overlays")
    g.add_argument("--max-images", type=int, default=60,
                   help="overlays per category: the highest-scoring good, lowest- and highest-scoring defective "
                        "images (0: all)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="defectscope", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{train,test,predict,simplenet}")
    # Parsed by defectscope.cli_simplenet (main dispatches to it); listed here for --help.
    sub.add_parser("simplenet", add_help=False, help="SimpleNet, reference command form: simplenet [main options] "
                   "net [model options] dataset [data options] mvtec <data_path> <subdataset>...")

    train = sub.add_parser("train", help="train (and test) a model; no arguments: the ELPV demo", formatter_class=fmt)
    _add_data_options(train)
    m = train.add_argument_group("model")
    m.add_argument("--model", default="supersimplenet",
                   help="supersimplenet or simplenet (which also takes `defectscope simplenet` net/dataset options)")
    m.add_argument("--backbone", default="efficientnet_lite0",
                   help="efficientnet_lite0/1/2 (packaged), resnet18, wide_resnet50_2 (need --weights or a local cache)")
    m.add_argument("--layers", nargs="+", default=None, help="backbone layers; None: the backbone's own")
    m.add_argument("--weights", default=None, help="backbone weights file (.pth/.safetensors)")
    m.add_argument("--image-size", type=int, default=256, help="images are resized to this square size")
    m.add_argument("--perlin-threshold", type=float, default=0.2, help="Perlin noise threshold for synthetic anomalies")
    m.add_argument("--noise-std", type=float, default=None,
                   help="synthetic feature-noise std in units of each channel's std; None: the model's (1.0)")
    m.add_argument("--adapt-cls-features", action="store_true", help="ICPR variant (default: JIMS)")
    m.add_argument("--image-score", choices=["auto", "classifier", "map_max", "mean"], default="auto",
                   help="image score: the classification head, the anomaly map's maximum, or their mean; auto: "
                        "map_max when trained unsupervised, mean when trained with labelled defects")
    m.add_argument("--adaptor-init", choices=["orthogonal", "xavier"], default="orthogonal",
                   help="SuperSimpleNet adaptor's starting weights (xavier: the reference's; orthogonal keeps "
                        "every feature direction at the noise's scale)")
    m.add_argument("--regime", choices=["auto", "unsupervised", "weakly", "mixed", "supervised"], default="auto",
                   help="supervision regime; auto follows the training data (labelled defects with masks: "
                        "supervised, with image labels only: weakly, both: mixed, none: unsupervised)")
    m.add_argument("--upscale-factor", type=int, default=1,
                   help="feature map size as a multiple of the largest backbone map (reference: 2, 4x slower)")
    m.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="training epochs (the paper uses 300)")
    m.add_argument("--lr-scale", type=float, default=2.0, help="multiplies the reference learning rates")
    m.add_argument("--no-test", action="store_true", help="train only")
    m.add_argument("--no-resume", action="store_true", help="start again even if the run folder has a checkpoint")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the trainable heads (needs a C++ compiler on CPU). On CPU SuperSimpleNet's "
                        "fused map head is already faster: no gain there (0.99-1.02x per step)")
    _add_engine_options(train)

    test = sub.add_parser("test", help="evaluate a trained run on a test split", formatter_class=fmt)
    test.add_argument("--model-path", required=True, help="run folder (or its models/<n> folder)")
    _add_data_options(test)
    _add_engine_options(test)

    predict = sub.add_parser("predict", help="score images: folder or files in, CSV and overlays out", formatter_class=fmt)
    predict.add_argument("inputs", nargs="+", help="image files or folders")
    predict.add_argument("--model-path", required=True, help="run folder (or its models/<n> folder)")
    predict.add_argument("--output", default="predictions", help="folder for predictions.csv and images/")
    predict.add_argument("--batch-size", type=int, default=32, help="images per batch")
    predict.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    predict.add_argument("--no-progress", action="store_true", help="no progress bars")
    predict.add_argument("--no-images", action="store_true", help="do not write heat-map overlays")
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


def _engine(args, run_name=None, results_path=None, project=None, group=None, epochs=1):
    from defectscope.engine import Engine

    devices = args.devices if args.devices == "auto" else int(args.devices)
    return Engine(
        results_path=results_path or args.results_path, project=project or args.project,
        group=group or args.group or args.data, run_name=run_name or args.run_name, max_epochs=epochs,
        batch_size=args.batch_size, seed=args.seed, accelerator=args.accelerator, devices=devices,
        strategy=args.strategy, precision=args.precision, num_nodes=args.num_nodes, num_workers=args.num_workers,
        progress=not args.no_progress, resume=not getattr(args, "no_resume", False),
        compile_heads=getattr(args, "compile", False),
    )


def _print_metrics(rows: list[dict], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Results ({run_dir})")
    for col in ["category", "image AUROC", "pixel AUROC", "AUPRO", "F1-max", "threshold", "test images"]:
        table.add_column(col)
    for r in rows:
        f = lambda v: "n/a" if v != v else f"{v:.3f}"  # noqa: E731 (NaN-aware)
        table.add_row(r["category"], f(r["image_auroc"]), f(r["pixel_auroc"]), f(r["aupro"]),
                      f(r["image_f1_max"]), f(r["image_threshold"]), str(r["n_test"]))
    console = Console()
    console.print(table)
    for r in rows:
        for note in r["notes"]:
            console.print(f"[yellow]note[/] ({r['category']}): {note}")


def _merge_notes(split_notes: list[str], metric_notes: list[str]) -> list[str]:
    """The split's notes, then the metrics' notes that say something new."""
    pixel_explained = any("pixel AUROC" in n for n in split_notes)
    return list(split_notes) + [n for n in metric_notes if not (pixel_explained and n.startswith("pixel AUROC and AUPRO need"))]


def cmd_train(args) -> int:
    import torch

    from defectscope.models import create_model, model_key

    if model_key(args.model) == "simplenet":
        from defectscope.cli_simplenet import train_from_args

        return train_from_args(args)

    from defectscope.data import summarise

    started = time.time()
    splits = _splits(args)
    run_name = args.run_name or time.strftime("%Y%m%d-%H%M%S")
    rows, run_dir = [], None
    for index, (category, split) in enumerate(splits):
        torch.manual_seed(args.seed)  # the heads' initial weights, so --seed fixes the whole model
        kwargs = dict(backbone=args.backbone, layers=args.layers, weights=args.weights, image_size=args.image_size,
                      perlin_threshold=args.perlin_threshold, adapt_cls_features=args.adapt_cls_features,
                      upscale_factor=args.upscale_factor, lr_scale=args.lr_scale, visualizer=not args.no_images)
        if model_key(args.model) == "supersimplenet":
            kwargs["image_score"] = args.image_score
            kwargs["adaptor_init"] = args.adaptor_init
        if args.noise_std is not None:
            kwargs["noise_std"] = args.noise_std
        model = create_model(args.model, **kwargs)
        engine = _engine(args, run_name=run_name, epochs=args.epochs)
        engine.model_index = index
        run_dir = engine.run_dir
        print(f"[{category}] {summarise(split)}")
        engine.fit(model, split.train, regime=args.regime)
        if not args.no_test:
            metrics = engine.test(model, split.test, category=category, max_images=args.max_images or None)
            metrics["notes"] = _merge_notes(split.notes, metrics["notes"])
            rows.append(metrics)
    if rows:
        _print_metrics(rows, run_dir)
    print(f"Run folder: {run_dir}  ({time.time() - started:.0f} s)")
    return 0


def cmd_test(args) -> int:
    from defectscope.models import find_model_dir, load_model

    model_dir = find_model_dir(args.model_path)
    run_dir = model_dir.parent.parent
    rows = []
    for index, (category, split) in enumerate(_splits(args)):
        folder = run_dir / "models" / str(index)
        if not (folder / "ckpt.pth").is_file():
            folder = model_dir
        model = load_model(folder)
        engine = _engine(args, results_path=run_dir.parent.parent.parent, project=run_dir.parent.parent.name,
                         group=run_dir.parent.name, run_name=run_dir.name)
        engine.model_index = int(folder.name)
        metrics = engine.test(model, split.test, category=category, save_images=not args.no_images,
                              max_images=args.max_images or None)
        metrics["notes"] = _merge_notes(split.notes, metrics["notes"])
        rows.append(metrics)
    _print_metrics(rows, run_dir)
    return 0


def cmd_predict(args) -> int:
    from defectscope.data import list_images
    from defectscope.engine import Engine
    from defectscope.models import load_model

    paths = []
    for item in args.inputs:
        paths.extend(list_images(item) if Path(item).is_dir() else [Path(item)])
    model = load_model(args.model_path)
    engine = Engine(results_path=args.output, batch_size=args.batch_size, accelerator=args.accelerator,
                    progress=not args.no_progress, max_epochs=1)
    results = engine.predict(model, paths, output_dir=args.output, save_images=not args.no_images)
    n_defect = sum(r["is_defect"] for r in results)
    print(f"{len(results)} images scored, {n_defect} above the threshold {float(model.threshold):.3f}; "
          f"wrote {Path(args.output) / 'predictions.csv'}")
    return 0


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]  # no command: train (no arguments at all: the ELPV demo)
    if argv[0] == "simplenet":
        from defectscope.cli_simplenet import main as simplenet_main

        return simplenet_main(argv[1:])
    args, extra = parser.parse_known_args(argv)
    from defectscope.models import model_key

    # Only SimpleNet's train takes options beyond these (its model / augmentation options).
    if extra and not (args.command == "train" and model_key(args.model) == "simplenet"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}{_closest_options(parser, args.command, extra)}")
    args.extra = extra
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"train": cmd_train, "test": cmd_test, "predict": cmd_predict}
    from defectscope.backbones import WeightsNotFoundError
    from defectscope.data import DataError

    try:
        return handlers[args.command](args)
    except (DataError, WeightsNotFoundError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """End a DDP run's process group: a gloo process that exits with its group still alive
    can abort at interpreter shutdown ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
