"""Is torch.compile worth it for SuperSimpleNet's heads on CPU?

Run by hand (not in CI):  python benchmarks/compile_heads.py [--threads 2] [--reps 10]

The engine trains the heads on cached backbone features, so a training step is the heads'
forward + backward + AdamW on a batch of features. This times, side by side:

1. a training step, batch 8, EfficientNet-Lite0 blocks.2 + blocks.4 (152 channels), feature
   maps 32x32 (upscale_factor 1, our default) and 64x64 (2, the reference): eager; the
   trainable modules compiled in place (``adaptor.compile()``, ``segdec.compile()``); and the
   whole ``training_step`` compiled (Perlin masks, noise and loss included; it has graph
   breaks, e.g. Perlin noise's ``.item()``, so it is compiled with automatic dynamic shapes:
   with ``dynamic=False`` every new Perlin cell count recompiles it). The optimiser step stays
   eager in all of them.
2. inference ``forward_features`` (32x32 map to a 256x256 smoothed map) at batch 1 and 32:
   eager vs ``torch.compile(model.forward_features)``.

Features are random tensors of the real shape and scale (per-channel offsets and spreads,
overall std about 5 as Lite0's), in memory before timing, so only the heads are timed. Every
case starts from a reset compiler with Inductor's caches off, and its first call (compilation
included) is reported as compile time. After warm-up the variants run interleaved (A, B, C, A,
B, C, ...; a short inference call is repeated to fill about 0.25 s per sample), so a neighbour
job on a shared core slows them alike; the speed-up is the median
over repetitions of eager's time / the variant's time in the same repetition. A second eager
copy in the same rotation shows how far that ratio strays by noise alone. Results are checked
against eager on the same weights and random draws (Inductor is told to use eager's random
number generator, ``fallback_random``, so Perlin masks and noise are the same): max abs
difference of the loss, the gradients and the outputs. Writes benchmarks/results/compile.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

from defectscope.models import SuperSimpleNet

BATCH = 8
CHANNELS = 152  # Lite0 blocks.2 (40) + blocks.4 (112)
IMAGE = 256
SPEEDUP_TO_KEEP = 1.1
# Largest difference vs eager, relative to the largest eager magnitude, that still counts as
# "the same result" (float32 round-off from reordered sums and fused kernels).
RELATIVE_TOLERANCE = 1e-4
NOISE_CHECK = "eager again (noise check)"


def random_features(n: int, size: int, seed: int) -> torch.Tensor:
    """``[n, 152, size, size]`` float32, NCHW as the feature cache returns them."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(1, CHANNELS, 1, 1, generator=g) * 2
    spread = torch.rand(1, CHANNELS, 1, 1, generator=g) * 6 + 1
    return torch.randn(n, CHANNELS, size, size, generator=g) * spread + offset


