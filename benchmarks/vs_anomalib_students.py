"""STFPM and EfficientAD: defectscope against anomalib 2.7, side by side (issue 14).

Run by hand (not in CI); anomalib in its own environment (see benchmarks/vs_anomalib.py):

    .venv/bin/python benchmarks/vs_anomalib_students.py --anomalib-python /work/anomalib-venv/bin/python

Reuses benchmarks/vs_anomalib.py (data folders, packaged EfficientNet-Lite0 weights re-keyed to
timm, image loading, throughput, peak RSS, metrics; its SuperSimpleNet worker for the comparison
row). Every run is its own process, one at a time, with ``--threads`` torch threads.

Same teacher, same work on both sides:

- STFPM: teacher = packaged EfficientNet-Lite0 (resnet18 weights are not on this machine), layers
  blocks.1 / blocks.2 / blocks.4 (strides 4 / 8 / 16: what our Stfpm falls back to), the same
  weights loaded into anomalib's timm teacher, random students; our model's Lite0 normalisation for
  both; 256 px, batch ``--batch``, same epochs; each library's own SGD (lr 0.4, momentum 0.9;
  weight decay 1e-4 ours, 1e-3 anomalib).
- EfficientAD-S: the same PDN-S teacher file (``--teacher``, made by ``defectscope distill-teacher``),
  re-keyed to anomalib's names and placed where anomalib loads it (XDG_CACHE_HOME points its
  cache at the bench folder: it never downloads); the same penalty images (random crops of
  scikit-image pictures, written as an ImageFolder) for both; batch 1; the same steps (epochs x
  images); anomalib's map quantiles fitted on the training images after fit (as our Engine does
  with val_fraction=0), inside the timed training.
- Our Engine runs with val_fraction=0 for STFPM and EfficientAD, so both sides train on the same
  images. SuperSimpleNet (comparison row) runs at our defaults (val_fraction 0.2, upscale 1).

Inference speed does not depend on the data set, so it is measured on the synthetic runs only
(``--speed-on``). EfficientAD on ELPV is trained on every ``--elpv-effad-stride``-th training image
and scored on every ``--elpv-effad-test-stride``-th test image (the same images for both), to fit
the time. Writes ``--out`` (benchmarks/results/students.md) after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
os.environ.setdefault("BENCH_DIR", "/tmp/students_bench")
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import vs_anomalib as va  # noqa: E402
from vs_anomalib import load_tensors, metrics_for, peak_rss_mb, prepare, throughput, timm_pretrained_from  # noqa: E402

WORK = va.WORK
STFPM_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]


# ---------------------------------------------------------------- helpers (both envs)
def save_maps(maps, name: str) -> str:
    import torch

    path = WORK / f"maps_{name}.pt"
    torch.save(maps.float(), path)  # float32: STFPM's raw maps are products of small distances
    return str(path)


def images_for(cfg: dict, paths: list[str]):
    """Pre-loaded tensors: normalised with ``cfg['mean'/'std']``, or in [0, 1] (mean 0, std 1)."""
    import torch

    x = load_tensors(paths, cfg["size"]) * 0.5 + 0.5  # load_tensors normalises with Lite0's 0.5 / 0.5
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def score_and_time(cfg: dict, fn, split, floor=None) -> dict:
    """Scores / maps of the test images through ``fn`` (batches of 32), then images/s at batch 1
    and 32 for the library call and the floor, and the floor's FLOPs (speed runs only)."""
    import torch

    images = images_for(cfg, cfg["test_paths"])
    scores, maps = [], []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            s, m = split(fn(images[i : i + 32]))
            scores.append(s.reshape(-1).float())
            maps.append(m.reshape(len(s.reshape(-1)), *m.shape[-2:]).float())
    out = dict(scores=torch.cat(scores).tolist(), maps=save_maps(torch.cat(maps), cfg["name"]))
    if cfg["speed"]:
        return {**out, **speed(cfg, fn, images, floor)}
    return out


def speed(cfg: dict, fn, images, floor=None) -> dict:
    import torch

    out = {"ips_b1": throughput(fn, images, 1, cfg["reps"]), "ips_b32": throughput(fn, images, 32, cfg["reps32"])}
    if floor is not None:
        out["floor_ips_b1"] = throughput(floor, images, 1, cfg["reps"])
        out["floor_ips_b32"] = throughput(floor, images, 32, cfg["reps32"])
        from torch.utils.flop_counter import FlopCounterMode

        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            floor(images[:1])
        out["gflops"] = counter.get_total_flops() / 1e9
    return out


