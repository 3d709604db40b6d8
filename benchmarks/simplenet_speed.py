"""SimpleNet's training epoch against SuperSimpleNet's, on the same machine in the same run.

Run by hand (not in CI):

    python benchmarks/simplenet_speed.py [--reps 5] [--steps 6] [--threads 2]

An epoch here is what the engine runs once the frozen backbone's features are cached (no
augmentation, frozen backbone: both models' defaults): ``--steps`` training steps (forward,
backward, AdamW step) of batch 8 on pre-extracted features of 256x256 images (48 images, the
synthetic set of vs_anomalib.py, for the default 6 steps). Features come from the packaged
EfficientNet-Lite0 (blocks.2 + blocks.4) with random weights (the time does not depend on them).
Setups, timed in turn within each repetition (median over ``--reps``):

- SimpleNet, the step as before this change: plain discriminator modules, ``cat((true, true + noise))``;
- SimpleNet as it is now (only the noise written straight into the discriminator's input
  differs from before; a fused discriminator was measured 1.07x slower and removed);
- SuperSimpleNet with ``upscale_factor`` 1 (32x32 map: SimpleNet's map size at 256 px) and 2
  (64x64, its default at 256 px).

Before timing, one step of the old and the new SimpleNet path from the same weights and random
state are compared (loss, every gradient, batch-norm running statistics). Load averages are
recorded before and after. Writes benchmarks/results/simplenet_speed.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from defectscope.models import SimpleNet, SuperSimpleNet

OUT = Path(__file__).parent / "results" / "simplenet_speed.md"
BATCH, SIZE = 8, 256


def plain_step(model: SimpleNet, features: torch.Tensor) -> torch.Tensor:
    """SimpleNet's training step before this change: plain modules, noise added, then cat."""
    true_feats = model.embed(features)
    fake_feats = true_feats + model.make_noise(true_feats)
    scores = model.discriminator(torch.cat((true_feats, fake_feats)))
    n = true_feats.shape[0]
    return model.loss(scores[:n], scores[n:])


def simplenet(features):
    torch.manual_seed(0)
    model = SimpleNet(pretrained=False, resize=SIZE, imagesize=SIZE)
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


def check_equivalence(model: SimpleNet, features: torch.Tensor) -> str:
    """Old and new step from the same state: largest differences, relative to each quantity's size."""
    old, new = copy.deepcopy(model), copy.deepcopy(model)
    results = []
    for m, step in ((old, plain_step), (new, lambda mm, f: mm.training_step(f))):
        torch.manual_seed(1)
        loss = step(m, features)
        m.zero_grad(set_to_none=True)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None},
                        {n: b for n, b in m.discriminator.named_buffers() if "running" in n}))
    (l0, g0, b0), (l1, g1, b1) = results
    assert g0.keys() == g1.keys()
    def rel(a, b):
        return (a - b).abs().max().item() / max(a.abs().max().item(), 1e-30)

    # The first layer's bias has a zero gradient up to round-off (the batch norm removes it): it
    # is compared against the layer's weight gradient.
    scale = {n: g0[n.replace(".bias", ".weight")] if n == "discriminator.body.0.bias" else g0[n] for n in g0}
    worst = max((g0[n] - g1[n]).abs().max().item() / scale[n].abs().max().item() for n in g0)
    worst_buf = max(rel(b0[n], b1[n]) for n in b0)
    assert abs(l0 - l1) < 1e-5 * abs(l0) and worst < 2e-3 and worst_buf < 1e-5, (l0, l1, worst, worst_buf)
    return (f"loss {l0:.6f} (old) vs {l1:.6f} (new); largest gradient difference {worst:.1e} of that gradient's "
            f"largest value (float32 round-off: against float64, the plain modules' batch-norm bias gradient is "
            f"off by ~3e-4 of its size on this batch); running statistics {worst_buf:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--append", action="store_true", help="add this run's table to the results file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    sn_features = features_for(SimpleNet(pretrained=False, resize=SIZE, imagesize=SIZE), args.steps)
    equivalence = check_equivalence(simplenet(sn_features), sn_features[0])
    setups = {}
    sn_old, sn_new = simplenet(sn_features), simplenet(sn_features)
    setups["SimpleNet, before (plain modules + cat), 32x32 map"] = (sn_old, sn_features, plain_step)
    setups["SimpleNet, now, 32x32 map"] = (sn_new, sn_features, lambda m, f: m.training_step(f))
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
    lines += ["", f"Old vs new SimpleNet step, same weights and random state: {equivalence}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with OUT.open("a") as out:
            out.write("\n" + text)
    else:
        OUT.write_text(text)


if __name__ == "__main__":
    main()
