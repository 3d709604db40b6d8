"""What every defectscope model shares: a frozen backbone, pre-processing, ``predict`` and
saving / loading of its own weights.

A model keeps its constructor arguments in ``self.hparams`` so that ``params.pkl`` can
rebuild it; ``ckpt.pth`` holds only the trained parts (never the frozen backbone, whose
weights are resolved again on load and checked against a fingerprint).
"""

from __future__ import annotations

import functools
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from defectscope.backbones import FeatureExtractor

CKPT_NAME = "ckpt.pth"
PARAMS_NAME = "params.pkl"
FORMAT_VERSION = 1


class hybridmethod:
    """Method callable on the class (build a new object) or on an instance (update it)."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, cls):
        return functools.partial(self.func, cls, obj)


def atomic_save(obj: Any, path: str | Path, use_torch: bool = True) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a
    half-written file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if use_torch:
                torch.save(obj, fh)
            else:
                pickle.dump(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def find_model_dir(path: str | Path) -> Path:
    """Accept a run folder, its ``models/`` folder, ``models/<n>`` or a ``ckpt.pth`` file."""
    path = Path(path)
    candidates = [path.parent] if path.is_file() else [path, path / "0", path / "models" / "0"]
    for folder in candidates:
        if (folder / CKPT_NAME).is_file() and (folder / PARAMS_NAME).is_file():
            return folder
    raise FileNotFoundError(
        f"No trained model at '{path}': expected {CKPT_NAME} and {PARAMS_NAME} in it or in "
        f"'models/0' below it (a run folder such as results/<project>/<group>/<run_name>). "
        "Train one with `defectscope train`."
    )


class AnomalyModel(nn.Module):
    """Base class: frozen backbone, pre-processing record, fitted threshold, predict, save/load."""

    name = "model"

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
    ) -> None:
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if len(size) != 2 or min(size) < 32:
            raise ValueError(f"image_size must be an int or (height, width) of at least 32 pixels, got {image_size}")
        self.feature_extractor = FeatureExtractor(
            backbone=backbone, layers=list(layers) if layers else None, weights=weights, pretrained=pretrained
        )
        self.image_size = size
        self.mean = tuple(float(m) for m in self.feature_extractor.config.mean)
        self.std = tuple(float(s) for s in self.feature_extractor.config.std)
        self.pre_processor = pre_processor
        self.post_processor = post_processor
        self.evaluator = evaluator
        self.visualizer = visualizer
        # Fitted at test time on held-out data (F1-optimal), 0.5 until then.
        self.register_buffer("threshold", torch.tensor(0.5))
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
        """Path / PIL image / numpy array (HxW or HxWxC, uint8 or float in [0,1]) / tensor
        ([C,H,W] or [B,C,H,W] in [0,1]) -> normalised batch ``[B,3,H,W]`` and original (h, w)."""
        from defectscope.data import load_image

        if isinstance(image, (str, Path)):
            image = load_image(image)
        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                image = image.convert("RGB")
            image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
        elif isinstance(image, np.ndarray):
            arr = image
            if arr.ndim == 2:
                arr = arr[:, :, None]
            if arr.ndim != 3:
                raise ValueError(f"expected an HxW or HxWxC array, got shape {image.shape}")
            arr = arr[:, :, :3]
            scale = 255.0 if arr.dtype == np.uint8 else (65535.0 if arr.dtype == np.uint16 else 1.0)
            image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / scale
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"predict takes a path, PIL image, numpy array or tensor, got {type(image).__name__}")
        x = image.float()
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[1] not in (1, 3, 4):
            raise ValueError(f"expected an image tensor [C,H,W] or [B,C,H,W] with 1, 3 or 4 channels, got {tuple(image.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x[:, :3]
        original = tuple(x.shape[-2:])
        if not self.pre_processor:
            return x, original
        if original != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std, original

    @torch.inference_mode()
    def predict(self, image) -> tuple[float | np.ndarray, np.ndarray]:
        """``score, anomaly_map = model.predict(image)``.

        One image -> a float score and an ``[H,W]`` float map at the image's own size;
        a batch tensor -> scores ``[B]`` and maps ``[B,H,W]``. Compare the score with
        ``model.threshold`` for a good/defect verdict.
        """
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

    # ---- saving and loading -----------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("feature_extractor.")}

    def params(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.name,
            "hparams": dict(self.hparams),
            "mean": self.mean,
            "std": self.std,
            "backbone_fingerprint": self.feature_extractor.fingerprint,
            "backbone_weights_source": self.feature_extractor.weights_source,
        }

    def save(self, model_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``ckpt.pth`` and ``params.pkl`` into ``model_dir`` (atomically)."""
        model_dir = Path(model_dir)
        params = self.params()
        if extra:
            params.update(extra)
        atomic_save({"state_dict": self.trained_state_dict(), "model": self.name}, model_dir / CKPT_NAME)
        atomic_save(params, model_dir / PARAMS_NAME, use_torch=False)
        return model_dir

    @hybridmethod
    def load_from_path(cls, self, path: str | Path, weights: str | None = None):
        """Load a trained model from a run folder, its ``models/0`` folder or ``ckpt.pth``.

        On the class (``SuperSimpleNet.load_from_path(p)``) it builds a new model from
        ``params.pkl``; on an instance (``net.load_from_path(p)``) it loads the weights into it.
        ``weights`` overrides the backbone weights file recorded at training time.
        """
        folder = find_model_dir(path)
        with open(folder / PARAMS_NAME, "rb") as fh:
            params = pickle.load(fh)
        if self is None:
            from defectscope.models import MODELS

            model_cls = MODELS[params["model"]] if cls is AnomalyModel else cls
            hparams = dict(params["hparams"])
            if weights is not None:
                hparams["weights"] = weights
            self = model_cls(**hparams)
        state = torch.load(folder / CKPT_NAME, map_location="cpu", weights_only=True)
        missing, unexpected = self.load_state_dict(state["state_dict"], strict=False)
        missing = [k for k in missing if not k.startswith("feature_extractor.")]
        if missing or unexpected:
            raise RuntimeError(
                f"{folder / CKPT_NAME} does not fit this {type(self).__name__}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. Was it trained with other settings? Load it with "
                "defectscope.models.load_model(path) to rebuild from params.pkl."
            )
        fingerprint = params.get("backbone_fingerprint")
        if fingerprint and fingerprint != self.feature_extractor.fingerprint:
            raise RuntimeError(
                f"The backbone weights now loaded ({self.feature_extractor.weights_source}) differ from the ones "
                f"this model was trained with ({params.get('backbone_weights_source')}). Pass the same weights "
                "file (weights=...) the model was trained with."
            )
        self.load_params(params)
        self.eval()
        return self

    def load_params(self, params: dict[str, Any]) -> None:
        """Restore state kept in ``params.pkl`` beyond the constructor arguments (none here)."""
