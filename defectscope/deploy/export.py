"""Export a trained model to one self-contained ONNX graph (or OpenVINO IR) and a JSON beside it.

The graph holds everything between an image batch and the verdict's numbers::

    image [B,H,W,3] uint8 RGB (or float 0..1)  ->  /255, NCHW, (x - mean) / std
      -> the model's forward (backbone, heads, map upscaling, smoothing, image score, ROI)
      -> score [B] float32, map [B,H,W] float32

B is dynamic; H, W are the model's image size (the inferencer resizes images to it as training
did, :mod:`defectscope.deploy.inferencer`). The JSON (``<name>.json``) says what a runtime needs
beyond the graph: image size, thresholds, ROI, model name, format version, backbone fingerprint,
and the parity measured at export.

Exactness: every export is checked against PyTorch on sample images (float32: max abs
difference <= 1e-4 on maps and scores, or the export fails). Both ONNX exporters give the same
graph values: the Gaussian blur's matrices enter the graph as constants (models/common.py,
GaussianBlur2d._matmul_ready).

OpenVINO: the ONNX graph converted by ``openvino.convert_model`` and saved uncompressed (f32
weights); the inference precision is written into the IR's runtime options and the JSON and
set explicitly by the inferencer, because OpenVINO's CPU plugin picks bf16 by itself on CPUs
that have it, which moves maps by about 0.1. ``bf16`` / ``int8`` are used only when asked.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: Version of the export JSON (and of the graph's input / output contract).
EXPORT_FORMAT_VERSION = 1
FORMATS = ("onnx", "openvino")
PRECISIONS = ("f32", "bf16", "int8")
EXPORTERS = ("dynamo", "legacy")
INPUT_DTYPES = ("uint8", "float32")
#: Largest max abs difference from PyTorch accepted at float32 (maps and scores).
PARITY_TOLERANCE = 1e-4
#: What each export format needs, and the pip extra that installs it.
EXTRA = "pip install 'defectscope[export]'"


class ExportError(ValueError):
    """An export that cannot be done as asked, or whose graph does not match PyTorch."""


class MissingExportDependency(ImportError):
    """onnx / onnxruntime / onnxscript / openvino is not installed (the message names the extra)."""


def require(module: str, why: str):
    """``import module`` or a :class:`MissingExportDependency` naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        fix = f"pip install {package}" if package == "nncf" else f"{EXTRA} (or pip install {package})"
        raise MissingExportDependency(
            f"{why} needs the Python package '{package}', which is not installed ({err}). Fix: {fix}."
        ) from err


