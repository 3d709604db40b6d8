"""``defectscope simplenet``: SimpleNet with the reference's command form.

    defectscope simplenet [main options] net [model options] dataset [data options] \\
        mvtec <data_path> <subdataset>...

Options are spelt as in the reference (``--log_group``; ``--log-group`` works too), with its
defaults. ``defectscope train --model simplenet ...`` reaches the same code (:func:`run`):
there the usual options apply and any model or augmentation option of this command may
follow (``--dsc_margin 0.5 --augment --hflip 0.5``). Unknown or misspelt options are
refused with the closest valid name.

Each subdataset trains one model, ``<results_path>/<log_project>/<log_group>/<run_name>/
models/<i>/{ckpt.pth,params.pkl}``, with ``tensorboard/`` curves and one ``results.csv`` row
per subdataset plus their mean.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from defectscope.cli import SEED, UsageError, _merge_notes, _print_metrics, notices_printed, number, report_error

USAGE = ("defectscope simplenet [main options] net [model options] dataset [data options] "
         "mvtec <data_path> <subdataset>...")
DATASET_NAMES = ("mvtec",)
# Backbone names of the reference's backbones.py -> defectscope names.
BACKBONE_ALIASES = {"wideresnet50": "wide_resnet50_2", "resnet18": "resnet18"}
OFFLINE_BACKBONE = "efficientnet_lite0"


def _flag(name: str) -> list[str]:
    """``--log_group`` and ``--log-group``."""
    dashed = name.replace("_", "-")
    return [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])


def _add(parser, name, short=None, **kwargs):
    parser.add_argument(*([short] if short else []), *_flag(name), dest=name, **kwargs)


class _Parser(argparse.ArgumentParser):
    """Parse errors (a bad value, a missing positional) raise :class:`UsageError`: one ``error:`` line."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, allow_abbrev=False,
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


# Value checks (argparse ``type=``): nan / inf and out-of-range numbers are refused as they are parsed.
_POSITIVE_INT, _COUNT = number(int, 1), number(int, 0)
_POSITIVE, _NON_NEGATIVE = number(float, 0, low_open=True), number(float, 0)
_PROBABILITY = number(float, 0, 1)
_IMAGE_SIDE = number(int, 32, note="the models' smallest size")


def main_parser() -> argparse.ArgumentParser:
    p = _parser("defectscope simplenet", f"SimpleNet, reference command form. Usage: {USAGE}")
    _add(p, "results_path", default="results", help="root of run folders")
    _add(p, "gpu", type=int, action="append", default=None,
         help="GPU id (repeatable; the first is used); CPU, with a notice, when there is no GPU. Default: 0")
    _add(p, "seed", type=SEED, default=0, help="random seed")
    _add(p, "log_group", default="group", help="run folder level 2")
    _add(p, "log_project", default="project", help="run folder level 1")
    _add(p, "run_name", default="test", help="run folder level 3")
    _add(p, "test", action="store_true", help="evaluate the run's trained models instead of training")
    _add(p, "save_segmentation_images", action="store_true", help="write heat-map overlays under images/")
    _add(p, "no_progress", action="store_true", help="no progress bars (defectscope addition)")
    return p