# ---------------------------------------------------------------- anomalib side
def anomalib_common(cfg: dict):
    import torch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    from anomalib.engine import Engine

    dm = va.anomalib_datamodule(cfg)
    engine_kw = dict(accelerator="cpu", devices=1, logger=False, limit_val_batches=0,
                     default_root_dir=str(WORK / "anomalib_runs"))
    return dm, Engine, engine_kw


def run_anomalib_stfpm(cfg: dict) -> dict:
    from anomalib.models import Stfpm
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    dm, Engine, engine_kw = anomalib_common(cfg)
    pre = PreProcessor(transform=Compose([Resize((cfg["size"], cfg["size"]), antialias=True),
                                          Normalize(cfg["mean"], cfg["std"])]))
    with timm_pretrained_from(cfg["weights"]):
        model = Stfpm(backbone="tf_efficientnet_lite0", layers=cfg["layers"], pre_processor=pre, evaluator=False,
                      visualizer=False)
    engine = Engine(max_epochs=cfg["epochs"], **engine_kw)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    train_s = time.perf_counter() - start
    net = model.model.eval()
    result = score_and_time(cfg, lambda x: net(x), lambda o: (o.pred_score, o.anomaly_map))
    return dict(train_s=train_s, peak_mb=peak_rss_mb(), steps=int(engine.trainer.global_step), **result)


def run_anomalib_effad(cfg: dict) -> dict:
    from anomalib.models import EfficientAd
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Resize

    dm, Engine, engine_kw = anomalib_common(cfg)
    pre = PreProcessor(transform=Compose([Resize((cfg["size"], cfg["size"]), antialias=True)]))
    model = EfficientAd(imagenet_dir=cfg["penalty_dir"], model_size="small", pre_processor=pre, evaluator=False,
                        visualizer=False)
    engine = Engine(max_epochs=cfg["epochs"], **engine_kw)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    # Map quantiles: anomalib fits them on validation good images (on_validation_start); here on
    # the training images, as our Engine does with val_fraction=0.
    model.model.quantiles.update(model.map_norm_quantiles(dm.train_dataloader()))
    train_s = time.perf_counter() - start
    net = model.model.eval()
    result = score_and_time(cfg, lambda x: net(x), lambda o: (o.pred_score, o.anomaly_map))
    return dict(train_s=train_s, peak_mb=peak_rss_mb(), steps=int(engine.trainer.global_step), **result)


# ---------------------------------------------------------------- defectscope side
def ours_engine(cfg: dict):
    from defectscope.engine import Engine

    return Engine(results_path=WORK / "ours_runs", run_name=cfg["name"], max_epochs=cfg["epochs"],
                  batch_size=cfg["batch"], seed=cfg["seed"], accelerator="cpu", progress=False, resume=False,
                  val_fraction=0.0)


def run_ours_stfpm(cfg: dict) -> dict:
    import torch

    from defectscope.data import Sample
    from defectscope.models import Stfpm

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    model = Stfpm(backbone="efficientnet_lite0", layers=cfg["layers"], image_size=cfg["size"], visualizer=False)
    engine = ours_engine(cfg)
    start = time.perf_counter()
    engine.fit(model, [Sample(p, 0) for p in cfg["train_paths"]])
    train_s = time.perf_counter() - start
    model.eval()

    def floor(x):  # the two networks, bare
        return model.feature_extractor(x), model.student(x)

    result = score_and_time(cfg, lambda x: model(x), lambda o: (o[1], o[0]), floor)
    return dict(train_s=train_s, peak_mb=peak_rss_mb(), **result)


def run_ours_effad(cfg: dict) -> dict:
    import torch

    from defectscope.data import Sample
    from defectscope.models import EfficientAd

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    model = EfficientAd(imagenet_dir=cfg["penalty_dir"], teacher_weights=cfg["teacher"], model_size="s",
                        image_size=cfg["size"], visualizer=False)
    engine = ours_engine(cfg)
    start = time.perf_counter()
    engine.fit(model, [Sample(p, 0) for p in cfg["train_paths"]])
    train_s = time.perf_counter() - start
    model.eval()

    def floor(x):  # teacher, student and autoencoder, bare
        return model.feature_extractor.pdn(x), model.student(x), model.autoencoder(x)

    result = score_and_time(cfg, lambda x: model(x), lambda o: (o[1], o[0]), floor)
    return dict(train_s=train_s, peak_mb=peak_rss_mb(), penalty=model.penalty_info, **result)