class ExportGraph(nn.Module):
    """The exported function: image batch ``[B,H,W,3]`` (uint8 0..255 or float 0..1) -> score ``[B]``,
    map ``[B,H,W]``; the same arithmetic as ``model.predict`` on images at the model's size."""

    def __init__(self, model, input_dtype: str = "uint8", apply_roi: bool = False) -> None:
        super().__init__()
        self.model = model
        self.input_dtype = input_dtype
        self.normalise = bool(model.pre_processor)
        self.apply_roi = apply_roi
        self.register_buffer("mean", torch.tensor(model.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).to(torch.float32)
        if self.input_dtype == "uint8":
            x = x / 255.0
        if self.normalise:
            x = (x - self.mean) / self.std
        maps, scores = self.model(x)
        if self.apply_roi:
            maps, scores = self.model.apply_roi(maps, scores)
        return scores.to(torch.float32).reshape(-1), maps[:, 0].to(torch.float32)


def _load(model_or_run_dir, category: str | None):
    from defectscope.models import AnomalyModel, load_model

    if isinstance(model_or_run_dir, AnomalyModel):
        return model_or_run_dir, None
    path = Path(model_or_run_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"Nothing to export at '{path}': the path does not exist. Fix: pass a run folder written by "
            "`defectscope train` (results/<project>/<group>/<run_name>) or its models/<n> folder."
        )
    return load_model(path, category=category), path


def _sample_images(model, count: int = 3, seed: int = 0) -> np.ndarray:
    """``count`` uint8 images ``[B,H,W,3]``: the model's own training / validation images when its
    records name readable ones (realistic maps), else smooth random pictures."""
    h, w = model.image_size
    found = []
    for key in ("validation_images", "train_images", "images"):
        names = model.data_info.get(key) if isinstance(model.data_info, dict) else None
        if isinstance(names, list):
            found += [Path(n) for n in names if isinstance(n, str) and Path(n).is_file()]
    images = []
    if found:
        from defectscope.deploy.inferencer import preprocess_image

        for path in found[:count]:
            try:
                images.append(preprocess_image(path, (h, w)))
            except (OSError, ValueError):  # an unreadable file: random pictures make up the count
                continue
    rng = np.random.default_rng(seed)
    while len(images) < count:
        base = rng.uniform(0, 255, size=(max(2, h // 8), max(2, w // 8), 3))
        up = np.kron(base, np.ones((8, 8, 1)))[:h, :w]
        up = np.pad(up, ((0, h - up.shape[0]), (0, w - up.shape[1]), (0, 0)), mode="edge")
        noise = rng.normal(0, 8, size=(h, w, 3))
        images.append(np.clip(up + noise, 0, 255).astype(np.uint8))
    return np.stack(images[:count])


def _roi_in_forward(model, graph: ExportGraph, images: np.ndarray) -> bool:
    """Whether the model's forward applies its ROI already (maps zero outside it)."""
    if not getattr(model, "has_roi", False):
        return True
    with torch.no_grad():
        _, maps = graph(torch.from_numpy(images))
    outside = (model.roi[0, 0] <= 0.5).cpu()
    return bool(outside.any()) and bool((maps[:, outside] == 0).all())


def export_onnx_file(graph: ExportGraph, example: torch.Tensor, path: Path, exporter: str = "dynamo",
                     opset: int | None = None) -> None:
    """Write ``graph`` to ``path`` as ONNX, batch dimension dynamic, one file (weights inside)."""
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    require("onnx", "ONNX export")
    names = {"input_names": ["image"], "output_names": ["score", "map"]}
    try:
        _export(graph, example, path, exporter, opset, names)
    except (ExportError, MissingExportDependency):
        raise
    except Exception as err:
        other = "legacy" if exporter == "dynamo" else "dynamo"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ExportError(
            f"The {exporter} ONNX exporter cannot export this {graph.model.name} model ({type(err).__name__}: {first}). "
            f"Fix: export with the {other} exporter (exporter='{other}', CLI: --exporter {other})."
        ) from err
    import onnx

    onnx.checker.check_model(str(path))


def _export(graph, example, path, exporter, opset, names) -> None:
    with warnings.catch_warnings():
        # The tracer's notes on Python ints taken from shapes (fixed image size by design) and the
        # exporters' deprecation / progress chatter.
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            require("onnxscript", "The dynamo ONNX exporter")
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(graph, (example,), None, dynamo=True, dynamic_shapes=({0: batch},),
                                        opset_version=opset, verbose=False, optimize=True, **names)
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset or 17,
                              dynamic_axes={"image": {0: "batch"}, "score": {0: "batch"}, "map": {0: "batch"}},
                              do_constant_folding=True, **names)


def run_onnx(path: Path, images: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ort = require("onnxruntime", "Checking the exported ONNX graph")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    score, maps = session.run(["score", "map"], {"image": images})
    return score, maps


def openvino_config(precision: str, threads: int | None = None) -> dict[str, Any]:
    """CPU plugin settings for ``precision`` (set explicitly: the plugin's own default is bf16 on
    CPUs that have it). int8 models run their quantised layers in int8 and the rest in f32."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def _to_openvino(onnx_path: Path, xml_path: Path, precision: str, calibration: np.ndarray | None) -> None:
    ov = require("openvino", "OpenVINO export")
    model = ov.convert_model(str(onnx_path))
    if precision == "int8":
        nncf = require("nncf", "OpenVINO int8 export (post-training quantisation)")
        dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
        model = nncf.quantize(model, dataset, subset_size=len(calibration))
    hint = "bf16" if precision == "bf16" else "f32"
    # Read by compile_model (OpenVINO >= 2024) so that any OpenVINO program gets this precision.
    model.set_rt_info(hint, ["runtime_options", "INFERENCE_PRECISION_HINT"])
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


def run_openvino(xml_path: Path, images: np.ndarray, precision: str = "f32",
                 threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ov = require("openvino", "Checking the exported OpenVINO model")
    compiled = ov.Core().compile_model(str(xml_path), "CPU", openvino_config(precision, threads))
    result = compiled(images)
    return np.asarray(result[compiled.output("score")]), np.asarray(result[compiled.output("map")])


def _json_value(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def export_model(
    model_or_run_dir,
    out_dir: str | Path,
    format: str = "onnx",
    precision: str = "f32",
    *,
    category: str | None = None,
    name: str = "model",
    exporter: str = "dynamo",
    input_dtype: str = "uint8",
    opset: int | None = None,
    check: bool = True,
    calibration_images: np.ndarray | None = None,
) -> Path:
    """Export a trained model (an :class:`~defectscope.models.AnomalyModel` or a run folder /
    ``models/<n>`` folder) into ``out_dir``; returns the model file (``<name>.onnx`` or
    ``<name>.xml`` with its ``.bin``), with ``<name>.json`` beside it.

    Args:
        format: ``"onnx"`` or ``"openvino"``.
        precision: ``"f32"`` (default; the only one for ONNX), ``"bf16"`` or ``"int8"`` (OpenVINO;
            int8 needs ``nncf`` and calibrates on ``calibration_images`` or the model's own images).
        category: which model of a multi-category run.
        exporter: ``"dynamo"`` (torch.export) or ``"legacy"`` (TorchScript tracer); both exact.
        input_dtype: the graph's input: ``"uint8"`` (0..255) or ``"float32"`` (0..1), NHWC RGB.
        check: run the exported file against PyTorch on sample images and refuse a float32 export
            whose maps or scores differ by more than :data:`PARITY_TOLERANCE` (bf16 / int8: the
            difference is measured and recorded, not enforced).
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if format == "onnx" and precision != "f32":
        raise ExportError(f"--precision {precision} is for --format openvino; an ONNX export is float32 (f32).")
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"input_dtype must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}")
    # Fail on a missing package before the model is loaded.
    require("onnx", "Export")
    if check:
        require("onnxruntime" if format == "onnx" else "openvino", "Checking the export")
    if format == "openvino":
        require("openvino", "OpenVINO export")
    if exporter == "dynamo":
        require("onnxscript", "The dynamo ONNX exporter")
    model, source = _load(model_or_run_dir, category)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--output '{out_dir}' is a file; export writes a folder. Fix: pass a folder path.")
    out_dir.mkdir(parents=True, exist_ok=True)

    was_training, device = model.training, model.threshold.device
    model.cpu().eval()
    try:
        samples = _sample_images(model)
        graph = ExportGraph(model, input_dtype=input_dtype)
        graph.apply_roi = not _roi_in_forward(model, graph, samples)
        feed = samples if input_dtype == "uint8" else samples.astype(np.float32) / 255.0
        with torch.no_grad():
            # Also fills the blur's matrix cache, so the matrices enter the graph as constants.
            ref_scores, ref_maps = (t.numpy() for t in graph(torch.from_numpy(feed)))
            example = torch.from_numpy(feed[:2])
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                onnx_tmp = Path(tmp) / f"{name}.onnx"
                export_onnx_file(graph, example, onnx_tmp, exporter=exporter, opset=opset)
                if format == "onnx":
                    target = out_dir / f"{name}.onnx"
                    shutil.move(str(onnx_tmp), target)
                else:
                    target = out_dir / f"{name}.xml"
                    calibration = calibration_images if calibration_images is not None else feed
                    _to_openvino(onnx_tmp, target, precision, calibration)
    finally:
        model.to(device).train(was_training)

    parity = None
    if check:
        if format == "onnx":
            scores, maps = run_onnx(target, feed)
        else:
            scores, maps = run_openvino(target, feed, precision)
        parity = {
            "reference": "PyTorch model.predict arithmetic (float32) on the same images",
            "images": len(feed),
            "max_abs_map": float(np.abs(maps - ref_maps).max()),
            "max_abs_score": float(np.abs(scores - ref_scores).max()),
            "tolerance": PARITY_TOLERANCE if precision == "f32" else None,
        }
        if precision == "f32" and max(parity["max_abs_map"], parity["max_abs_score"]) > PARITY_TOLERANCE:
            for path in (target, target.with_suffix(".bin")):
                path.unlink(missing_ok=True)
            raise ExportError(
                f"The exported {format} graph differs from PyTorch by {parity['max_abs_map']:.3g} on maps and "
                f"{parity['max_abs_score']:.3g} on scores (tolerance {PARITY_TOLERANCE:g}), so it was not kept "
                f"({target}). Fix: try exporter='legacy' / 'dynamo', and report this model's settings."
            )
    meta = build_meta(model, target, format=format, precision=precision, exporter=exporter,
                      input_dtype=input_dtype, source=source, parity=parity)
    if meta["roi"] is not None:
        from PIL import Image

        mask = (model.roi[0, 0].detach().cpu().numpy() > 0.5).astype(np.uint8) * 255
        Image.fromarray(mask).save(out_dir / meta["roi"]["mask_file"])
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target


def build_meta(model, target: Path, *, format: str, precision: str, exporter: str, input_dtype: str,
               source: Path | None, parity: dict | None) -> dict[str, Any]:
    """The export JSON: what a runtime needs beyond the graph (see the module docstring)."""
    import defectscope
    from defectscope.models.base import find_model_dir

    h, w = model.image_size
    threshold = float(model.threshold)
    pixel = getattr(model, "pixel_threshold", None)
    pixel = _json_value(pixel)
    data = model.data_info if isinstance(model.data_info, dict) else {}
    roi = None
    if getattr(model, "has_roi", False):
        roi = {**{k: _json_value(v) for k, v in dict(getattr(model, "roi_info", {}) or {}).items()},
               "applied_in_graph": True, "mask_file": f"{target.stem}_roi.png", "size": [h, w]}
    model_dir = None
    if source is not None:
        try:
            model_dir = str(find_model_dir(source, category=data.get("category")).resolve())
        except (OSError, ValueError):
            model_dir = str(Path(source).resolve())
    return {
        "format": "defectscope-export",
        "format_version": EXPORT_FORMAT_VERSION,
        "model": model.name,
        "file": target.name,
        "runtime": "onnxruntime" if format == "onnx" else "openvino",
        "precision": precision,
        "image_size": [h, w],
        "input": {"name": "image", "shape": ["batch", h, w, 3], "layout": "NHWC", "colour": "RGB",
                  "dtype": input_dtype, "range": [0, 255] if input_dtype == "uint8" else [0.0, 1.0]},
        "outputs": {"score": {"shape": ["batch"], "dtype": "float32"},
                    "map": {"shape": ["batch", h, w], "dtype": "float32"}},
        "resize": "images of another size are resized to image_size as in training: bilinear, antialiased "
                  "(Pillow BILINEAR on float values, then rounded to uint8)",
        "normalization": {"mean": list(model.mean), "std": list(model.std), "in_graph": bool(model.pre_processor)},
        "threshold": threshold,
        "threshold_info": {k: _json_value(v) for k, v in dict(model.threshold_info).items()},
        "pixel_threshold": float(pixel) if pixel is not None else threshold,
        "pixel_threshold_source": "model" if pixel is not None else "the image threshold (the model has no pixel threshold)",
        "roi": roi,
        # A model trained on tiles of large images (--tile): the graph scores one tile at image_size;
        # splitting an image into tiles and stitching their maps is the caller's (data/tiling.py).
        "tiling": {k: _json_value(v) for k, v in dict(getattr(model, "tiling_info", None) or {}).items()} or None,
        "backbone": model.hparams.get("backbone"),
        "backbone_fingerprint": model.feature_extractor.fingerprint,
        "category": data.get("category"),
        "wide_range": data.get("wide_range"),
        "source_model": model_dir,
        "exporter": exporter,
        "defectscope_version": defectscope.__version__,
        "torch_version": torch.__version__,
        "parity": parity,
    }
