"""``defectscope distill-teacher``: make an EfficientAD teacher file offline.

    defectscope distill-teacher --model-size s --output teacher_s.pth
    defectscope train --model efficientad --teacher-weights teacher_s.pth ...

See :mod:`defectscope.engine.distill` for what is distilled and how.
"""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Distil an EfficientAD teacher (a PDN-S or PDN-M) from the packaged EfficientNet-Lite0, the way
the paper distils its teachers from WideResNet-101 on ImageNet, and write a file that
`defectscope train --model efficientad --teacher-weights FILE` (Python:
EfficientAd(teacher_weights=FILE)) loads. The file records how it was made (backbone, images,
steps, seed, final loss).

Images: --images DIR (any folder of natural images, searched with its sub-folders: ImageNet's
train folder, Imagenette, ...), or by default random crops of the 19 sample pictures packaged with
scikit-image (offline, no download; a narrow set, so the teacher knows fewer kinds of texture than
one distilled on ImageNet).

Cost: PDN-S costs about 110 GFLOP per 256-px image and step, a quarter of that at 128 px. The
defaults (2,000 steps of one 128-px image) take about 15 minutes on 2 CPU cores and a few minutes
on a GPU, and buy a usable but weak teacher: 1,300 such steps (10.5 minutes) brought the loss from
1.16 to 0.65 (1.0 = predicting each channel's mean). The paper's teacher saw about 2,000 times as
many pixels, so prefer the official PDN files where you can get them (nelson1425/EfficientAD
models/teacher_small.pth, teacher_medium.pth; anomalib's pretrained_teacher_small.pth). A killed
run continues from its checkpoint (OUTPUT.partial.ckpt, written every --checkpoint-every steps)
when started again with the same settings.
"""


def build_parser() -> argparse.ArgumentParser:
    from defectscope.cli import SEED, accelerator_option, number

    p = argparse.ArgumentParser(prog="defectscope distill-teacher", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", type=str.lower, choices=["s", "m"], default="s",
                   help="PDN-S (EfficientAD-S) or PDN-M (EfficientAD-M)")
    p.add_argument("--output", required=True, help="teacher file to write, e.g. teacher_s.pth")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="folder of natural images (sub-folders searched); default: crops of scikit-image's samples")
    p.add_argument("--steps", type=number(int, 1), default=2000, help="optimisation steps")
    p.add_argument("--batch-size", type=number(int, 1), default=1, help="images per step")
    p.add_argument("--image-size", type=number(int, 32), default=128,
                   help="PDN input size in pixels (the backbone sees twice this); the paper: 256")
    p.add_argument("--seed", type=SEED, default=0, help="seeds the PDN's start and every batch's images")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUTPUT.partial.ckpt when it exists (--no-resume starts again)")
    p.add_argument("--checkpoint-every", type=number(int, 1), default=200, help="steps between checkpoints")
    p.add_argument("--accelerator", type=accelerator_option, default="auto", help="auto, cpu, gpu, cuda or mps")
    p.add_argument("--num-workers", type=number(int, 0), default=0, help="processes preparing the images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    """Run ``distill-teacher`` with ``argv`` (the words after the command); returns the exit status.
    A bad option raises :class:`defectscope.cli.UsageError`; ``--help`` prints the help and returns 0."""
    from defectscope.cli import _raise_usage_errors

    parser = build_parser()
    _raise_usage_errors(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help
        return int(stop.code or 0)
    from defectscope.engine.distill import describe, distill_teacher

    meta = distill_teacher(
        args.output, model_size=args.model_size, images=args.images, steps=args.steps, batch_size=args.batch_size,
        image_size=args.image_size, seed=args.seed, resume=args.resume, checkpoint_every=args.checkpoint_every,
        accelerator=args.accelerator, num_workers=args.num_workers, progress=not args.no_progress,
    )
    print(describe(meta))
    print(f"Wrote {args.output}. Use it: defectscope train --model efficientad --model-size {args.model_size} "
          f"--teacher-weights {args.output} (Python: EfficientAd(teacher_weights={str(args.output)!r}))")
    return 0