def _add_model_options(p) -> None:
    _add(p, "pretrain_embed_dimension", type=_POSITIVE_INT, default=384,
         help="values per layer after pooling a patch (reference: 1024; 1536 with WideResNet-50)")
    _add(p, "target_embed_dimension", type=_POSITIVE_INT, default=384,
         help="values per patch after pooling all layers (reference: 1024; 1536 with WideResNet-50)")
    _add(p, "patchsize", type=_POSITIVE_INT, default=3, help="neighbourhood aggregated around every position")
    _add(p, "embedding_size", type=_POSITIVE_INT, default=None,
         help="projection output width (with --pre_proj > 0); default: target_embed_dimension (reference: 1024)")
    _add(p, "meta_epochs", type=_POSITIVE_INT, default=1, help="meta-epochs (x gan_epochs passes over the data)")
    _add(p, "aed_meta_epochs", type=_COUNT, default=1, help="meta-epochs left out of the cosine period")
    _add(p, "gan_epochs", type=_POSITIVE_INT, default=1, help="discriminator epochs per meta-epoch")
    _add(p, "dsc_layers", type=_POSITIVE_INT, default=2, help="discriminator layers")
    _add(p, "dsc_hidden", type=_POSITIVE_INT, default=None, help="discriminator width (None: shrinking by 1.5)")
    _add(p, "noise_std", type=_POSITIVE, default=None,
         help="feature noise std. Default: 1.0, in units of each channel's feature std (features standardised); "
              "with --absolute_noise, the reference's 0.05 in absolute feature units. The reference's 0.05 in "
              "feature-std units is too little noise (benchmarks/results/simplenet.md)")
    _add(p, "dsc_margin", type=_NON_NEGATIVE, default=0.8, help="truncated-L1 margin")
    _add(p, "dsc_lr", type=_POSITIVE, default=0.0002, help="discriminator learning rate")
    _add(p, "auto_noise", type=_NON_NEGATIVE, default=0, help="> 0: noise std = this x the batch's feature std")
    _add(p, "train_backbone", action="store_true", help="train the backbone too")
    _add(p, "cos_lr", action="store_true", help="cosine schedule of the discriminator learning rate")
    _add(p, "pre_proj", type=_COUNT, default=0, help="projection layers (0: none)")
    _add(p, "proj_layer_type", type=int, choices=[0, 1, 2], default=0, help="between projection layers: 0 none, 1 BatchNorm, 2 LeakyReLU")
    _add(p, "mix_noise", type=_POSITIVE_INT, default=1, help="noise levels noise_std * 1.1**k")
    _add(p, "weights", default=None, help="backbone weights file, e.g. wide_resnet50_2-95faca4d.pth (defectscope addition)")
    _add(p, "absolute_noise", action="store_true",
         help="noise_std in absolute feature units (features not standardised), default 0.05, as the reference "
              "(defectscope addition)")


def _add_augment_options(p) -> None:
    _add(p, "rotate_degrees", type=number(float, 0, 180), default=0, help="random rotation range (degrees)")
    _add(p, "translate", type=_PROBABILITY, default=0, help="random translation, fraction of the size")
    _add(p, "scale", type=number(float, 0, 1, high_open=True), default=0.0, help="random scaling range 1 +- scale")
    _add(p, "brightness", type=_NON_NEGATIVE, default=0.0, help="colour jitter: brightness")
    _add(p, "contrast", type=_NON_NEGATIVE, default=0.0, help="colour jitter: contrast")
    _add(p, "saturation", type=_NON_NEGATIVE, default=0.0, help="colour jitter: saturation")
    _add(p, "gray", type=_PROBABILITY, default=0.0, help="probability of greyscale")
    _add(p, "hflip", type=_PROBABILITY, default=0.0, help="probability of a horizontal flip")
    _add(p, "vflip", type=_PROBABILITY, default=0.0, help="probability of a vertical flip")
    _add(p, "augment", action="store_true", help="augment the training images with the settings above")


def net_parser() -> argparse.ArgumentParser:
    p = _parser("defectscope simplenet ... net", "SimpleNet model options.")
    _add(p, "backbone_names", "-b", action="append", default=None,
         help=f"backbone (one; wideresnet50 = wide_resnet50_2; none: the packaged {OFFLINE_BACKBONE})")
    _add(p, "layers_to_extract_from", "-le", action="append", default=None,
         help="backbone layer (repeatable; none: the backbone's own)")
    _add_model_options(p)
    return p


