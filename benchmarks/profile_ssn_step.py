"""Where a SuperSimpleNet training step spends its time, and which speed-ups are worth keeping.

Run by hand (not in CI):  python benchmarks/profile_ssn_step.py [--threads 2] [--reps 10]

Times one step of batch 8 at 256x256 on the packaged EfficientNet-Lite0 (blocks.2 + blocks.4),
split into data loading (decode + resize + normalise 8 ELPV cells), the frozen backbone, Perlin
masks, and the heads' forward + backward + optimiser step; for feature maps of 32x32
(upscale_factor 1, our default) and 64x64 (2, the reference). Then compares head variants
(float32 modules, channels-last memory format, the fused map head of models/fused_head.py,
bfloat16 autocast) side by side and checks that each gives the same loss and gradients as the
first within tolerance. Writes benchmarks/results/ssn_profile.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from defectscope.data import AnomalyDataset, elpv_split
from defectscope.models import SuperSimpleNet
from defectscope.models.common import perlin_masks

BATCH = 8
VARIANTS = (
    ("NCHW float32 modules", {"fused": False}),
    ("channels-last float32 modules", {"channels_last": True, "fused": False}),
    ("channels-last float32 fused map head (default)", {"channels_last": True}),
    ("bfloat16 autocast (NCHW weights, modules)", {"bf16": True, "fused": False}),
)


def timeit(fn, reps: int) -> float:
    """Median wall time of ``fn()`` in milliseconds after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def heads_step(model, optimizer, features, channels_last=False, bf16=False, fused=True):
    model.segdec.fused = fused
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.training_step(features)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ssn_profile.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = elpv_split("mono")
    lines = [
        "# SuperSimpleNet training step: profile and speed-ups",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. Command: `python benchmarks/profile_ssn_step.py --threads {args.threads}`.",
        f"Batch {BATCH}, 256x256, EfficientNet-Lite0 blocks.2+blocks.4 (152 channels); median of {args.reps} steps (ms).",
        "",
        "| part of one step | 32x32 map (upscale 1) | 64x64 map (upscale 2, reference) |",
        "|---|---|---|",
    ]
    rows: dict[str, list[str]] = {}
    for up in (1, 2):
        torch.manual_seed(0)
        model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=up)
        dataset = AnomalyDataset(split.train[:BATCH], image_size=256, mean=model.mean, std=model.std)
        images = torch.stack([dataset[i]["image"] for i in range(BATCH)])
        with torch.no_grad():
            features = model.extract_features(images)
        model.fit_feature_statistics(features)
        model.train()
        optimizer, _ = model.configure_optimizers(10)
        h, w = features.shape[-2:]
        t_data = timeit(lambda: [dataset[i] for i in range(BATCH)], args.reps)
        t_backbone = timeit(lambda: model.extract_features(images), args.reps)
        t_perlin = timeit(lambda: perlin_masks(2 * BATCH, h, w), args.reps)
        t_heads = timeit(lambda: heads_step(model, optimizer, features), args.reps)
        total = t_data + t_backbone + t_heads
        parts = {
            "data loading (8 images)": t_data,
            "frozen backbone forward": t_backbone,
            "Perlin masks (16, part of heads)": t_perlin,
            "heads fwd + bwd + AdamW (incl. Perlin)": t_heads,
        }
        for name, value in parts.items():
            rows.setdefault(name, []).append(f"{value:.1f} ({100 * value / total:.0f} %)")
        rows.setdefault("step without feature cache", []).append(f"{total:.1f}")
        rows.setdefault("step with feature cache (heads only)", []).append(f"{t_heads:.1f} ({total / t_heads:.2f}x faster)")

        # Head variants, side by side, each checked against float32 on the same batch and noise.
        def loss_and_grads(**kw):
            torch.manual_seed(1)
            model.zero_grad(set_to_none=True)
            x = features.contiguous(memory_format=torch.channels_last) if kw.get("channels_last") else features
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kw.get("bf16", False)):
                loss = model.training_step(x)
            loss.backward()
            # The classification head gets no gradient when it is left out of training.
            return loss.item(), torch.cat([p.grad.flatten() for p in model.segdec.parameters() if p.grad is not None])

        import copy

        snapshot = copy.deepcopy(model.state_dict())
        checks = {}
        for name, kw in VARIANTS:
            model.load_state_dict(snapshot)
            if kw.get("channels_last"):
                model.to(memory_format=torch.channels_last)
            model.segdec.fused = kw.get("fused", True)
            checks[name] = loss_and_grads(**kw)
            model.to(memory_format=torch.contiguous_format)
        ref_loss, ref_grad = checks[VARIANTS[0][0]]
        for name, kw in VARIANTS:
            model.load_state_dict(snapshot)
            if kw.get("channels_last"):
                model.to(memory_format=torch.channels_last)
            model.segdec.fused = kw.get("fused", True)
            t = timeit(lambda: heads_step(model, optimizer, features, **kw), args.reps)
            loss, grad = checks[name]
            rel = (grad - ref_grad).norm().item() / ref_grad.norm().item()
            rows.setdefault(f"heads: {name}", []).append(
                f"{t:.1f} ms, {t_heads / t:.2f}x, loss diff {abs(loss - ref_loss):.1e}, grad rel. diff {rel:.1e}"
            )
            model.to(memory_format=torch.contiguous_format)
    for name, values in rows.items():
        lines.append(f"| {name} | {' | '.join(values)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Keep the sections other scripts wrote below the table (inference variants).
    old = out.read_text() if out.exists() else ""
    rest = old[old.index("\n## ") :] if "\n## " in old else ""
    out.write_text(text + rest)


if __name__ == "__main__":
    main()
