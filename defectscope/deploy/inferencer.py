"""Run an exported model without PyTorch: onnxruntime or OpenVINO, plus Pillow and numpy.

::

    from defectscope.deploy import load_inferencer

    inf = load_inferencer("export/model.onnx")        # or model.xml, or the export folder
    batch = np.stack([inf.preprocess(p) for p in paths])   # uint8 [B,H,W,3] at inf.image_size
    scores, maps = inf.predict(batch)                  # [B] float32, [B,H,W] float32
    defects = scores >= inf.threshold

Images are read as training read them (defectscope/data/images.py: EXIF orientation, grey, 16-bit,
palette and alpha rules, with the same notices) and resized as training resized them (bilinear,
antialiased, on float values); only the last rounding to uint8 differs from training, by at most
half a grey level.

This module imports neither torch nor defectscope's torch-based modules.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Inferencer", "load_inferencer", "preprocess_image", "read_image"]

EXTRA = "pip install 'defectscope[export]'"
RUNTIMES = ("onnxruntime", "openvino")


def _images_module():
    """defectscope/data/images.py (numpy and Pillow only) without defectscope.data's package
    __init__, which imports torch for its Dataset."""
    name = "defectscope.data.images"
    if name in sys.modules:
        return sys.modules[name]
    if "defectscope.data" in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "data" / "images.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def read_image(image, wide_range: str | None = None):
    """A path, PIL image or numpy array -> 8-bit RGB PIL image, by training's reading rules."""
    from PIL import Image

    images = _images_module()
    if isinstance(image, (str, Path)):
        return images.load_image(Path(image), wide_range=wide_range)
    if isinstance(image, Image.Image):
        return images.pil_to_rgb(image, wide_range=wide_range)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[:, :, :3]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
            raise ValueError(f"expected an image array HxW or HxWx3 (RGB), got shape {image.shape}")
        if array.dtype == np.uint8:
            return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
        if array.dtype.kind == "f":
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise ValueError("float image arrays must hold finite values in [0, 1]")
            return Image.fromarray(np.rint(np.asarray(array, np.float64) * 255).astype(np.uint8)).convert("RGB")
        if array.dtype == np.uint16 and array.ndim == 2:
            return images.pil_to_rgb(Image.fromarray(array), wide_range=wide_range)
        raise ValueError(f"image arrays must be uint8, uint16 grey or float in [0, 1], got {array.dtype}")
    raise TypeError(f"expected a path, PIL image or numpy array, got {type(image).__name__}")


def resize_rgb(rgb, size: tuple[int, int]) -> np.ndarray:
    """8-bit RGB PIL image -> uint8 ``[h, w, 3]`` at ``size`` (h, w): Pillow's bilinear filter,
    antialiased when shrinking, on float values per channel (the resize training does with
    torch.nn.functional.interpolate(..., mode="bilinear", antialias=True)), then rounded."""
    from PIL import Image

    h, w = size
    if rgb.size == (w, h):
        return np.asarray(rgb, dtype=np.uint8).copy()
    channels = []
    for band in rgb.split():
        values = Image.fromarray(np.asarray(band, dtype=np.float32))  # mode "F"
        channels.append(np.asarray(values.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32))
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def preprocess_image(image, size: tuple[int, int], wide_range: str | None = None) -> np.ndarray:
    """Path / PIL image / numpy array -> uint8 RGB ``[h, w, 3]`` at ``size`` (h, w)."""
    return resize_rgb(read_image(image, wide_range), tuple(int(s) for s in size))


def _find_meta(path: Path) -> tuple[Path, dict]:
    """The export JSON for a model file or an export folder."""
    if path.is_dir():
        found = []
        for candidate in sorted(path.glob("*.json")):
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("format") == "defectscope-export":
                found.append((candidate, data))
        if not found:
            raise FileNotFoundError(
                f"No exported model in '{path}': no <name>.json written by `defectscope export` there. "
                "Fix: pass the .onnx / .xml file, or export the model first."
            )
        if len(found) > 1:
            raise ValueError(f"'{path}' holds {len(found)} exported models ({', '.join(p.name for p, _ in found)}); "
                             "pass the .onnx or .xml file of the one to use.")
        return found[0]
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"'{path}' has no '{meta_path.name}' beside it: the JSON written by `defectscope export` (image size, "
            "threshold, ROI). Fix: keep the files of an export together."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as err:
        raise ValueError(f"'{meta_path}' is not valid JSON ({err}). Fix: export the model again.") from err
    if not isinstance(meta, dict) or meta.get("format") != "defectscope-export":
        raise ValueError(f"'{meta_path}' is not a defectscope export description. Fix: export the model again.")
    return meta_path, meta


def _require(module: str, why: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{why} needs the Python package '{module}', which is not installed ({err}). "
                          f"Fix: {EXTRA} (or pip install {module}).") from err