def dataset_parser() -> argparse.ArgumentParser:
    p = _parser("defectscope simplenet ... dataset", "Data options, then: mvtec <data_path> <subdataset>...")
    p.add_argument("name", help="data set layout: mvtec")
    p.add_argument("data_path", help="MVTec-layout root folder")
    p.add_argument("subdataset", nargs="*", help="categories, one model each")
    _add(p, "subdatasets", "-d", action="append", default=None, help="category (repeatable, as the reference)")
    _add(p, "train_val_split", type=number(float, 0, 1, low_open=True), default=1.0, help="share of training images to train on (only 1)")
    _add(p, "batch_size", type=_POSITIVE_INT, default=2, help="images per step")
    _add(p, "num_workers", type=_COUNT, default=2, help="data-loading processes")
    _add(p, "resize", type=_IMAGE_SIDE, default=256, help="images are resized to this square size")
    _add(p, "imagesize", type=_IMAGE_SIDE, default=224, help="then centre-cropped to this size")
    _add_augment_options(p)
    return p


SECTIONS = {"main": main_parser, "net": net_parser, "dataset": dataset_parser}


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def _takes_value(parser: argparse.ArgumentParser, token: str) -> bool:
    action = parser._option_string_actions.get(token.split("=", 1)[0])
    return action is not None and action.nargs != 0 and "=" not in token


def unknown_option_error(token: str, section: str, candidates: list[str], others: dict[str, list[str]]) -> UsageError:
    """'Unknown option' with the closest valid name, and where it belongs if elsewhere."""
    option = token.split("=", 1)[0]
    key = option.lstrip("-").replace("-", "_")
    for other, names in others.items():
        if f"--{key}" in names:
            return UsageError(f"{option} is a '{other}' option, not a '{section}' one: put it after '{other}'. "
                              f"Usage: {USAGE}")
    # Suggest in the user's own spelling (--log_group or --log-group) when both exist.
    style = sorted(candidates, key=lambda c: ("_" in c) != ("_" in option))
    normalised: dict[str, str] = {}
    for c in style:
        normalised.setdefault(c.lstrip("-").replace("-", "_"), c)
    close = difflib.get_close_matches(key, list(normalised), n=1, cutoff=0.6)
    hint = f" Did you mean {normalised[close[0]]}?" if close else ""
    where = {"main": "defectscope simplenet --help", "train": "defectscope train --help"}.get(
        section, f"defectscope simplenet ... {section} --help")
    return UsageError(f"unknown {section} option {option}.{hint} See `{where}`.")


def split_sections(argv: list[str]) -> dict[str, list[str]]:
    """``[main...] net [net...] dataset [data...]`` -> tokens per section."""
    parsers = {name: make() for name, make in SECTIONS.items()}
    sections: dict[str, list[str]] = {"main": []}
    current, expect_value = "main", False
    for token in argv:
        if not expect_value and token in ("net", "dataset") and token not in sections:
            if token == "dataset" and "net" not in sections and current == "main":
                sections["net"] = []  # net with all defaults may be left out
            current = token
            sections[current] = []
            continue
        sections[current].append(token)
        expect_value = token.startswith("-") and _takes_value(parsers[current], token)
    if "dataset" not in sections:
        stray = [t for t in sections[current] if not t.startswith("-")]
        close = difflib.get_close_matches(stray[0], ["net", "dataset"], n=1) if stray else []
        hint = f" ('{stray[0]}': did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"missing the 'dataset' part{hint}. Usage: {USAGE}")
    return sections


