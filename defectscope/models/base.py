"""What every defectscope model shares: a frozen backbone, pre-processing, ``predict`` and
saving / loading of its own weights.

A model keeps its constructor arguments in ``self.hparams`` so that ``params.json`` can
rebuild it; ``ckpt.pth`` holds only the trained parts (never the frozen backbone, whose
weights are resolved again on load and checked against a fingerprint).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.backbones import FeatureExtractor
from defectscope.models.model_files import (
    CKPT_NAME,
    FORMAT_VERSION,
    LEGACY_PARAMS_NAME,
    PARAMS_NAME,
    ModelFileError,
    load_tensors,
    read_params,
    save_tensors,
    to_plain,
    write_json,
    write_params,
)


class hybridmethod:
    """Method callable on the class (build a new object) or on an instance (update it)."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, cls):
        return functools.partial(self.func, cls, obj)


def atomic_save(obj: Any, path: str | Path, use_torch: bool = True) -> None:
    """Write ``obj`` to ``path`` through a temporary file and a rename, so a crash never leaves
    a half-written file where a good one was: with ``torch.save`` (tensors and plain data,
    readable weights-only) or, with ``use_torch=False``, as JSON."""
    if use_torch:
        save_tensors(obj, path)
    else:
        write_json(path, obj)


def _is_model_dir(folder: Path) -> bool:
    return (folder / CKPT_NAME).is_file() and ((folder / PARAMS_NAME).is_file() or (folder / LEGACY_PARAMS_NAME).is_file())


def model_category(folder: Path) -> str | None:
    """The category a model folder was trained on (None when its files do not say)."""
    try:
        params = read_params(folder)
    except ModelFileError:
        return None
    data = params.get("data")
    return data.get("category") if isinstance(data, dict) else None


def list_model_dirs(path: str | Path) -> list[Path]:
    """Model folders of a run folder (``models/<n>``) or of a ``models/`` folder, in index order."""
    path = Path(path)
    for root in (path / "models", path):
        if root.is_dir():
            found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and _is_model_dir(p)]
            if found:
                return sorted(found, key=lambda p: int(p.name))
    return []