class Inferencer:
    """An exported model ready to run. Attributes: ``model_name``, ``image_size`` (h, w),
    ``threshold`` (image score verdict), ``pixel_threshold`` (map regions), ``roi`` (bool ``[h, w]``
    mask already applied inside the graph, or None), ``meta`` (the export JSON), ``runtime``,
    ``precision``, ``path``."""

    def __init__(self, path: str | Path, runtime: str | None = None, threads: int | None = None,
                 precision: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No exported model at '{path}': the path does not exist.")
        meta_path, meta = _find_meta(path)
        version = meta.get("format_version")
        if not isinstance(version, int) or version > 1:
            raise ValueError(f"'{meta_path}' has export format version {version!r}; this defectscope reads version 1. "
                             "Fix: run it with the defectscope version that exported it.")
        model_file = path if path.is_file() and path.suffix in (".onnx", ".xml") else meta_path.parent / meta["file"]
        if not model_file.is_file():
            raise FileNotFoundError(f"'{meta_path}' names the model file '{meta['file']}', which is not beside it.")
        self.path = model_file
        self.meta: dict[str, Any] = meta
        self.model_name: str = meta["model"]
        self.image_size: tuple[int, int] = (int(meta["image_size"][0]), int(meta["image_size"][1]))
        self.threshold: float = float(meta["threshold"])
        pixel = meta.get("pixel_threshold")
        self.pixel_threshold: float = float(pixel) if pixel is not None else self.threshold
        self.precision: str = precision or meta.get("precision", "f32")
        self.wide_range: str | None = meta.get("wide_range")
        self.input_dtype = np.uint8 if meta.get("input", {}).get("dtype", "uint8") == "uint8" else np.float32
        # {"tile", "overlap"} of a model trained on tiles (the graph scores one tile), else None.
        self.tiling: dict | None = meta.get("tiling")
        self.roi: np.ndarray | None = None
        roi = meta.get("roi")
        if isinstance(roi, dict) and roi.get("mask_file") and (meta_path.parent / roi["mask_file"]).is_file():
            from PIL import Image

            with Image.open(meta_path.parent / roi["mask_file"]) as mask:
                self.roi = np.asarray(mask.convert("L")) > 127
        if model_file.suffix == ".xml":
            runtime = runtime or "openvino"
            if runtime != "openvino":
                raise ValueError(f"'{model_file.name}' is an OpenVINO model; it runs with runtime='openvino'.")
        if runtime is None:
            runtime = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "openvino"
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.runtime = runtime
        self.threads = threads
        if runtime == "onnxruntime":
            ort = _require("onnxruntime", f"Running '{model_file.name}'")
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
            self._session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
            self._run = self._run_onnxruntime
        else:
            ov = _require("openvino", f"Running '{model_file.name}'")
            # The precision is set explicitly: OpenVINO's CPU plugin runs in bf16 by itself on CPUs
            # that have it (maps move by about 0.1), unless told f32.
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            self._compiled = ov.Core().compile_model(str(model_file), "CPU", config)
            self._request = self._compiled.create_infer_request()
            self._run = self._run_openvino

    def __repr__(self) -> str:
        return (f"Inferencer({self.model_name}, {self.path.name}, {self.runtime} {self.precision}, "
                f"image_size={self.image_size}, threshold={self.threshold:.4g})")

    # ---- input ----------------------------------------------------------------------------
    def read(self, image) -> np.ndarray:
        """Path / PIL image / numpy array -> uint8 RGB ``[H, W, 3]`` at its own size, read by
        training's rules (what outputs are drawn on)."""
        return np.asarray(read_image(image, self.wide_range), dtype=np.uint8)

    def preprocess(self, image) -> np.ndarray:
        """Path / PIL image / numpy array -> uint8 RGB ``[h, w, 3]`` at :attr:`image_size`, read and
        resized as training did."""
        return preprocess_image(image, self.image_size, self.wide_range)

    def _batch(self, batch) -> np.ndarray:
        h, w = self.image_size
        if isinstance(batch, np.ndarray) and batch.ndim == 4:
            array = batch
        elif isinstance(batch, np.ndarray) and batch.ndim == 3 and batch.shape[-1] == 3:
            array = batch[None]
        elif isinstance(batch, (list, tuple)):
            if not batch:
                raise ValueError("predict got an empty list of images")
            items = [b if isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.shape == (h, w, 3)
                     else self.preprocess(b) for b in batch]
            array = np.stack(items)
        else:
            raise TypeError("predict takes a uint8 array [B,H,W,3] (or [H,W,3]) at the model's image size, or a "
                            f"list of images (paths, PIL images, arrays), got {type(batch).__name__}")
        if array.shape[1:] != (h, w, 3):
            raise ValueError(f"predict expects images [B,{h},{w},3] (the model's image size, RGB), got "
                             f"{tuple(array.shape)}. Fix: pass each image through preprocess() first.")
        if array.dtype != np.uint8:
            raise ValueError(f"predict expects uint8 images (0..255), got {array.dtype}. Fix: preprocess() them.")
        if self.input_dtype != np.uint8:
            return np.ascontiguousarray(array, dtype=np.float32) / np.float32(255.0)
        return np.ascontiguousarray(array)

    # ---- running --------------------------------------------------------------------------
    def predict(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """Images -> ``(scores [B] float32, maps [B,H,W] float32)``; ``batch`` is a uint8 array
        ``[B,H,W,3]`` at :attr:`image_size` or a list of images (each preprocessed if needed)."""
        scores, maps = self._run(self._batch(batch))
        return np.asarray(scores, dtype=np.float32).reshape(-1), np.asarray(maps, dtype=np.float32)

    def _run_onnxruntime(self, images: np.ndarray):
        return self._session.run(["score", "map"], {"image": images})

    def _run_openvino(self, images: np.ndarray):
        result = self._request.infer({0: images})
        return (result[self._compiled.output("score")].copy(), result[self._compiled.output("map")].copy())


def load_inferencer(path: str | Path, runtime: str | None = None, threads: int | None = None,
                    precision: str | None = None) -> Inferencer:
    """An :class:`Inferencer` for an exported ``.onnx`` / ``.xml`` file or its export folder.
    ``runtime``: ``"onnxruntime"`` or ``"openvino"`` (default: OpenVINO for ``.xml``, else
    onnxruntime when installed); ``threads``: intra-op threads (default: the runtime's);
    ``precision``: override the OpenVINO inference precision recorded at export."""
    return Inferencer(path, runtime=runtime, threads=threads, precision=precision)