def parse(argv: list[str]) -> dict[str, argparse.Namespace]:
    """Parse the three parts; unknown options raise :class:`UsageError` naming the closest one."""
    if not argv or "-h" in argv or "--help" in argv:
        # The help of the part the flag stands in: main, net or dataset.
        first_help = next((i for i, t in enumerate(argv) if t in ("-h", "--help")), 0)
        part = ([t for t in argv[:first_help] if t in ("net", "dataset")] or ["main"])[-1]
        SECTIONS[part]().print_help()
        raise SystemExit(0)
    sections = split_sections(argv)
    parsers = {name: SECTIONS[name]() for name in sections}
    names = {name: _option_names(p) for name, p in parsers.items()}
    parsed = {}
    for name, tokens in sections.items():
        args, unknown = parsers[name].parse_known_args(tokens)
        if unknown:
            bad = next((t for t in unknown if t.startswith("-")), None)
            if bad is None:
                close = difflib.get_close_matches(unknown[0], ["net", "dataset"], n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise UsageError(f"unexpected {' '.join(unknown)!r} in the '{name}' part.{hint} Usage: {USAGE}")
            others = {o: n for o, n in names.items() if o != name}
            raise unknown_option_error(bad, name, names[name], others)
        parsed[name] = args
    return parsed


# ---- from parsed options to a run ----------------------------------------------------------
def model_kwargs(net: argparse.Namespace, data: argparse.Namespace) -> dict:
    """SimpleNet constructor arguments from the net and dataset parts."""
    names = list(net.backbone_names or [])
    if len(names) > 1:
        raise UsageError(f"one backbone per run, got {names}: run once per backbone (different --run_name).")
    backbone = names[0] if names else OFFLINE_BACKBONE
    if not names:
        print(f"notice: no -b/--backbone_names given: using the packaged {OFFLINE_BACKBONE}")
    if ".seed-" in backbone:  # reference syntax: a backbone with its own seed
        backbone = backbone.split(".seed-")[0]
    backbone = BACKBONE_ALIASES.get(backbone, backbone)
    if net.pre_proj == 0 and net.embedding_size not in (None, net.target_embed_dimension):
        print("notice: embedding_size is the projection's width and applies only with --pre_proj > 0")
    kwargs = dict(backbone=backbone, layers_to_extract_from=net.layers_to_extract_from, weights=net.weights,
                  standardize_features=not net.absolute_noise)
    for key in ("pretrain_embed_dimension", "target_embed_dimension", "patchsize", "embedding_size", "meta_epochs",
                "aed_meta_epochs", "gan_epochs", "dsc_layers", "dsc_hidden", "noise_std", "dsc_margin", "dsc_lr",
                "auto_noise", "train_backbone", "cos_lr", "pre_proj", "proj_layer_type", "mix_noise"):
        kwargs[key] = getattr(net, key)
    for key in ("resize", "imagesize", "rotate_degrees", "translate", "scale", "brightness", "contrast",
                "saturation", "gray", "hflip", "vflip", "augment"):
        kwargs[key] = getattr(data, key)
    strengths = [k for k in ("rotate_degrees", "translate", "scale", "brightness", "contrast", "saturation", "gray",
                             "hflip", "vflip") if kwargs[k]]
    if strengths and not kwargs["augment"]:
        print(f"notice: {', '.join(strengths)} set without --augment: training images are not augmented")
    return kwargs


def device_options(gpu: list[int] | None) -> dict:
    """``--gpu`` ids -> Fabric accelerator / devices; CPU with a notice when there is no GPU."""
    import torch

    gpu = [0] if gpu is None else gpu
    if not gpu or min(gpu) < 0:
        return dict(accelerator="cpu", devices=1)
    if not torch.cuda.is_available():
        print(f"notice: --gpu {gpu[0]} asked for, but no GPU is available: running on CPU")
        return dict(accelerator="cpu", devices=1)
    count = torch.cuda.device_count()
    if gpu[0] >= count:
        raise UsageError(f"--gpu {gpu[0]}: this machine has {count} GPU(s), ids 0..{count - 1}.")
    if len(gpu) > 1:
        print(f"notice: several --gpu ids given; training on GPU {gpu[0]} (as the reference)")
    return dict(accelerator="cuda", devices=[gpu[0]])


def mvtec_splits(data: argparse.Namespace) -> list[tuple[str, object]]:
    from defectscope import data as d

    if data.name not in DATASET_NAMES:
        close = difflib.get_close_matches(data.name, DATASET_NAMES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"unknown data set '{data.name}'.{hint} Available: {', '.join(DATASET_NAMES)}.")
    if data.train_val_split != 1:
        raise UsageError("--train_val_split below 1 is not supported: every training image trains the model.")
    subdatasets = list(data.subdataset) + list(data.subdatasets or [])
    if not subdatasets:
        raise UsageError(f"no subdataset given (e.g. bottle). Usage: {USAGE}")
    if not Path(data.data_path).is_dir():
        raise UsageError(f"data path '{data.data_path}' is not a folder.")
    return [(name, d.mvtec_split(data.data_path, name)) for name in subdatasets]


def run(kwargs: dict, splits: list, engine_options: dict, *, seed: int = 0, test_only: bool = False,
        evaluate: bool = True, save_images: bool = False, max_images: int | None = None,
        data: dict | None = None, roi: str | None = None, roi_dir: str | None = None,
        meta_epochs_for=None) -> list[dict]:
    """Train (or with ``test_only`` load) one SimpleNet per split, test it, print the results.
    ``data``: the data settings recorded in run.json and with each model (see cli.data_settings).
    ``meta_epochs_for``: None (``kwargs`` says), or a function of the number of training images
    giving each split its own ``meta_epochs`` (``train``'s default: a minimum of optimizer steps)."""
    import torch

    from defectscope.cli import _check_test_images, write_run_file
    from defectscope.data import summarise
    from defectscope.engine import Engine
    from defectscope.models import SimpleNet, find_model_dir

    data = dict(data or {})
    rows, run_dir, models = [], None, {}
    if evaluate and not test_only:
        probe = SimpleNet(**kwargs)
        for _, split in splits:  # a bad test file is found before any training time is spent
            _check_test_images(probe, split)
    for index, (category, split) in enumerate(splits):
        torch.manual_seed(seed)  # initial weights, so --seed fixes the whole model
        split_kwargs = dict(kwargs)
        if meta_epochs_for is not None and not test_only:
            split_kwargs["meta_epochs"] = meta_epochs_for(len(split.train))
        model = SimpleNet(**split_kwargs)
        engine = Engine(max_epochs=model.epochs, seed=seed, data_info={**data, "category": category},
                        **engine_options)
        engine.model_index = index
        run_dir = engine.run_dir
        print(f"[{category}] {summarise(split)}")
        if test_only:
            try:
                model = SimpleNet.load_from_path(find_model_dir(engine.model_dir), weights=kwargs.get("weights"))
            except FileNotFoundError as err:
                raise UsageError(f"--test: {err}") from None
        else:
            if roi is not None or roi_dir is not None:  # train --roi / --roi-dir (data/roi.py)
                from defectscope.data.roi import configure_roi

                engine.image_rois = configure_roi(model, roi, roi_dir, split.train)
            engine.fit(model, split.train)
            models[str(index)] = category
            if engine.fabric.is_global_zero:
                write_run_file(run_dir, data, models, model.name)
        if evaluate:
            metrics = engine.test(model, split.test, category=category, save_images=save_images,
                                  max_images=max_images, data_name=data.get("data"))
            metrics["notes"] = _merge_notes(split.notes, metrics["notes"])
            rows.append(metrics)
    if rows:
        _print_metrics(rows, run_dir)
    print(f"Run folder: {run_dir}")
    return rows


def main(argv: list[str], debug: bool = False) -> int:
    """``defectscope simplenet ...``; returns the exit status (2: usage or data error, 1: unexpected
    error, 130: interrupted), each error printed as one ``error:`` line (the traceback too with
    ``debug`` or ``--debug`` anywhere in ``argv``)."""
    argv = [str(a) for a in argv]
    debug = debug or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        parsed = parse(argv)
        m, net, data = parsed["main"], parsed["net"], parsed["dataset"]
        kwargs = model_kwargs(net, data)
        splits = mvtec_splits(data)
        engine_options = dict(results_path=m.results_path, project=m.log_project, group=m.log_group,
                              run_name=m.run_name, batch_size=data.batch_size, num_workers=data.num_workers,
                              progress=not m.no_progress, resume=False, **device_options(m.gpu))
        subdatasets = [name for name, _ in splits]
        data_record = {"data": "mvtec", "data_path": str(Path(data.data_path).resolve()), "category": subdatasets,
                       "split_seed": 0, "train_defect_fraction": 0.0}
        with notices_printed():
            run(kwargs, splits, engine_options, seed=m.seed, test_only=m.test,
                save_images=m.save_segmentation_images, data=data_record)
    except (Exception, KeyboardInterrupt) as err:
        return report_error(err, debug)
    return 0


# ---- `defectscope train --model simplenet` ------------------------------------------------
# train options with no meaning for SimpleNet, and their defaults (a changed one gets a notice).
_IGNORED_TRAIN_OPTIONS = {"perlin_threshold": 0.2, "adapt_cls_features": False, "upscale_factor": 1, "lr_scale": 2.0}


def train_from_args(args) -> int:
    """``defectscope train --model simplenet``: the usual options, plus any SimpleNet model or
    augmentation option (``args.extra``), then the same :func:`run` as ``defectscope simplenet``."""
    from defectscope.cli import _splits

    extra_parser = _parser("defectscope train --model simplenet", "SimpleNet options for `train`.")
    _add_model_options(extra_parser)
    _add_augment_options(extra_parser)
    _add(extra_parser, "resize", type=_IMAGE_SIDE, default=None, help="resize (default: --image-size)")
    _add(extra_parser, "imagesize", type=_IMAGE_SIDE, default=None, help="centre crop (default: --image-size)")
    extras, unknown = extra_parser.parse_known_args(getattr(args, "extra", []))
    if unknown:
        bad = next((t for t in unknown if t.startswith("-")), unknown[0])
        from defectscope.cli import build_parser

        train_names = _option_names(build_parser()._subparsers._group_actions[0].choices["train"])
        raise unknown_option_error(bad, "train", train_names + _option_names(extra_parser), {})
    for key, default in _IGNORED_TRAIN_OPTIONS.items():
        if getattr(args, key) != default:
            print(f"notice: --{key.replace('_', '-')} does not apply to simplenet; ignored")
    if args.noise_std is not None:
        extras.noise_std = args.noise_std
    meta_epochs_for = None
    if "--meta_epochs" not in args.extra and "--meta-epochs" not in args.extra:
        if args.epochs is not None:
            extras.meta_epochs = args.epochs
        else:  # SimpleNet's default_epochs, raised to its min_default_steps on small training sets
            from defectscope.cli import default_epochs
            from defectscope.models import SimpleNet

            gan_epochs = max(1, extras.gan_epochs)
            meta_epochs_for = lambda n_train: -(-default_epochs(SimpleNet, n_train, args) // gan_epochs)  # noqa: E731
    extras.resize = extras.resize or args.image_size
    extras.imagesize = extras.imagesize or min(args.image_size, extras.resize)
    extras.backbone_names = [args.backbone or "efficientnet_lite0"]
    extras.layers_to_extract_from = args.layers
    if args.weights:
        extras.weights = args.weights
    kwargs = model_kwargs(extras, extras)
    kwargs["visualizer"] = not args.no_images
    devices = args.devices if args.devices == "auto" else int(args.devices)
    import time

    engine_options = dict(results_path=args.results_path, project=args.project, group=args.group or args.data,
                          run_name=args.run_name or time.strftime("%Y%m%d-%H%M%S"), batch_size=args.batch_size or 8,
                          num_workers=args.num_workers, progress=not args.no_progress,
                          resume=not args.no_resume, accelerator=args.accelerator, devices=devices,
                          strategy=args.strategy, precision=args.precision)
    engine_options.update(val_fraction=args.val_fraction, threshold_rule=args.threshold_rule,
                          max_false_reject=args.max_false_reject)
    from defectscope.cli import data_settings

    run(kwargs, _splits(args), engine_options, seed=args.seed, evaluate=not args.no_test,
        save_images=not args.no_images, max_images=args.max_images or None, data=data_settings(args),
        roi=getattr(args, "roi", None), roi_dir=getattr(args, "roi_dir", None), meta_epochs_for=meta_epochs_for)
    return 0