def run_ours_ssn(cfg: dict) -> dict:
    return va.run_ours(cfg)  # our defaults (val_fraction 0.2), upscale 1, its own timing


WORKERS = {"anomalib_stfpm": run_anomalib_stfpm, "anomalib_effad": run_anomalib_effad, "ours_stfpm": run_ours_stfpm,
           "ours_effad": run_ours_effad, "ours_ssn": run_ours_ssn}


# ---------------------------------------------------------------- driver (our env)
def write_penalty_dir(size: int, count: int) -> Path:
    """Our offline penalty source (random crops of scikit-image pictures) as an ImageFolder."""
    from PIL import Image

    from defectscope.models.efficientad import penalty_images

    folder = WORK / "penalty" / "class0"
    if len(list(folder.glob("*.png"))) != count:
        folder.mkdir(parents=True, exist_ok=True)
        images, _ = penalty_images(None, (2 * size, 2 * size), count=count)
        for i, x in enumerate(images):
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder.parent


def write_anomalib_teacher(src: str) -> Path:
    """Our PDN file re-keyed to anomalib's names, where anomalib loads it (XDG_CACHE_HOME)."""
    import torch

    from defectscope.models.efficientad import load_teacher

    pdn = load_teacher(src, "s", 384, False).pdn
    state = {k.removeprefix("layers."): v for k, v in pdn.state_dict().items()}
    cache = WORK / "xdg_cache"
    target = cache / "anomalib" / "pre_trained" / "efficientad_pretrained_weights" / "pretrained_teacher_small.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return cache


def subset_root(info: dict, train_stride: int, test_stride: int) -> dict:
    """Every n-th training and test image of a prepared ELPV split, in its own folder tree."""
    root = WORK / "elpv_mono_effad"
    train = info["train_paths"][::train_stride]
    keep = list(range(0, len(info["test_paths"]), test_stride))
    for sub, paths in (("train/good", train), ("test/good", [info["test_paths"][i] for i in keep if info["labels"][i] == 0]),
                       ("test/defect", [info["test_paths"][i] for i in keep if info["labels"][i] == 1])):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for p in paths:
            link = root / sub / Path(p).name
            if not link.exists():
                link.symlink_to(Path(p).resolve())
    return dict(info, root=str(root), train_paths=train, test_paths=[info["test_paths"][i] for i in keep],
                labels=[info["labels"][i] for i in keep])


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def driver(args) -> None:
    import torch

    from defectscope.backbones.weights import resolve_weights
    from defectscope.models import Stfpm

    WORK.mkdir(parents=True, exist_ok=True)
    weights = WORK / "tf_efficientnet_lite0_timm.pth"
    state, _ = resolve_weights("efficientnet_lite0")
    torch.save(dict(state), weights)
    probe = Stfpm(backbone="efficientnet_lite0", layers=STFPM_LAYERS, visualizer=False)
    lite_mean, lite_std = list(probe.mean), list(probe.std)
    from defectscope.models.efficientad import TeacherConfig

    pdn_mean, pdn_std = list(TeacherConfig().mean), list(TeacherConfig().std)
    del probe
    penalty_dir = write_penalty_dir(args.size, args.penalty_images)
    xdg = write_anomalib_teacher(args.teacher)
    meta = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), load_start=loadavg(), lite_mean=lite_mean, lite_std=lite_std,
                pdn_mean=pdn_mean, penalty_dir=str(penalty_dir))
    rows: list[tuple[str, str, str, dict, dict]] = []  # data, model, side label, cfg summary, result
    for data in args.data:
        info = prepare(data, args.size)
        speed_run = data in args.speed_on
        base = dict(data=data, size=args.size, seed=0, threads=args.threads, reps=args.reps, reps32=args.reps32,
                    weights=str(weights), speed=speed_run, **info)
        stfpm_ep = args.stfpm_epochs_elpv if data == "elpv" else args.stfpm_epochs_synthetic
        effad_ep = args.effad_epochs_elpv if data == "elpv" else args.effad_epochs_synthetic
        effad_info = subset_root(info, args.elpv_effad_stride, args.elpv_effad_test_stride) if data == "elpv" else info
        stfpm = dict(base, batch=args.batch, epochs=stfpm_ep, layers=STFPM_LAYERS, mean=lite_mean, std=lite_std)
        effad = dict(base, **{k: effad_info[k] for k in ("root", "train_paths", "test_paths", "labels")}, batch=1,
                     epochs=effad_ep, penalty_dir=str(penalty_dir), teacher=args.teacher)
        ssn = dict(base, batch=args.batch, epochs=args.ssn_epochs, up=1, lr_scale=1.0, mean=va.LITE_MEAN, std=va.LITE_STD)
        runs = []
        if "stfpm" in args.models:
            runs += [("STFPM", "anomalib 2.7", "anomalib_stfpm", stfpm), ("STFPM", "defectscope", "ours_stfpm", stfpm)]
        if "ssn" in args.models:
            runs += [("SuperSimpleNet", "defectscope (defaults, upscale 1)", "ours_ssn", ssn)]
        if "efficientad" in args.models:
            runs += [("EfficientAD-S", "anomalib 2.7", "anomalib_effad", dict(effad, mean=[0, 0, 0], std=[1, 1, 1])),
                     ("EfficientAD-S", "defectscope", "ours_effad", dict(effad, mean=pdn_mean, std=pdn_std))]
        for model_name, label, worker, cfg in runs:
            cfg = dict(cfg, name=f"{data}_{worker}")
            cfg_path = WORK / "cfg.json"
            cfg_path.write_text(json.dumps(cfg))
            env = dict(os.environ, XDG_CACHE_HOME=str(xdg))
            python = args.anomalib_python if worker.startswith("anomalib") else sys.executable
            print(f"== {data}: {model_name} {label} (load {loadavg()})", flush=True)
            load_before = loadavg()
            proc = subprocess.run([python, __file__, "--worker", worker, str(cfg_path)], capture_output=True, text=True,
                                  env=env)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-5000:])
                rows.append((data, model_name, label, cfg, {"error": proc.stderr.strip().splitlines()[-1][:300]}))
                write_report(args, meta, rows)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result.update(metrics_for(result, {"labels": cfg["labels"], "masks": cfg["masks"]}, args.size))
            result.update(load_before=load_before, load_after=loadavg(), n_train=len(cfg["train_paths"]),
                          n_test=len(cfg["test_paths"]), epochs=cfg["epochs"], batch=cfg["batch"])
            print({k: v for k, v in result.items() if k not in ("scores", "maps")}, flush=True)
            rows.append((data, model_name, label, cfg, result))
            write_report(args, meta, rows)
    meta["load_end"] = loadavg()
    write_report(args, meta, rows)