def build_model(upscale_factor: int) -> SuperSimpleNet:
    torch.manual_seed(0)
    model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=upscale_factor)
    model.fit_feature_statistics(random_features(32, IMAGE // 8 * upscale_factor, seed=1))
    return model


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def first_error_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def max_diff(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Max abs difference and that divided by the largest magnitude of ``ref``."""
    d = (ref.detach().float() - other.detach().float()).abs().max().item()
    return d, d / max(ref.detach().abs().max().item(), 1e-30)


def interleaved(fns: dict, reps: int, calls: int = 1) -> dict[str, dict]:
    """Call the variants in turn ``reps`` times (each time ``calls`` calls in a row, so that a
    short call is not timed alone). Per variant: median ms per call, and the median and
    quartiles of eager's time / its time within each repetition (``fns`` starts with eager)."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(seconds(lambda: [fn() for _ in range(calls)]) * 1000 / calls)
    eager = times[next(iter(fns))]
    stats = {}
    for name, t in times.items():
        ratios = [e / v for e, v in zip(eager, t)]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
        stats[name] = dict(ms=statistics.median(t), speedup=statistics.median(ratios), q1=q1, q3=q3)
    return stats


def row(case, name, stats, compile_s="", diff="", same=True) -> tuple:
    s = stats[name]
    keep = name not in ("eager", NOISE_CHECK) and same and s["speedup"] >= SPEEDUP_TO_KEEP
    return (case, name, f"{s['ms']:.1f}", f"{s['speedup']:.2f}x ({s['q1']:.2f}-{s['q3']:.2f})", compile_s, diff, keep)


# ---- training ---------------------------------------------------------------------------
def train_step(model, optimizer, step, features) -> torch.Tensor:
    loss = step(features)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def loss_and_grads(model, step, features) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and all gradients of one step (no optimiser step) with random draws from seed 1."""
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    loss = step(features)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def bench_training(upscale_factor: int, reps: int, rows: list, notes: list) -> None:
    size = IMAGE // 8 * upscale_factor
    case = f"train step, batch {BATCH}, {size}x{size} map"
    torch._dynamo.reset()
    features = random_features(BATCH, size, seed=2)
    base = build_model(upscale_factor).train()
    variants = {}  # name -> (model, optimizer, loss function), each on its own copy of base
    for name in ("eager", "compiled modules", "compiled training_step", NOISE_CHECK):
        model = copy.deepcopy(base)
        step = model.training_step
        if name == "compiled modules":
            model.adaptor.compile(dynamic=False)
            model.segdec.compile(dynamic=False)
        elif name == "compiled training_step":
            step = torch.compile(model.training_step)
        variants[name] = (model, model.configure_optimizers(10)[0], step)
    # Loss and gradients on identical weights, before any optimiser step; for a compiled
    # variant this first call also compiles its forward and backward graphs.
    checks, first_call, failed = {}, {}, {}
    for name, (model, _, step) in variants.items():
        start = time.perf_counter()
        try:
            checks[name] = loss_and_grads(model, step, features)
        except Exception as err:  # record why a compiled variant cannot run, keep the others
            failed[name] = first_error_line(err)
        first_call[name] = time.perf_counter() - start
    fns = {}
    for name, (model, optimizer, step) in variants.items():
        if name in failed:
            rows.append((case, name, "failed", "", "", failed[name], False))
            continue
        for _ in range(3):  # warm-up: optimiser state, and compiled training_step's recompilations
            train_step(model, optimizer, step, features)
        fns[name] = lambda m=model, o=optimizer, s=step: train_step(m, o, s, features)
    graphs = counters["stats"]["unique_graphs"]
    stats = interleaved(fns, reps)
    notes.append(f"{size}x{size} training: {counters['stats']['unique_graphs'] - graphs} graphs compiled during "
                 "the timed steps.")
    ref_loss, ref_grads = checks["eager"]
    for name in fns:
        if name in ("eager", NOISE_CHECK):
            rows.append(row(case, name, stats, diff="(reference)" if name == "eager" else ""))
            continue
        loss_d, loss_rel = max_diff(ref_loss, checks[name][0])
        grad_d, grad_rel = max_diff(ref_grads, checks[name][1])
        diff = f"loss {loss_d:.1e}, grads {grad_d:.1e} (rel. {grad_rel:.1e})"
        compile_s = f"{first_call[name] - stats['eager']['ms'] / 1000:.1f}"
        rows.append(row(case, name, stats, compile_s, diff, max(loss_rel, grad_rel) <= RELATIVE_TOLERANCE))
    for r in rows[-len(variants):]:
        print(r, flush=True)


# ---- inference --------------------------------------------------------------------------
def bench_inference(batch: int, reps: int, rows: list) -> None:
    case = f"inference forward_features, batch {batch}, 32x32 map"
    name = "compiled forward_features"
    torch._dynamo.reset()
    model = build_model(1).eval()
    features = random_features(batch, 32, seed=3)
    compiled = torch.compile(model.forward_features, dynamic=False)
    with torch.inference_mode():
        ref = model.forward_features(features, (IMAGE, IMAGE))
        start = time.perf_counter()
        try:
            out = compiled(features, (IMAGE, IMAGE))
        except Exception as err:
            compiled, failure = None, first_error_line(err)
        first_call = time.perf_counter() - start
        fns = {"eager": lambda: model.forward_features(features, (IMAGE, IMAGE))}
        if compiled is not None:
            fns[name] = lambda: compiled(features, (IMAGE, IMAGE))
        fns[NOISE_CHECK] = fns["eager"]
        for fn in fns.values():
            fn()
        calls = max(1, round(0.25 / seconds(fns["eager"])))  # about 0.25 s per timed sample
        stats = interleaved(fns, reps, calls)
    rows.append(row(case, "eager", stats, diff="(reference)"))
    if compiled is None:
        rows.append((case, name, "failed", "", "", failure, False))
    else:
        map_d, map_rel = max_diff(ref[0], out[0])
        score_d, score_rel = max_diff(ref[1], out[1])
        diff = f"maps {map_d:.1e} (rel. {map_rel:.1e}), scores {score_d:.1e} (rel. {score_rel:.1e})"
        compile_s = f"{first_call - stats['eager']['ms'] / 1000:.1f}"
        rows.append(row(case, name, stats, compile_s, diff, max(map_rel, score_rel) <= RELATIVE_TOLERANCE))
    rows.append(row(case, NOISE_CHECK, stats))
    for r in rows[-3:]:
        print(r, flush=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        cxx = "no g++ found"
    return (f"{cpu}, {torch.get_num_threads()} torch threads; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {cxx}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--maps", type=int, nargs="+", default=[1, 2], help="upscale factors: 1 = 32x32, 2 = 64x64")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="inference batch sizes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Compiled code draws random numbers with eager's generator, so compiled and eager
    # training steps see the same Perlin masks and noise and can be compared.
    inductor_config.fallback_random = True
    inductor_config.force_disable_caches = True  # cold compile times, whatever ran before
    started = time.perf_counter()
    rows: list[tuple] = []
    notes: list[str] = []
    for up in args.maps:
        bench_training(up, args.reps, rows, notes)
    for batch in args.batches:
        bench_inference(batch, args.reps, rows)
    total = time.perf_counter() - started

    command = " ".join(["python benchmarks/compile_heads.py", *sys.argv[1:]])
    lines = [
        "# torch.compile for SuperSimpleNet's heads on CPU",
        "",
        f"Machine: {machine()}. {time.strftime('%Y-%m-%d')}. Command: `{command}` ({total / 60:.1f} min in all).",
        "",
        f"{args.reps} interleaved repetitions after warm-up. ms: median time of a call. Speed-up: median over "
        "repetitions of eager's time / the variant's in the same repetition (quartiles in brackets); "
        f"'{NOISE_CHECK}' is eager timed as a variant, so its distance from 1.00x is noise. Compile s: the first "
        "call (compiling forward and, in training, backward; cold, caches off) minus one eager call. Differences "
        "vs eager on the same weights and random draws (`fallback_random`); rel.: divided by the largest eager "
        f"magnitude. Keep: median speed-up at least {SPEEDUP_TO_KEEP}x and every relative difference at most "
        f"{RELATIVE_TOLERANCE:g}.",
        "",
        "| case | variant | ms | speed-up vs eager | compile s | max abs difference vs eager | keep |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, name, ms, speedup, compile_s, diff, keep in rows:
        lines.append(f"| {case} | {name} | {ms} | {speedup} | {compile_s} | {diff} | {'yes' if keep else ''} |")
    lines += ["", " ".join(notes)]
    kept = [f"{case}: {name}" for case, name, *_, keep in rows if keep]
    lines += ["", "## Verdict by the keep rule", ""]
    if kept:
        lines.append(f"At least {SPEEDUP_TO_KEEP}x with the same results: " + "; ".join(kept) + ".")
    else:
        lines.append(f"No compiled variant is {SPEEDUP_TO_KEEP}x faster with the same results here.")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
