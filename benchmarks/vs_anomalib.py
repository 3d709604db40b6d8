"""SuperSimpleNet: defectscope against anomalib 2.7, side by side on the same data and weights.

Run by hand (not in CI). anomalib lives in its own environment:

    python3 -m venv /work/anomalib-venv
    /work/anomalib-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 "anomalib==2.7.*"
    .venv/bin/python benchmarks/vs_anomalib.py --anomalib-python /work/anomalib-venv/bin/python

The driver (our environment) writes the data folders and the packaged EfficientNet-Lite0 weights
(re-keyed to timm), then runs each framework in its own process (so peak memory is its own):

- anomalib: ``Supersimplenet`` with backbone ``tf_efficientnet_lite0``, layers blocks.2 + blocks.4,
  the Lite0 normalisation (mean = std = 0.5), the weights loaded into its timm feature extractor
  (it cannot download), ``anomalib.engine.Engine`` fit on a Folder / MVTecAD datamodule;
- defectscope: ``SuperSimpleNet`` (same backbone, layers, weights) and our ``Engine``, at the
  reference map size (upscale_factor 2, as anomalib) and at our default (1).
  Unsupervised with the map-maximum score, our model does not train the classification head
  (nothing uses it); ``--with-classifier`` adds rows that train it too, as anomalib does.

Both get the same image size (256), batch size and epochs. Each process reports training wall
time (fit call to a finished model), peak resident memory, inference images per second on
pre-loaded tensors at batch 1 and 32 (the library's own inference call: anomalib's torch model,
our ``model(images)``), and image AUROC / pixel AUROC / AUPRO computed by the same metric code
(defectscope.metrics, checked against scikit-learn) from each framework's scores and maps.
The floor is our model's bare modules (backbone, aggregation, adaptor, heads) on pre-loaded
tensors, and its FLOP count (torch.utils.flop_counter). Writes benchmarks/results/supersimplenet.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = Path(os.environ.get("BENCH_DIR", "/tmp/ssn_bench"))
LITE_MEAN = LITE_STD = [0.5, 0.5, 0.5]


# ---------------------------------------------------------------- shared helpers (both envs)
@contextlib.contextmanager
def timm_pretrained_from(weights_path):
    """While building an anomalib model: timm's ``pretrained=True`` (a download, which fails
    offline) builds the network empty and loads ``weights_path`` into it instead."""
    import timm
    import torch

    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    real_create = timm.create_model

    def offline_create(name, *args, pretrained=False, **kwargs):
        model = real_create(name, *args, pretrained=False, **kwargs)
        if pretrained:
            missing, _ = model.load_state_dict(state, strict=False)
            if missing:
                raise RuntimeError(f"{weights_path} does not fit anomalib's {name}: missing {missing[:5]}")
        return model

    timm.create_model = offline_create
    try:
        yield
    finally:
        timm.create_model = real_create


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(fn, images, batch: int, reps: int) -> float:
    """Images per second of ``fn`` on batches of ``batch`` pre-loaded images (median of reps)."""
    import torch

    x = images[:batch]
    if len(x) < batch:
        x = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
    with torch.inference_mode():
        fn(x)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def load_tensors(paths: list[str], size: int):
    """Images resized and normalised exactly as both frameworks do it (antialiased resize)."""
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize((size, size), antialias=True),
                            v2.Normalize(LITE_MEAN, LITE_STD)])
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def floor_forward(model, images):
    """The floor of a SuperSimpleNet's inference: backbone, aggregation, adaptor and the heads its
    image score needs, as bare modules; no upscaling, smoothing or post-processing."""
    feats = model._standardize(model.extract_features(images))
    adapted = model.adaptor(feats)
    if model.scores_by_map:  # the map maximum is the score: no classification head
        return model.segdec.segment(adapted)
    return model.segdec(adapted, adapted if model.adapt_cls_features else feats)


# ---------------------------------------------------------------- anomalib side
def anomalib_datamodule(cfg: dict):
    """anomalib's datamodule for ``cfg``'s data (ELPV folder layout or the synthetic MVTec layout),
    at ``cfg['batch']`` for training and 32 for evaluation, no workers."""
    from anomalib.data import Folder, MVTecAD

    common = dict(train_batch_size=cfg["batch"], eval_batch_size=32, num_workers=0, seed=cfg["seed"])
    if cfg["data"] == "elpv":
        return Folder(name="elpv", root=cfg["root"], normal_dir="train/good", abnormal_dir="test/defect",
                      normal_test_dir="test/good", **common)
    return MVTecAD(root=cfg["root"], category=cfg["category"], **common)


def run_anomalib(cfg: dict) -> dict:
    import torch
    from anomalib.engine import Engine
    from anomalib.models import Supersimplenet
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    pre = PreProcessor(transform=Compose([Resize((cfg["size"], cfg["size"]), antialias=True), Normalize(LITE_MEAN, LITE_STD)]))
    with timm_pretrained_from(cfg["weights"]):
        model = Supersimplenet(backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"], pre_processor=pre,
                               evaluator=False, visualizer=False)
    dm = anomalib_datamodule(cfg)
    # No validation during training (we score the test images ourselves below), as in ours.
    engine = Engine(max_epochs=cfg["epochs"], accelerator="cpu", devices=1, logger=False, limit_val_batches=0,
                    default_root_dir=str(WORK / "anomalib_runs"))
    start = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    train_s = time.perf_counter() - start
    torch_model = model.model.eval()
    images = load_tensors(cfg["test_paths"], cfg["size"])
    scores, maps = [], []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            out = torch_model(images[i : i + 32])
            scores.append(out.pred_score.reshape(-1))
            maps.append(out.anomaly_map.reshape(len(out.pred_score), *out.anomaly_map.shape[-2:]))
    infer = {f"ips_b{b}": throughput(lambda x: torch_model(x), images, b, cfg["reps"]) for b in (1, 32)}
    return dict(train_s=train_s, peak_mb=peak_rss_mb(), scores=torch.cat(scores).tolist(),
                maps=str(save_maps(torch.cat(maps), "anomalib")), **infer)


def save_maps(maps, name: str) -> Path:
    import torch

    path = WORK / f"maps_{name}.pt"
    torch.save(maps.half(), path)
    return path


# ---------------------------------------------------------------- defectscope side
def run_ours(cfg: dict) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from defectscope.data import Sample
    from defectscope.engine import Engine
    from defectscope.models import SuperSimpleNet

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=cfg["up"], image_size=cfg["size"],
                           lr_scale=cfg["lr_scale"], visualizer=False,
                           train_unused_classifier=cfg.get("train_unused_classifier", False))
    train = [Sample(p, 0) for p in cfg["train_paths"]]
    engine = Engine(results_path=WORK / "ours_runs", run_name=f"{cfg['data']}-up{cfg['up']}", max_epochs=cfg["epochs"],
                    batch_size=cfg["batch"], seed=cfg["seed"], accelerator="cpu", progress=False, resume=False)
    start = time.perf_counter()
    engine.fit(model, train)
    train_s = time.perf_counter() - start
    model.eval()
    images = load_tensors(cfg["test_paths"], cfg["size"])
    scores, maps = [], []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            m, s = model(images[i : i + 32])
            scores.append(s)
            maps.append(m[:, 0])
    infer = {f"ips_b{b}": throughput(lambda x: model(x), images, b, cfg["reps"]) for b in (1, 32)}

    def bare(x):
        return floor_forward(model, x)

    floor = {f"floor_ips_b{b}": throughput(bare, images, b, cfg["reps"]) for b in (1, 32)}
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        bare(images[:1])
    return dict(train_s=train_s, peak_mb=peak_rss_mb(), scores=torch.cat(scores).tolist(),
                maps=str(save_maps(torch.cat(maps), f"ours_up{cfg['up']}")), gflops=counter.get_total_flops() / 1e9,
                **infer, **floor)


# ---------------------------------------------------------------- driver (our env)
def prepare(data: str, size: int) -> dict:
    """Data folders for both frameworks and the file lists of train / test."""
    sys.path.insert(0, str(REPO))
    from defectscope.data import elpv_split, make_synthetic_mvtec, mvtec_split

    if data == "elpv":
        split = elpv_split("mono")
        root = WORK / "elpv_mono"
        for sub, samples in (("train/good", split.train), ("test/good", [s for s in split.test if s.label == 0]),
                             ("test/defect", [s for s in split.test if s.label == 1])):
            folder = root / sub
            folder.mkdir(parents=True, exist_ok=True)
            for s in samples:
                link = folder / s.path.name
                if not link.exists():
                    link.symlink_to(s.path)
        test = [s for s in split.test if s.label == 0] + [s for s in split.test if s.label == 1]
        return dict(root=str(root), category=None, train_paths=[str(root / "train/good" / s.path.name) for s in split.train],
                    test_paths=[str(root / ("test/good" if s.label == 0 else "test/defect") / s.path.name) for s in test],
                    labels=[s.label for s in test], masks=None)
    root = WORK / "synthetic"
    make_synthetic_mvtec(root, category="synthetic", image_size=size, n_train=48, n_test_good=16, n_test_defect=24, seed=0)
    split = mvtec_split(root, "synthetic")
    return dict(root=str(root), category="synthetic", train_paths=[str(s.path) for s in split.train],
                test_paths=[str(s.path) for s in split.test], labels=[s.label for s in split.test],
                masks=[str(s.mask_path) if s.mask_path else None for s in split.test])


def metrics_for(result: dict, info: dict, size: int) -> dict:
    import numpy as np
    import torch

    from defectscope.metrics import aupro, image_auroc, pixel_auroc

    out = {"image_auroc": image_auroc(np.array(info["labels"]), np.array(result["scores"]))}
    if info["masks"]:
        maps = torch.load(result["maps"]).float()
        masks = []
        for path, label in zip(info["masks"], info["labels"]):
            if path is None:
                masks.append(np.zeros((size, size), bool))
            else:
                from PIL import Image

                masks.append(np.array(Image.open(path).convert("L").resize((size, size), Image.NEAREST)) > 127)
        masks = np.stack(masks)
        maps = torch.nn.functional.interpolate(maps[:, None], size=(size, size), mode="bilinear")[:, 0].numpy()
        out["pixel_auroc"] = pixel_auroc(masks, maps)
        out["aupro"] = aupro(masks, maps)
    return out


def driver(args) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from defectscope.backbones.weights import resolve_weights

    WORK.mkdir(parents=True, exist_ok=True)
    weights = WORK / "tf_efficientnet_lite0_timm.pth"
    state, source = resolve_weights("efficientnet_lite0")
    torch.save(dict(state), weights)
    rows = []
    for data in args.data:
        info = prepare(data, args.size)
        epochs = args.epochs if data == "elpv" else args.synthetic_epochs
        base = dict(data=data, size=args.size, batch=args.batch, epochs=epochs, seed=0, threads=args.threads,
                    reps=args.reps, weights=str(weights), lr_scale=args.lr_scale, **info)
        runs = [("anomalib 2.7 (64x64 map)", args.anomalib_python, "anomalib", {})]
        for up in args.ups:
            name = f"defectscope (upscale {up}, {'64x64' if up == 2 else '32x32'} map)"
            runs.append((name, sys.executable, "ours", {"up": up}))
            if args.with_classifier:
                runs.append((f"{name}, classifier trained too", sys.executable, "ours", {"up": up, "train_unused_classifier": True}))
        for label, python, side, extra in runs:
            cfg = {**base, **extra}
            cfg_path = WORK / "cfg.json"
            cfg_path.write_text(json.dumps(cfg))
            print(f"== {data}: {label}", flush=True)
            proc = subprocess.run([python, __file__, "--worker", side, str(cfg_path)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-5000:])
                raise SystemExit(f"{label} failed")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result.update(metrics_for(result, info, args.size))
            print({k: v for k, v in result.items() if k not in ("scores", "maps")}, flush=True)
            rows.append((data, label, result))
    write_report(args, rows)


def write_report(args, rows) -> None:
    import torch

    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        "# SuperSimpleNet: defectscope vs anomalib 2.7",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {args.threads} torch threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Backbone: packaged EfficientNet-Lite0 ImageNet "
        "weights (same file for both), blocks.2 + blocks.4, 256x256, batch "
        f"{args.batch}, seed 0. Command: `{' '.join(['python', 'benchmarks/vs_anomalib.py', *sys.argv[1:]])}`.",
        "",
        "| data | implementation | epochs | train s | peak MiB | img/s b1 | img/s b32 | image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data, label, r in rows:
        epochs = args.epochs if data == "elpv" else args.synthetic_epochs
        lines.append(f"| {data} | {label} | {epochs} | {r['train_s']:.0f} | {r['peak_mb']:.0f} | {r['ips_b1']:.1f} | "
                     f"{r['ips_b32']:.1f} | {fmt(r.get('image_auroc'))} | {fmt(r.get('pixel_auroc'))} | {fmt(r.get('aupro'))} |")
    lines += ["", "Floor (our bare modules on pre-loaded tensors: backbone, aggregation, adaptor, heads; no post-processing):", "",
              "| data | implementation | GFLOP per image | floor img/s b1 | floor img/s b32 | ours / floor b1 | ours / floor b32 |",
              "|---|---|---|---|---|---|---|"]
    for data, label, r in rows:
        if "floor_ips_b1" in r:
            lines.append(f"| {data} | {label} | {r['gflops']:.2f} | {r['floor_ips_b1']:.1f} | {r['floor_ips_b32']:.1f} | "
                         f"{r['floor_ips_b1'] / r['ips_b1']:.2f}x | {r['floor_ips_b32'] / r['ips_b32']:.2f}x |")
    lines += ["", "Ratios (anomalib / defectscope, same data, same run):", ""]
    for data in dict.fromkeys(d for d, _, _ in rows):
        ref = next(r for d, l, r in rows if d == data and l.startswith("anomalib"))
        for d, label, r in rows:
            if d == data and not label.startswith("anomalib"):
                lines.append(f"- {data}, {label}: training time {ref['train_s'] / r['train_s']:.2f}x faster; "
                             f"inference {r['ips_b1'] / ref['ips_b1']:.2f}x (b1), {r['ips_b32'] / ref['ips_b32']:.2f}x (b32); "
                             f"peak memory {r['peak_mb'] / ref['peak_mb']:.2f}x of anomalib's.")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        cfg = json.loads(Path(sys.argv[3]).read_text())
        result = run_anomalib(cfg) if sys.argv[2] == "anomalib" else run_ours(cfg)
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--anomalib-python", default="/work/anomalib-venv/bin/python")
    ap.add_argument("--data", nargs="+", default=["synthetic", "elpv"], choices=["synthetic", "elpv"])
    ap.add_argument("--epochs", type=int, default=3, help="epochs on ELPV")
    ap.add_argument("--synthetic-epochs", type=int, default=10)
    ap.add_argument("--ups", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr-scale", type=float, default=1.0, help="ours; 1 = anomalib's learning rates")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--with-classifier", action="store_true",
                    help="also run ours with train_unused_classifier=True (the reference trains the classification "
                         "head even when the map maximum scores)")
    ap.add_argument("--out", default=str(HERE / "results" / "supersimplenet.md"))
    driver(ap.parse_args())


if __name__ == "__main__":
    main()