def write_report(args, meta: dict, rows) -> None:
    import torch

    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        "# STFPM and EfficientAD: defectscope vs anomalib 2.7 (issue 14)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {args.threads} torch "
        f"thread(s) per process, one process at a time, torch {torch.__version__}. Started {meta['started']}; load "
        f"average (1/5/15 min) at start {meta['load_start']}" + (f", at end {meta['load_end']}" if "load_end" in meta else "")
        + " (other work was running on the machine; per-run loads in the last table).",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/vs_anomalib_students.py', *sys.argv[1:]])}`.",
        "",
        "| data | model | implementation | train imgs | test imgs | epochs x batch | steps | train s | peak MiB | "
        "img/s b1 | img/s b32 | image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data, model, label, cfg, r in rows:
        if "error" in r:
            lines.append(f"| {data} | {model} | {label} | failed: {r['error']} |")
            continue
        n_used = r["n_train"] if "ssn" not in cfg["name"] else f"{r['n_train']} (80 % trained)"
        steps = r.get("steps", "")
        if not steps and "ssn" not in cfg["name"]:
            steps = -(-r["n_train"] // r["batch"]) * r["epochs"]
        lines.append(
            f"| {data} | {model} | {label} | {n_used} | {r['n_test']} | {r['epochs']} x {r['batch']} | {steps} | "
            f"{r['train_s']:.0f} | {r['peak_mb']:.0f} | {fmt(r.get('ips_b1'), 2)} | {fmt(r.get('ips_b32'), 2)} | "
            f"{fmt(r.get('image_auroc'))} | {fmt(r.get('pixel_auroc'))} | {fmt(r.get('aupro'))} |")
    lines += ["", "Floor (our bare networks on pre-loaded tensors; STFPM: teacher + student; EfficientAD: teacher, "
              "student, autoencoder; SuperSimpleNet: backbone, adaptor, segmentation head):", "",
              "| data | model | GFLOP / image | floor img/s b1 | floor img/s b32 | floor / ours b1 | floor / ours b32 |",
              "|---|---|---|---|---|---|---|"]
    for data, model, label, cfg, r in rows:
        if "floor_ips_b1" in r:
            lines.append(f"| {data} | {model} | {r['gflops']:.2f} | {r['floor_ips_b1']:.2f} | {r['floor_ips_b32']:.2f} | "
                         f"{r['floor_ips_b1'] / r['ips_b1']:.2f}x | {r['floor_ips_b32'] / r['ips_b32']:.2f}x |")
    lines += ["", "Ratios against the targets (ours vs anomalib, same data, same run):", ""]
    for data, model, label, cfg, r in rows:
        if label != "defectscope" or "error" in r:
            continue
        ref = next((x for d, m, lab, _, x in rows if d == data and m == model and lab.startswith("anomalib")), None)
        if ref is None or "error" in ref:
            continue
        parts = []
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            if key in r and key in ref:
                parts.append(f"{key} {r[key]:.3f} vs {ref[key]:.3f} ({'met' if r[key] >= ref[key] else 'MISSED'})")
        t = r["train_s"] / ref["train_s"]
        parts.append(f"training time {t:.2f}x of anomalib's (target <= 0.5: {'met' if t <= 0.5 else 'MISSED'})")
        if "ips_b1" in r and "ips_b1" in ref:
            for b in (1, 32):
                s = r[f"ips_b{b}"] / ref[f"ips_b{b}"]
                f = r[f"floor_ips_b{b}"] / r[f"ips_b{b}"]
                parts.append(f"inference b{b} {s:.2f}x anomalib's (target >= 1.5: {'met' if s >= 1.5 else 'MISSED'}), "
                             f"floor {f:.2f}x ours (target <= 1.25: {'met' if f <= 1.25 else 'MISSED'})")
        m = r["peak_mb"] / ref["peak_mb"]
        parts.append(f"peak memory {m:.2f}x of anomalib's (target <= 1: {'met' if m <= 1 else 'MISSED'})")
        lines.append(f"- {data}, {model}: " + "; ".join(parts) + ".")
    lines += ["", "Load average (1/5/15 min) before and after each run:", ""]
    for data, model, label, cfg, r in rows:
        if "load_before" in r:
            lines.append(f"- {data}, {model}, {label}: {r['load_before']} -> {r['load_after']}")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append_to and Path(args.append_to).exists():
        text = Path(args.append_to).read_text() + "\n" + text
    out.write_text(text)
    print(text, flush=True)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        cfg = json.loads(Path(sys.argv[3]).read_text())
        print(json.dumps(WORKERS[sys.argv[2]](cfg)))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--anomalib-python", default="/work/anomalib-venv/bin/python")
    ap.add_argument("--data", nargs="+", default=["synthetic", "elpv"], choices=["synthetic", "elpv"])
    ap.add_argument("--models", nargs="+", default=["stfpm", "ssn", "efficientad"], choices=["stfpm", "ssn", "efficientad"])
    ap.add_argument("--speed-on", nargs="*", default=["synthetic"], help="data sets whose runs measure inference speed")
    ap.add_argument("--stfpm-epochs-synthetic", type=int, default=10)
    ap.add_argument("--stfpm-epochs-elpv", type=int, default=1)
    ap.add_argument("--effad-epochs-synthetic", type=int, default=1)
    ap.add_argument("--effad-epochs-elpv", type=int, default=1)
    ap.add_argument("--elpv-effad-stride", type=int, default=9, help="EfficientAD on ELPV: every n-th training image")
    ap.add_argument("--elpv-effad-test-stride", type=int, default=4, help="EfficientAD on ELPV: every n-th test image")
    ap.add_argument("--ssn-epochs", type=int, default=3)
    ap.add_argument("--teacher", default="/tmp/efficientad_teacher/teacher_s_lite0.pth")
    ap.add_argument("--penalty-images", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="STFPM and SuperSimpleNet (EfficientAD: 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions at batch 1")
    ap.add_argument("--reps32", type=int, default=1, help="timed repetitions at batch 32")
    ap.add_argument("--out", default=str(HERE / "results" / "students.md"))
    ap.add_argument("--append-to", default=None, help="prepend this file's text (to join runs done in parts)")
    driver(ap.parse_args())


if __name__ == "__main__":
    main()
