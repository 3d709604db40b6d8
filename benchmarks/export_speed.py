"""Exported models against PyTorch, side by side (run by hand, not in CI).

    python benchmarks/export_speed.py [--threads 2] [--models supersimplenet stfpm] [--rounds 5]

For each model (CLI defaults: 256 px, EfficientNet-Lite0; SuperSimpleNet at upscale factor 1 as
`defectscope train` builds it; STFPM with its packaged Lite0 teacher fallback offline) the model's
statistics are fitted on smooth random pictures (speed does not depend on training), it is exported
with :func:`defectscope.deploy.export_model`, and images/s are timed at batch 1 and 32 on
``--threads`` threads for:

- PyTorch: ``model.predict`` on a uint8 tensor batch (normalisation, forward, post-processing);
- onnxruntime f32: the exported graph (normalisation and post-processing inside);
- OpenVINO f32 (explicit precision), bf16 and int8 (NNCF, calibrated on 16 pictures) where the CPU
  and the installed packages allow, each with its max abs map / score difference from f32.

Backends are timed round-robin within each round (so background load hits them alike); the
table reports each one's best round (median time of its iterations). The load average is recorded
before and after. Writes benchmarks/results/export.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "results" / "export.md"


def pictures(n: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """Smooth random RGB pictures with noise, uint8 [n, h, w, 3]."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(n):
        base = rng.uniform(0, 255, size=(h // 16, w // 16, 3))
        up = np.kron(base, np.ones((16, 16, 1)))
        out.append(np.clip(up + rng.normal(0, 10, size=(h, w, 3)), 0, 255).astype(np.uint8))
    return np.stack(out)


def build(name: str, size: int):
    from defectscope.models import create_model

    torch.manual_seed(0)
    if name == "supersimplenet":
        model = create_model(name, backbone="efficientnet_lite0", image_size=size, upscale_factor=1)
    elif name == "simplenet":
        model = create_model(name, backbone="efficientnet_lite0", resize=size, imagesize=size)
    elif name == "stfpm":
        model = create_model(name, image_size=size)
    else:
        raise SystemExit(f"--models: {name} is not benchmarked here (efficientad needs a teacher file)")
    model.eval()
    x = torch.from_numpy(pictures(8, (size, size), 1)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        model.fit_feature_statistics(model.extract_features((x - mean) / std))
    return model


def timer(fn, batch: np.ndarray, iters: int) -> float:
    """Median seconds per call of ``fn(batch)`` over ``iters`` calls (after one warm-up)."""
    fn(batch)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["supersimplenet"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters-b1", type=int, default=20)
    ap.add_argument("--iters-b32", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--append", action="store_true", help="add this run's tables to export.md instead of replacing it")
    args = ap.parse_args()

    import onnxruntime as ort

    from defectscope.deploy import export_model, load_inferencer

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    try:
        import openvino as ov

        ov_version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except ImportError:
        ov, ov_version, caps = None, None, []
    try:
        import nncf  # noqa: F401

        has_nncf = True
    except ImportError:
        has_nncf = False
    lines = []
    for name in args.models:
        model = build(name, args.size)
        size = model.image_size
        images = pictures(32, size, 2)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            onnx_path = export_model(model, Path(tmp) / "onnx", exporter="dynamo")
            export_s = time.perf_counter() - t0
            backends = {"onnxruntime f32": load_inferencer(onnx_path, runtime="onnxruntime", threads=args.threads)}
            notes = []
            if ov is not None:
                xml = export_model(model, Path(tmp) / "ov", format="openvino", exporter="dynamo")
                backends["OpenVINO f32"] = load_inferencer(xml, threads=args.threads)
                if "BF16" in caps:
                    backends["OpenVINO bf16"] = load_inferencer(xml, threads=args.threads, precision="bf16")
                else:
                    notes.append("no bf16 on this CPU")
                if has_nncf:
                    xml8 = export_model(model, Path(tmp) / "ov8", format="openvino", precision="int8",
                                        exporter="dynamo", calibration_images=pictures(16, size, 3), check=False)
                    backends["OpenVINO int8"] = load_inferencer(xml8, threads=args.threads)
                else:
                    notes.append("int8 not measured: nncf not installed")

            def torch_fn(batch, model=model):
                return model.predict(torch.from_numpy(batch).permute(0, 3, 1, 2))

            runs = {"PyTorch": torch_fn, **{k: v.predict for k, v in backends.items()}}
            # Accuracy: each backend against PyTorch on the 32 pictures.
            ref_scores, ref_maps = torch_fn(images)
            errors = {}
            for key, fn in runs.items():
                scores, maps = fn(images)
                errors[key] = (float(np.abs(maps - ref_maps).max()), float(np.abs(scores - ref_scores).max()))
            best = {(k, b): float("inf") for k in runs for b in (1, 32)}
            for _ in range(args.rounds):
                for key, fn in runs.items():
                    for b, iters in ((1, args.iters_b1), (32, args.iters_b32)):
                        best[(key, b)] = min(best[(key, b)], timer(fn, images[:b], iters))
        base1, base32 = 1 / best[("PyTorch", 1)], 32 / best[("PyTorch", 32)]
        lines.append(f"\n### {name} ({size[0]}x{size[1]} px, {model.hparams.get('backbone')}"
                     f"{', upscale factor 1' if name == 'supersimplenet' else ''}); dynamo export {export_s:.0f} s\n")
        lines.append("| backend | images/s b1 | images/s b32 | b1 vs PyTorch b1 | b32 vs PyTorch b32 | "
                     "max abs map diff vs PyTorch | max abs score diff |")
        lines.append("|---|---|---|---|---|---|---|")
        for key in runs:
            r1, r32 = 1 / best[(key, 1)], 32 / best[(key, 32)]
            lines.append(f"| {key} | {r1:.1f} | {r32:.1f} | {r1 / base1:.2f}x | {r32 / base32:.2f}x | "
                         f"{errors[key][0]:.2g} | {errors[key][1]:.2g} |")
        if notes:
            lines.append(f"\n({'; '.join(notes)})")
        print("\n".join(lines[-len(runs) - 3:]), flush=True)
    load_after = os.getloadavg()
    header = [
        "# Exported models against PyTorch (benchmarks/export_speed.py)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.threads} threads for every backend; torch {torch.__version__}, onnxruntime "
        f"{ort.__version__}, OpenVINO {ov_version}; CPU capabilities {', '.join(caps) or 'unknown'}. "
        f"Load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, after "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}.",
        "",
        f"Images/s: each backend's best of {args.rounds} round-robin rounds (median of {args.iters_b1} calls at batch 1, "
        f"{args.iters_b32} at batch 32). PyTorch is `model.predict` on a uint8 batch already at the model's size; "
        "the exported models take the same uint8 batch (normalisation, map upscaling, smoothing and the image score "
        "inside the graph). Differences are on 32 smooth random pictures, against PyTorch float32.",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if args.append and OUT.is_file():
        text = OUT.read_text() + "\n## Another run\n\n" + "\n".join(header[2:] + lines) + "\n"
    if not args.no_write:
        OUT.write_text(text)


if __name__ == "__main__":
    main()
