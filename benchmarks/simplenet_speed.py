"""SimpleNet's training epoch against SuperSimpleNet's, on the same machine in the same run.

Run by hand (not in CI):

    python benchmarks/simplenet_speed.py [--reps 5] [--steps 6] [--threads 2]

An epoch here is what the engine runs once the frozen backbone's features are cached (no
augmentation, frozen backbone: both models' defaults): ``--steps`` training steps (forward,
backward, AdamW step) of batch 8 on pre-extracted features of 256x256 images (48 images, the
synthetic set of vs_anomalib.py, for the default 6 steps). Features come from the packaged
EfficientNet-Lite0 (blocks.2 + blocks.4) with random weights (the time does not depend on them).
Setups, timed in turn within each repetition (median over ``--reps``):

- SimpleNet with the reference's widths (``pretrain_embed_dimension`` = ``target_embed_dimension``
  = 1024: a 1024 -> 682 -> 1 discriminator), the default before 2026-11-30;
- SimpleNet with its defaults (384 and 384: 384 -> 256 -> 1);
- SuperSimpleNet with ``upscale_factor`` 1 (32x32 map: SimpleNet's map size at 256 px) and 2
  (64x64, its default at 256 px).

Load averages are recorded before and after. Writes benchmarks/results/simplenet_speed.md
(``--append``: adds this run's table to it). Tables in that file from before 2026-11-30 18:00 came
from an earlier version of this script (git history), which timed the step change of that day.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from defectscope.models import SimpleNet, SuperSimpleNet

OUT = Path(__file__).parent / "results" / "simplenet_speed.md"
BATCH, SIZE = 8, 256


def simplenet(features, **widths):
    torch.manual_seed(0)
    model = SimpleNet(pretrained=False, resize=SIZE, imagesize=SIZE, **widths)
    model.fit_feature_statistics(torch.cat(features))
    return model.train()


def supersimplenet(upscale):
    torch.manual_seed(0)
    model = SuperSimpleNet(backbone="efficientnet_lite0", pretrained=False, upscale_factor=upscale,
                           image_size=SIZE, visualizer=False)
    model.set_regime("unsupervised")  # as the engine does: the unused classifier is left out
    return model


def features_for(model, steps):
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        return [model.extract_features(torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)) for _ in range(steps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--append", action="store_true", help="add this run's table to the results file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    setups = {}
    reference = {"pretrain_embed_dimension": 1024, "target_embed_dimension": 1024}
    for label, widths in (("reference widths 1024 / 1024 (before)", reference), ("default widths 384 / 384", {})):
        features = features_for(SimpleNet(pretrained=False, resize=SIZE, imagesize=SIZE, **widths), args.steps)
        setups[f"SimpleNet, {label}, 32x32 map"] = (simplenet(features, **widths), features,
                                                    lambda m, f: m.training_step(f))
    for upscale in (1, 2):
        m = supersimplenet(upscale)
        f = features_for(m, args.steps)
        m.fit_feature_statistics(torch.cat(f))
        side = f[0].shape[-1]
        setups[f"SuperSimpleNet, upscale_factor {upscale}, {side}x{side} map"] = (m.train(), f, lambda mm, ff: mm.training_step(ff))
    optimizers = {name: model.configure_optimizers(10)[0] for name, (model, _, _) in setups.items()}

    def epoch(name):
        model, feats, step = setups[name]
        opt = optimizers[name]
        start = time.perf_counter()
        for f in feats:
            loss = step(model, f)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    for name in setups:  # warm-up
        epoch(name)
    times = {name: [] for name in setups}
    for _ in range(args.reps):
        for name in setups:
            times[name].append(epoch(name))
    load_after = os.getloadavg()
    med = {name: statistics.median(t) for name, t in times.items()}
    ref32 = next(v for k, v in med.items() if k.startswith("SuperSimpleNet, upscale_factor 1"))
    ref64 = next(v for k, v in med.items() if k.startswith("SuperSimpleNet, upscale_factor 2"))
    lines = [] if args.append else ["# SimpleNet training speed against SuperSimpleNet", ""]
    lines += [
        f"## {args.threads} torch thread(s)",
        "",
        (f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, "
        f"{args.threads} torch threads, torch {torch.__version__}. Load average (1, 5, 15 min) before "
        f"{' '.join(f'{v:.2f}' for v in load_before)}, after {' '.join(f'{v:.2f}' for v in load_after)}: "
        "times are upper bounds, the ratios (interleaved in the same run) are what counts."),
        "",
        (f"Command: `python benchmarks/simplenet_speed.py --reps {args.reps} --steps {args.steps} --threads {args.threads}`. "
        f"One epoch = {args.steps} steps of batch {BATCH} on cached features of {SIZE}x{SIZE} images (see the script's "
        "docstring); median of the repetitions, all setups timed in turn within each repetition."),
        "",
        "| setup | s / epoch (median) | all repetitions | x SuperSimpleNet 32x32 | x SuperSimpleNet 64x64 |",
        "|---|---|---|---|---|",
    ]
    for name, t in times.items():
        lines.append(f"| {name} | {med[name]:.2f} | {' '.join(f'{v:.2f}' for v in t)} | {med[name] / ref32:.2f} | "
                     f"{med[name] / ref64:.2f} |")
    lines += [""]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with OUT.open("a") as out:
            out.write("\n" + text)
    else:
        OUT.write_text(text)


if __name__ == "__main__":
    main()
