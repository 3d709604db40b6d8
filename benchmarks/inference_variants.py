"""SuperSimpleNet inference: which speed-ups pay on this machine (run by hand, not in CI).

    python benchmarks/inference_variants.py [--threads 2] [--up 1] [--compile]

Times ``model(images)`` (backbone, aggregation, heads, map upsampling, smoothing, sigmoid) on
pre-loaded 256x256 tensors at batch 1 and 32 for: float32 (default), channels-last memory format,
bfloat16 autocast, the classification head on (``image_score="classifier"``; the unsupervised
default scores by the map maximum and skips it), and optionally torch.compile. Variants are timed round-robin in the same
process so that background load hits them alike. Each is checked against float32 outputs.
Appends a table to benchmarks/results/ssn_profile.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from defectscope.models import SuperSimpleNet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--up", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ssn_profile.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=args.up).eval()
    images = torch.randn(32, 3, 256, 256)
    with torch.inference_mode():
        model.fit_feature_statistics(model.extract_features(images[:8]))
    cl_model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=args.up).eval()
    cl_model.load_state_dict(model.state_dict())
    cl_model = cl_model.to(memory_format=torch.channels_last)

    def bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    variants = {
        "float32 (default)": lambda x: model(x),
        "channels-last": lambda x: cl_model(x.contiguous(memory_format=torch.channels_last)),
        "bfloat16 autocast": bf16,
    }
    # The default model scores unsupervised runs by the map maximum and skips the classification
    # head; this variant runs it, as a model trained with labels (or image_score="classifier") does.
    cls_model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=args.up, image_score="classifier").eval()
    cls_model.load_state_dict(model.state_dict())
    other_score = "with the classification head (image_score=classifier)"
    variants[other_score] = lambda x: cls_model(x)
    if args.compile:
        compiled = torch.compile(model)
        variants["torch.compile"] = lambda x: compiled(x)
    lines = ["", f"## Inference variants (upscale {args.up}, {args.threads} threads, `python benchmarks/inference_variants.py"
             f" --threads {args.threads} --up {args.up}{' --compile' if args.compile else ''}`)", "",
             "| variant | batch 1 img/s | batch 32 img/s | max abs. diff of scores vs float32 |", "|---|---|---|---|"]
    results = {}
    with torch.inference_mode():
        reference = model(images)[1]
        for batch in (1, 32):
            x = images[:batch]
            times = {name: [] for name in variants}
            for fn in variants.values():
                fn(x), fn(x)  # warm-up (compilation, primitive caches)
            for _ in range(args.reps):
                for name, fn in variants.items():
                    start = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - start)
            for name in variants:
                results.setdefault(name, {})[batch] = batch / statistics.median(times[name])
        for name, fn in variants.items():
            diff = (fn(images)[1].float() - reference).abs().max().item()
            text = "n/a (another score)" if name == other_score else f"{diff:.1e}"
            lines.append(f"| {name} | {results[name][1]:.1f} | {results[name][32]:.1f} | {text} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