def find_model_dir(path: str | Path, category: str | None = None) -> Path:
    """The model folder meant by ``path``: a run folder, its ``models/`` folder, ``models/<n>``,
    or a file in one (``ckpt.pth``, ``params.json``).

    A run with several models (one per category) needs ``category``, which picks the model
    trained on it; without one, the error lists what the run holds. A ``category`` that the
    chosen model was not trained on is refused too.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No trained model at '{path}': the path does not exist. Fix: pass a run folder such as "
            "results/<project>/<group>/<run_name> (written by `defectscope train`)."
        )
    if path.is_file():
        path = path.parent
    if _is_model_dir(path):
        folders = [path]
    else:
        folders = list_model_dirs(path)
    if not folders:
        raise FileNotFoundError(
            f"No trained model at '{path}': expected {CKPT_NAME} and {PARAMS_NAME} in it or in "
            "'models/<n>' below it (a run folder such as results/<project>/<group>/<run_name>). "
            "Train one with `defectscope train`."
        )
    held = [(folder, model_category(folder)) for folder in folders]
    if category is not None:
        matching = [folder for folder, cat in held if cat == category]
        if not matching and len(held) == 1 and held[0][1] is None:
            return held[0][0]  # an older model that does not record its category
        if not matching:
            raise ModelFileError(
                f"No model for category {category!r} in '{path}'; it holds: {_describe_models(held)}. "
                "Fix: pass one of those categories."
            )
        return matching[0]
    if len(held) > 1:
        raise ModelFileError(
            f"'{path}' holds {len(held)} models: {_describe_models(held)}. Fix: choose one with --category "
            "<name> (Python: category=...), or pass its models/<n> folder."
        )
    return held[0][0]


def _describe_models(held: list[tuple[Path, str | None]]) -> str:
    return ", ".join(f"models/{folder.name} ({cat or 'category not recorded'})" for folder, cat in held)


def _is_whole_image(image) -> bool:
    """A path, PIL image or ``HxWx3`` uint8 array (what tiled prediction takes)."""
    from PIL import Image

    if isinstance(image, (str, Path, Image.Image)):
        return True
    return isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


class AnomalyModel(nn.Module):
    """Base class: frozen backbone, pre-processing record, fitted threshold, predict, save/load."""

    name = "model"
    #: The constructor argument that names the frozen part's weights file (load_from_path's ``weights``).
    frozen_weights_arg = "weights"

    def __init__(
        self,
        backbone: str,
        layers=None,
        image_size: int | tuple[int, int] = 256,
        weights: str | None = None,
        pretrained: bool = True,
        pre_processor: bool = True,
        post_processor: bool = True,
        evaluator: bool = True,
        visualizer: bool = True,
        feature_extractor: nn.Module | None = None,
    ) -> None:
        """``feature_extractor`` replaces the timm backbone ``backbone`` names (e.g. EfficientAD's
        PDN teacher). It must have what the base and the engine read from a FeatureExtractor:
        ``layers``, ``channels``, ``fingerprint`` (str), ``weights_source`` (str) and
        ``config.mean`` / ``config.std`` (the input normalisation)."""
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if len(size) != 2 or min(size) < 32:
            raise ValueError(f"image_size must be an int or (height, width) of at least 32 pixels, got {image_size}")
        if feature_extractor is None:
            feature_extractor = FeatureExtractor(
                backbone=backbone, layers=list(layers) if layers else None, weights=weights, pretrained=pretrained
            )
        self.feature_extractor = feature_extractor
        self.image_size = size
        self.mean = tuple(float(m) for m in self.feature_extractor.config.mean)
        self.std = tuple(float(s) for s in self.feature_extractor.config.std)
        self.pre_processor = pre_processor
        self.post_processor = post_processor
        self.evaluator = evaluator
        self.visualizer = visualizer
        # Image-score threshold of the good/defect verdict: set by training from held-out
        # training-side images (defectscope.metrics.threshold), never from a test set.
        # ``threshold_info`` says where it came from; empty while the model is untrained.
        self.register_buffer("threshold", torch.tensor(0.5))
        # Region of interest at image_size, 1 inside (all ones: none set). Saved in ckpt.pth;
        # ``roi_info`` (params.json) says whether one is set and where it came from; only then is
        # it applied (see set_roi). float32: a buffer alone in its dtype (uint8) breaks DDP's
        # buffer broadcast, which copies a one-tensor bucket onto itself.
        self.register_buffer("roi", torch.ones(1, 1, *size))
        self.roi_info: dict[str, Any] = {}
        # Tiling of large images the model was trained with ({"tile", "overlap"}; data/tiling.py),
        # applied again when it scores images (empty: images are resized whole to image_size).
        self.tiling_info: dict[str, Any] = {}
        self.threshold_info: dict[str, Any] = {}
        # Map level that marks defect regions (predict's regions and masks), set by the same rule
        # on the held-out images' largest map values; None for a model saved before it existed.
        self.pixel_threshold: float | None = None
        self.pixel_threshold_info: dict[str, Any] = {}
        # The data the model was trained on (category, data-set settings, image lists).
        self.data_info: dict[str, Any] = {}
        # Training settings (epochs, seed, regime, ...), recorded by the engine.
        self.training_info: dict[str, Any] = {}
        self.hparams: dict[str, Any] = dict(
            backbone=backbone,
            layers=list(self.feature_extractor.layers),
            image_size=size,
            weights=str(weights) if weights else None,
            pretrained=pretrained,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )

    # ---- pre-processing ---------------------------------------------------------------
    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Path / PIL image / numpy array / tensor -> normalised batch ``[B,3,H,W]`` and the
        original (h, w).

        Value ranges and layouts follow :mod:`defectscope.data.arrays`: uint8 is 0..255, uint16
        0..65535 (read as 16-bit files are), floats must lie in [0, 1]; numpy images are HxW or
        HxWxC, tensors [C,H,W] or [B,C,H,W], with 1, 3 or 4 channels (alpha dropped). Ambiguous
        inputs (bool or other integer dtypes, floats outside [0, 1], NaN, channels in the wrong
        place, empty arrays) raise :class:`~defectscope.data.DataError` with the fix.
        """
        from defectscope.data.arrays import to_batch

        x = to_batch(image)
        original = tuple(x.shape[-2:])
        if not self.pre_processor:
            return x, original
        if original != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std, original

    @torch.inference_mode()
    def predict(self, image) -> tuple[float | np.ndarray, np.ndarray]:
        """``score, anomaly_map = model.predict(image)``.

        One image -> a float score and an ``[H,W]`` float map at the image's own size;
        a batch tensor -> scores ``[B]`` and maps ``[B,H,W]``. Compare the score with
        ``model.threshold`` for a good/defect verdict.
        """
        if self.tiling_info and _is_whole_image(image):
            # A model trained on tiles scores an image by its tiles, stitched (data/tiling.py).
            from defectscope.data.tiling import Tiler

            return Tiler.from_model(self).predict(self, image)
        was_training = self.training
        self.eval()
        try:
            device = self.threshold.device
            x, original = self.preprocess(image)
            maps, scores = self(x.to(device))
            if tuple(maps.shape[-2:]) != original:
                maps = F.interpolate(maps, size=original, mode="bilinear", align_corners=False)
            maps = maps[:, 0].float().cpu().numpy()
            scores = scores.float().cpu().numpy()
        finally:
            self.train(was_training)
        if x.shape[0] == 1 and not (isinstance(image, torch.Tensor) and image.dim() == 4):
            return float(scores[0]), maps[0]
        return scores, maps

    # ---- region of interest -----------------------------------------------------------
    def set_roi(self, roi, source: str | None = None, image_size: tuple[int, int] | None = None) -> None:
        """Restrict the model to a region of interest: outside it the map is zero, the image
        score ignores it, and (SuperSimpleNet, SimpleNet) training puts no synthetic noise there.

        ``roi``: a mask file (non-zero = inside), or a bool / 0-1 array or tensor ``[H, W]``;
        None removes the ROI. It is resized to ``image_size`` (nearest). ``image_size`` here is the
        (h, w) of the data's images: a mask of another size is resized with a notice. Set it
        before training (the threshold is fitted on ROI-masked scores); it is saved with the model.

        The networks never see the image outside the ROI (:meth:`roi_images` sets it to the mean
        colour, in training and inference), so nothing there moves a score, not even through a
        backbone's receptive field. A score that is a map's maximum becomes the maximum inside
        the ROI; SuperSimpleNet's classifier score (``image_score`` classifier / mean) is kept."""
        from defectscope.data.roi import read_roi, resize_roi

        if roi is None:
            self.roi.fill_(1.0)
            self.roi_info = {}
            return
        name = None
        if isinstance(roi, (str, Path)):
            source = source or str(Path(roi).resolve())
            name = f"ROI mask {roi}"
            roi = read_roi(roi)
        tensor = resize_roi(roi, self.image_size, name=name, expected=image_size)
        self.roi.copy_(tensor.to(self.roi))
        digest = hashlib.sha256(tensor.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        self.roi_info = {"set": True, "source": source or "array", "coverage": round(float(tensor.mean()), 6),
                         "digest": digest}

    @property
    def has_roi(self) -> bool:
        """Whether a region of interest is set (a Python constant for tracing / export)."""
        return bool(self.roi_info)

    def roi_grid(self, height: int, width: int, roi: torch.Tensor | None = None) -> torch.Tensor | None:
        """The ROI (or ``roi``, e.g. a crop of it) on a ``height x width`` grid (a feature map),
        ``[1, 1, h, w]`` with 1 where at least half a cell is inside; None when no ROI is set."""
        if not self.has_roi:
            return None
        roi = (self.roi if roi is None else roi).float()
        share = F.interpolate(roi, size=(height, width), mode="area")
        grid = share >= 0.5
        if not bool(grid.any()):  # a ROI thinner than half a cell: every cell it touches
            grid = share > 0
        return grid.float()

    def roi_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B,3,H,W]`` with everything outside the ROI set to 0 (the mean
        colour): called where a model's networks first see images, in training and inference
        alike, so nothing outside the ROI reaches them (without it a bright fixture outside still
        moves the features inside through the backbone's receptive field). Unchanged without a ROI."""
        if not self.has_roi:
            return images
        roi = self.roi.to(device=images.device, dtype=images.dtype)
        if tuple(roi.shape[-2:]) != tuple(images.shape[-2:]):
            roi = F.interpolate(roi, size=tuple(images.shape[-2:]), mode="nearest-exact")
        return images * roi

    def apply_roi(self, maps: torch.Tensor, scores: torch.Tensor, roi: torch.Tensor | None = None,
                  score_from_map: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The last step of every model's forward: maps ``[B,1,H,W]`` are zeroed outside the ROI
        and (``score_from_map``) the image score becomes the map's maximum inside it. ``roi``
        (``[B or 1,1,h,w]``, e.g. per-image masks applied after the forward) replaces the model's
        own; without either, maps and scores pass unchanged. No data-dependent control flow
        (traceable).

        ``score_from_map=False`` keeps a score that does not come from the map (SuperSimpleNet's
        classification head, or its mean with the map maximum): with the model's own ROI the
        networks never see the image outside it (:meth:`roi_images`), so that score already
        ignores the outside."""
        if roi is None:
            if not self.has_roi:
                return maps, scores
            roi = self.roi
        roi = roi.to(device=maps.device, dtype=maps.dtype)
        if tuple(roi.shape[-2:]) != tuple(maps.shape[-2:]):
            roi = F.interpolate(roi, size=tuple(maps.shape[-2:]), mode="nearest-exact")
        if score_from_map:
            low = torch.tensor(torch.finfo(maps.dtype).min, dtype=maps.dtype, device=maps.device)
            scores = torch.where(roi > 0.5, maps, low).amax(dim=(1, 2, 3))
        return maps * roi, scores

    # ---- saving and loading -----------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("feature_extractor.")}

    def params(self) -> dict[str, Any]:
        """Everything but the tensors, as plain data (written to ``params.json``)."""
        return {
            "format_version": FORMAT_VERSION,
            "model": self.name,
            "hparams": to_plain(dict(self.hparams), "hparams"),
            "mean": list(self.mean),
            "std": list(self.std),
            "backbone_fingerprint": self.feature_extractor.fingerprint,
            "backbone_weights_source": self.feature_extractor.weights_source,
            "threshold": float(self.threshold),
            "threshold_info": dict(self.threshold_info),
            "roi": dict(self.roi_info) or None,
            "tiling": dict(self.tiling_info) or None,
            "pixel_threshold": self.pixel_threshold,
            "pixel_threshold_info": dict(self.pixel_threshold_info),
            "data": dict(self.data_info),
            "training": dict(self.training_info),
        }

    def save(self, model_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``ckpt.pth`` (tensors) and ``params.json`` (settings) into ``model_dir``,
        atomically; a legacy ``params.pkl`` there is removed (``params.json`` supersedes it)."""
        model_dir = Path(model_dir)
        params = self.params()
        if extra:
            params.update(extra)
        save_tensors({"state_dict": self.trained_state_dict(), "model": self.name}, model_dir / CKPT_NAME)
        write_params(model_dir / PARAMS_NAME, params)
        (model_dir / LEGACY_PARAMS_NAME).unlink(missing_ok=True)
        return model_dir

    @hybridmethod
    def load_from_path(cls, self, path: str | Path, weights: str | None = None, category: str | None = None):
        """Load a trained model from a run folder, its ``models/<n>`` folder or ``ckpt.pth``.

        On the class (``SuperSimpleNet.load_from_path(p)``) it builds a new model from
        ``params.json``; on an instance (``net.load_from_path(p)``) it loads the weights into it
        and applies the saved threshold and records, after checking that the instance was built
        with the same settings (a mismatch is refused, naming the settings that differ).
        ``weights`` overrides the backbone weights file recorded at training time; ``category``
        picks the model of a multi-category run. Opening the files never runs code (JSON, and
        tensors loaded weights-only)."""
        folder = find_model_dir(path, category=category)
        params = read_params(folder)
        saved_name = params["model"]
        from defectscope.models import MODELS, model_key

        wanted = None if cls is AnomalyModel and self is None else (type(self) if self is not None else cls)
        if wanted is not None and model_key(saved_name) != model_key(wanted.name):
            raise ModelFileError(
                f"{folder} holds a {saved_name} model, not a {wanted.name}. Fix: load it with "
                f"defectscope.models.load_model(path), which builds whatever model the folder holds."
            )
        hparams = dict(params["hparams"])
        if weights is not None:
            # The constructor argument naming the frozen part's weights file ("teacher_weights" for
            # a model whose frozen part is a teacher network rather than a timm backbone).
            owner = MODELS.get(model_key(saved_name), cls)
            hparams[getattr(owner, "frozen_weights_arg", "weights")] = str(weights)
        if self is None:
            model_cls = MODELS.get(model_key(saved_name)) if cls is AnomalyModel else cls
            if model_cls is None:
                raise ModelFileError(
                    f"{folder} holds a model named {saved_name!r}, which this defectscope does not have "
                    f"(it has {', '.join(MODELS)}). Fix: open it with the defectscope version that wrote it."
                )
            try:
                self = model_cls(**hparams)
            except TypeError as err:
                raise ModelFileError(
                    f"{folder}: its settings do not fit this defectscope's {saved_name} ({err}). Fix: open it "
                    "with the defectscope version that wrote it, or retrain."
                ) from err
        else:
            self._check_same_settings(hparams, folder)
        state = load_tensors(folder / CKPT_NAME, "model weights")
        if not isinstance(state.get("state_dict"), dict):
            raise ModelFileError(f"{folder / CKPT_NAME} holds no 'state_dict'. Fix: retrain the model.")
        missing, unexpected = self.load_state_dict(state["state_dict"], strict=False)
        # "roi": models saved before ROIs existed have none (the all-ones buffer stays).
        # optional_state_prefixes: tensors a model gained after some files were saved.
        optional = ("feature_extractor.", *getattr(self, "optional_state_prefixes", ()))
        missing = [k for k in missing if not k.startswith(optional) and k != "roi"]
        if missing or unexpected:
            raise ModelFileError(
                f"{folder / CKPT_NAME} does not fit this {type(self).__name__}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. Was it trained with other settings? Load it with "
                "defectscope.models.load_model(path) to rebuild it from params.json."
            )
        fingerprint = params.get("backbone_fingerprint")
        if fingerprint and fingerprint != self.feature_extractor.fingerprint:
            raise ModelFileError(
                f"The backbone weights now loaded ({self.feature_extractor.weights_source}) differ from the ones "
                f"this model was trained with ({params.get('backbone_weights_source')}). Pass the same weights "
                "file (weights=...) the model was trained with."
            )
        if "threshold" in params and params["threshold"] is not None:
            self.threshold.fill_(float(params["threshold"]))
        self.threshold_info = dict(params.get("threshold_info") or {})
        if not self.threshold_info and params.get("format_version") == 1:
            self.threshold_info = {"source": "unknown (a model saved before thresholds were recorded)"}
        pixel = params.get("pixel_threshold")
        self.pixel_threshold = float(pixel) if pixel is not None else None
        self.pixel_threshold_info = dict(params.get("pixel_threshold_info") or {})
        self.roi_info = dict(params.get("roi") or {})
        self.tiling_info = dict(params.get("tiling") or {})
        self.data_info = dict(params.get("data") or {})
        self.training_info = dict(params.get("training") or {})
        for key in ("epochs", "seed", "train_size", "regime"):  # format 1 kept these at the top level
            if key in params and key not in self.training_info:
                self.training_info[key] = params[key]
        self.load_params(params)
        self.eval()
        return self

    def _check_same_settings(self, saved: dict[str, Any], folder: Path) -> None:
        """Refuse to load weights into an instance built with other settings (the weights
        would be scored with pre-processing or heads they were not trained with)."""
        mine = to_plain(dict(self.hparams), "hparams")
        saved = to_plain(saved, "hparams")
        # Set by training, not by the user: the saved value is applied by load_params.
        ignored = {"weights", "supervised", self.frozen_weights_arg}
        differ = sorted(k for k in set(mine) | set(saved) if k not in ignored and mine.get(k) != saved.get(k))
        if differ:
            listed = "; ".join(f"{k}: this instance {mine.get(k)!r}, saved {saved.get(k)!r}" for k in differ[:8])
            raise ModelFileError(
                f"{folder} was trained with other settings than this {type(self).__name__} ({listed}). "
                f"Fix: build the model from the saved settings with {type(self).__name__}.load_from_path(path) "
                "on the class (or defectscope.models.load_model(path)), or create the instance with the saved settings."
            )

    def load_params(self, params: dict[str, Any]) -> None:
        """Restore state kept in ``params.json`` beyond the constructor arguments (none here)."""
