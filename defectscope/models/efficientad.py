"""EfficientAD: a student and an autoencoder learn a frozen patch-description teacher.

Paper: Batzner, Heckler, König, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024 (https://arxiv.org/abs/2303.14535). Reference code:
nelson1425/EfficientAD and anomalib's ``models/image/efficient_ad``.

Data flow (256x256 input, ``padding=False``)::

    image [B,3,256,256] -> teacher PDN (frozen) -> [B,384,56,56], standardised per channel
                        -> student PDN          -> [B,768,56,56]: first 384 mimic the teacher,
                                                                  last 384 mimic the autoencoder
                        -> autoencoder          -> [B,384,56,56] (1x1 bottleneck of 64 values)
    map_st = mean_c (teacher - student[:384])^2, map_ae = mean_c (autoencoder - student[384:])^2
    each map: 0.1 * (map - q_0.9) / (q_0.995 - q_0.9), quantiles of held-out good images
    combined = (map_st + map_ae) / 2, zero-padded by 4 to 64x64 (``pad_maps``), upscaled to
    256x256; image score = its maximum.

Training (batch size 1, as the paper): the hard student-teacher loss (mean of the squared
differences at or above their 0.999 quantile), a penalty pulling the student's output on
out-of-domain images towards 0, the autoencoder's loss against the teacher and the student's
loss against the autoencoder, both on a colour-jittered copy of the image. The teacher is a
PDN file: the official weights (nelson1425 or anomalib naming, see :func:`pdn_state_dict`) or
one made offline by ``defectscope distill-teacher`` (defectscope/engine/distill.py).
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import functional as TF

from defectscope.backbones import IMAGENET_MEAN, IMAGENET_STD
from defectscope.models.base import AnomalyModel
from defectscope.models.common import check_setting
from defectscope.models.model_files import ModelFileError, load_tensors

MODEL_SIZES = ("s", "m")
TEACHER_FORMAT = "defectscope-pdn-teacher"
PENALTY_IMAGES = 200  # out-of-domain images kept in memory for the penalty term
# Packaged scikit-image pictures (no download) used as generic images when none are given.
SKIMAGE_PICTURES = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel",
                    "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina",
                    "rocket", "text", "cell")

# PDN layers (the paper's appendix): (output channels, kernel, padding when ``padding``) per
# convolution, "pool" for 2x2 average pooling; None = the output channels.
PDN_LAYERS = {
    "s": ((128, 4, 3), "pool", (256, 4, 3), "pool", (256, 3, 1), (None, 4, 0)),
    "m": ((256, 4, 3), "pool", (512, 4, 3), "pool", (512, 1, 0), (512, 3, 1), (None, 4, 0), (None, 1, 0)),
}


class PenaltyNotice(UserWarning):
    """EfficientAD trains without the out-of-domain penalty (no images for it)."""


class PDN(nn.Module):
    """Patch description network: ``[B,3,H,W]`` -> ``[B,out_channels,h,w]``, each output seeing a
    33x33 patch (S: 4 convolutions, M: 6). ``padding=True`` keeps h = H/4 (distillation);
    False, the paper's default for anomaly detection, gives h = H/4 - 8 without border effects."""

    def __init__(self, model_size: str = "s", out_channels: int = 384, padding: bool = False) -> None:
        super().__init__()
        layers, in_channels, conv, pool = OrderedDict(), 3, 0, 0
        specs = PDN_LAYERS[model_size]
        for i, spec in enumerate(specs):
            if spec == "pool":
                pool += 1
                layers[f"pool{pool}"] = nn.AvgPool2d(2, stride=2, padding=int(padding))
                continue
            channels, kernel, pad = spec
            channels = channels or out_channels
            conv += 1
            layers[f"conv{conv}"] = nn.Conv2d(in_channels, channels, kernel, padding=pad if padding else 0)
            if i < len(specs) - 1:
                layers[f"relu{conv}"] = nn.ReLU(inplace=True)
            in_channels = channels
        self.layers = nn.Sequential(layers)
        self.model_size, self.out_channels, self.padding = model_size, out_channels, padding

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def pdn_output_size(size: int, padding: bool) -> int:
    """Side of the PDN output for an input side ``size`` (the same for PDN-S and PDN-M)."""
    if padding:
        size = (size + 3) // 2 + 1  # conv 4 (pad 3), pool (pad 1)
        return (size + 3) // 2 + 1 - 3  # conv 4 (pad 3), pool (pad 1), conv 3 (pad 1), conv 4
    return ((size - 3) // 2 - 3) // 2 - 5


class AutoEncoder(nn.Module):
    """The paper's autoencoder: six strided convolutions down to a 64-value bottleneck, then
    bilinear upsampling and convolutions up to the PDN's output grid.

    At 256 px this is the reference network. For other sizes the last encoder convolution
    spans the whole remaining grid (8x8 at 256 px), so the bottleneck stays 1x1, and the
    decoder's upsampling sizes scale with the image (as anomalib's)."""

    def __init__(self, out_channels: int, image_size: tuple[int, int], output_size: tuple[int, int]) -> None:
        super().__init__()
        grid = tuple(side // 32 for side in image_size)  # after five stride-2 convolutions
        encoder = [nn.Conv2d(3, 32, 4, 2, 1), nn.Conv2d(32, 32, 4, 2, 1), nn.Conv2d(32, 64, 4, 2, 1),
                   nn.Conv2d(64, 64, 4, 2, 1), nn.Conv2d(64, 64, 4, 2, 1)]
        self.encoder = nn.ModuleList(encoder + [nn.Conv2d(64, 64, grid)])
        self.decoder = nn.ModuleList([nn.Conv2d(64, 64, 4, 1, 2) for _ in range(6)])
        self.head = nn.ModuleList([nn.Conv2d(64, 64, 3, 1, 1), nn.Conv2d(64, out_channels, 3, 1, 1)])
        self.dropout = nn.Dropout(0.2)
        # 256 px: 3, 8, 15, 32, 63, 127, then the PDN grid (56).
        steps = ((64, -1), (32, 0), (16, -1), (8, 0), (4, -1), (2, -1))
        self.sizes = [tuple(max(1, side // d + o) for side in image_size) for d, o in steps] + [tuple(output_size)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for i, conv in enumerate(self.encoder):
            x = conv(x) if i == len(self.encoder) - 1 else F.relu(conv(x))
        for size, conv in zip(self.sizes[:-1], self.decoder):
            x = self.dropout(F.relu(conv(F.interpolate(x, size=size, mode="bilinear"))))
        x = F.relu(self.head[0](F.interpolate(x, size=self.sizes[-1], mode="bilinear")))
        return self.head[1](x)


# ---- the teacher file ---------------------------------------------------------------------------
def pdn_state_dict(state: dict, model_size: str) -> dict[str, torch.Tensor]:
    """Checkpoint filter: a PDN state dict in any known naming -> this module's keys.

    nelson1425/EfficientAD saves an ``nn.Sequential`` (``0.weight``, ``3.weight``, ...: the
    convolutions at their positions), anomalib ``conv1.weight`` ... (also under ``teacher.`` or
    ``model.teacher.`` in a Lightning checkpoint); defectscope's own files hold
    ``layers.conv1.weight`` ...
    """
    for prefix in ("model.teacher.", "teacher."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    n_convs = sum(spec != "pool" for spec in PDN_LAYERS[model_size])
    out: dict[str, torch.Tensor] = {}
    positions = sorted({int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()})
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        if head.isdigit():  # nelson1425: the n-th convolution of the Sequential
            head = f"conv{positions.index(int(head)) + 1}"
        out[f"layers.{head.removeprefix('layers.')}.{param}"] = value
    convs = sorted({k.split(".")[1] for k in out})
    if convs != sorted(f"conv{i + 1}" for i in range(n_convs)):
        raise ModelFileError(
            f"It holds {len(convs)} convolutions ({', '.join(convs[:8])}); a PDN-{model_size.upper()} has {n_convs}. "
            f"Fix: pass the teacher file for model_size={model_size!r} (PDN-S: 4 convolutions, PDN-M: 6)."
        )
    return out


@dataclass(frozen=True)
class TeacherConfig:
    """Input normalisation of the PDN teachers (ImageNet's, as the reference trains them)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class PdnTeacher(nn.Module):
    """The frozen PDN, with what the base class and the engine read from a feature extractor."""

    def __init__(self, pdn: PDN, weights_source: str, meta: dict | None = None) -> None:
        super().__init__()
        self.pdn = pdn
        self.config = TeacherConfig()
        self.layers, self.channels, self.strides = ["pdn"], [pdn.out_channels], [4]
        self.weights_source = weights_source
        self.meta = dict(meta or {})
        digest = hashlib.blake2b(digest_size=8)
        for key, tensor in pdn.state_dict().items():
            digest.update(f"{key}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        self.fingerprint = digest.hexdigest()
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> PdnTeacher:
        return super().train(False)  # always frozen

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pdn(images)


def load_teacher(path: str | Path, model_size: str, out_channels: int, padding: bool) -> PdnTeacher:
    """Read a PDN teacher file (weights-only: opening it runs no code) into a frozen teacher."""
    path = Path(path)
    obj = load_tensors(path, "PDN teacher weights")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) and isinstance(obj.get("state_dict"), dict) else None
    state = obj["state_dict"] if meta is not None else obj
    where = f"Teacher file {path}"
    if meta is not None and meta.get("model_size") not in (None, model_size):
        raise ModelFileError(f"{where} is a PDN-{str(meta['model_size']).upper()} teacher, but model_size="
                             f"{model_size!r}. Fix: pass model_size={meta['model_size']!r} or the "
                             f"PDN-{model_size.upper()} file.")
    try:
        state = pdn_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, model_size)
        pdn = PDN(model_size, out_channels, padding)
        pdn.load_state_dict(state, strict=True)
    except (ModelFileError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise ModelFileError(f"{where} does not fit a PDN-{model_size.upper()} with {out_channels} output channels: "
                             f"{first} Fix: pass the teacher file of that size (teacher_out_channels must match "
                             "it: 384 for the official ones).") from err
    source = str(path.resolve())
    if meta is not None:
        source += (f" (distilled from {meta.get('backbone')} on {meta.get('images')} by defectscope distill-teacher, "
                   f"{meta.get('steps')} steps, seed {meta.get('seed')})")
    return PdnTeacher(pdn, source, meta)


# ---- out-of-domain images -----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def skimage_pictures(max_side: int = 768) -> tuple[torch.Tensor, ...]:
    """The packaged scikit-image pictures as uint8 ``[3,H,W]``, at most ``max_side`` pixels a
    side (read once per process; ImportError without scikit-image)."""
    import skimage.data

    pictures = []
    for name in SKIMAGE_PICTURES:
        try:
            array = torch.as_tensor(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a picture this scikit-image would have to download
            continue
        array = array[..., None].expand(*array.shape, 3) if array.dim() == 2 else array[..., :3]
        picture = array.permute(2, 0, 1)[None].float()
        scale = max_side / max(picture.shape[-2:])
        if scale < 1:
            picture = F.interpolate(picture, scale_factor=scale, mode="bilinear", antialias=True)
        pictures.append(picture[0].round().clamp(0, 255).to(torch.uint8))
    return tuple(pictures)


def random_resized_crop(picture: torch.Tensor, size: tuple[int, int], generator: torch.Generator,
                        min_area: float = 0.1) -> torch.Tensor:
    """A random crop (``min_area``..1 of the picture's area, aspect 3/4..4/3), resized to
    ``size`` and flipped left-right half the time: uint8 ``[3,H,W]`` -> float ``[3,*size]`` in [0, 1]."""
    _, h, w = picture.shape
    u = torch.rand(5, generator=generator).tolist()
    area = h * w * (min_area + (1 - min_area) * u[0])
    aspect = math.exp(math.log(3 / 4) + u[1] * math.log(16 / 9))
    ch = max(1, min(h, round(math.sqrt(area / aspect))))
    cw = max(1, min(w, round(math.sqrt(area * aspect))))
    top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
    crop = picture[None, :, top:top + ch, left:left + cw].float() / 255
    crop = F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    return crop.flip(-1) if u[4] < 0.5 else crop


def image_files(folder: str | Path) -> list[Path]:
    """Image files in ``folder`` and its sub-folders (an ImageNet / Imagenette class tree), sorted."""
    from defectscope.data import IMAGE_EXTENSIONS, list_images

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return files or list_images(folder)  # list_images raises the DataError that says what is wrong


def penalty_images(imagenet_dir: str | None, size: tuple[int, int], count: int = PENALTY_IMAGES,
                   seed: int = 0) -> tuple[torch.Tensor | None, str]:
    """The penalty term's images, uint8 ``[N,3,H,W]``, and where they came from.

    ``imagenet_dir``: up to ``count`` files of it (a seeded sample), resized to twice ``size``
    and centre-cropped to ``size`` (the reference's transform). None: ``count`` random crops of
    scikit-image's packaged pictures; without scikit-image, None (no penalty)."""
    generator = torch.Generator().manual_seed(seed)
    if imagenet_dir is not None:
        from defectscope.data import load_image

        files = image_files(imagenet_dir)
        chosen = [files[i] for i in torch.randperm(len(files), generator=generator)[:count].tolist()]
        images = []
        for path in chosen:
            x = TF.pil_to_tensor(load_image(path))[None].float()
            x = F.interpolate(x, size=(2 * size[0], 2 * size[1]), mode="bilinear", antialias=True)
            images.append(TF.center_crop(x, list(size))[0].round().clamp(0, 255).to(torch.uint8))
        return torch.stack(images), f"{len(images)} images of {Path(imagenet_dir).resolve()}"
    try:
        pictures = skimage_pictures()
    except ImportError:
        return None, "none: no imagenet_dir was given and scikit-image is not installed"
    crops = [random_resized_crop(pictures[i % len(pictures)], size, generator) for i in range(count)]
    images = (torch.stack(crops) * 255).round().to(torch.uint8)
    return images, f"{count} random crops of {len(pictures)} scikit-image sample pictures (skimage.data)"


# ---- the method's formulas ----------------------------------------------------------------------
def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for any number of values
    (torch.quantile stops at 2**24), from two order statistics."""
    flat = values.reshape(-1)
    pos = q * (flat.numel() - 1)
    low = int(math.floor(pos))
    lo = torch.kthvalue(flat, low + 1).values
    hi = torch.kthvalue(flat, min(low + 2, flat.numel())).values
    return torch.lerp(lo, hi, pos - low)


def hard_loss(distance: torch.Tensor, q: float = 0.999) -> torch.Tensor:
    """Mean of the squared student-teacher differences at or above their ``q`` quantile."""
    return distance[distance >= quantile(distance.detach(), q)].mean()


def normalize_map(maps: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """The paper's map normalisation: the ``start`` (0.9) quantile -> 0, ``end`` (0.995) -> 0.1."""
    return 0.1 * (maps - start) / (end - start).clamp_min(1e-12)


class EfficientAd(AnomalyModel):
    """EfficientAD-S / -M.

    Args:
        imagenet_dir: folder of out-of-domain images for the penalty term (e.g. Imagenette; sub-folders are searched); None: random crops of scikit-image's packaged pictures, or no penalty (with a PenaltyNotice) without scikit-image.
        teacher_out_channels: channels of the teacher's output (384 for the official teachers).
        model_size: "s" (PDN-S, the paper's EfficientAD-S) or "m" (PDN-M); case does not matter.
        lr: Adam learning rate of the student and autoencoder (1e-4, cut to a tenth at 95 % of the steps).
        weight_decay: Adam weight decay.
        padding: pad the convolutions of the teacher, student and autoencoder (maps at 1/4 of the image size).
        pad_maps: without ``padding``, zero-pad the maps by 4 so they line up with the image (the reference's test code does).
        teacher_weights: PDN teacher file: the official one (nelson1425/EfficientAD models/teacher_small.pth, anomalib's pretrained_teacher_small.pth; _medium for M) or one from `defectscope distill-teacher`.
        image_size: input size, a square int or (height, width); 256 as in the paper.
        pre_processor: resize and normalise inputs in predict (False: inputs are already pre-processed tensors).
        post_processor: squash maps and scores into (0, 1) by a logistic that gives 0.5 at the 0.995 quantile of good pixels (False: the paper's normalised maps).
        evaluator: compute metrics when the engine tests the model.
        visualizer: write heat-map overlays when the engine tests the model.
    """

    name = "efficientad"
    train_on_images_and_features = True  # the engine caches the teacher's outputs beside the images
    min_batch_size = max_batch_size = 1
    batch_size_reason = "the paper trains EfficientAD on one image per step"
    # `defectscope train` without --epochs: the demo's 3 epochs, raised to at least this many steps
    # (defectscope/cli.py, default_epochs); the paper trains 70,000. Why 1,000: on 40 generated
    # images (32 trained) 3 epochs are 96 steps and the loss is still falling fast (9.5 at epoch 3,
    # 2.2 at epoch 32). One seed, Lite0-distilled PDN-S teacher, 96 -> 1,024 steps: grass image
    # AUROC 0.762 -> 0.829 (nearest-neighbour floor 0.755), pixel AUROC 0.684 -> 0.722, AUPRO 0.511
    # -> 0.555; gravel image 0.593 -> 0.571 (floor 0.640, within noise), pixel 0.472 -> 0.603, AUPRO
    # 0.174 -> 0.306 (benchmarks/results/floor_synthetic.md). ELPV's 353+ trained cells already give
    # over 1,000 steps in 3 epochs, so its default is unchanged.
    min_default_steps = 1000
    scheduler_interval = "step"

    frozen_weights_arg = "teacher_weights"  # load_from_path(path, weights=...) re-points the teacher file

    def __init__(
        self,
        imagenet_dir: str | None = None,
        teacher_out_channels: int = 384,
        model_size: str = "s",
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        padding: bool = False,
        pad_maps: bool = True,
        teacher_weights: str | None = None,
        image_size: int | tuple[int, int] = 256,
        pre_processor: bool = True,
        post_processor: bool = True,
        evaluator: bool = True,
        visualizer: bool = True,
    ) -> None:
        check_setting("teacher_out_channels", teacher_out_channels, 1, integer=True)
        check_setting("lr", lr, 0, low_open=True)
        check_setting("weight_decay", weight_decay, 0)
        size = str(model_size).strip().lower()
        size = {"small": "s", "medium": "m"}.get(size, size)
        if size not in MODEL_SIZES:
            raise ValueError(f"model_size must be 's' or 'm' (EfficientAD-S or -M), got {model_size!r}")
        if teacher_weights is None:
            official = f"teacher_{'small' if size == 's' else 'medium'}.pth"
            raise ValueError(
                "EfficientAD needs a pre-trained PDN teacher and teacher_weights is None. Fix: pass the official "
                f"PDN-{size.upper()} file by path, teacher_weights='.../{official}' (nelson1425/EfficientAD "
                "models/, or anomalib's efficientad_pretrained_weights; CLI: --teacher-weights), or make one "
                f"offline with `defectscope distill-teacher --model-size {size} --output teacher_{size}.pth` "
                "and pass that file."
            )
        teacher_weights = str(Path(teacher_weights).expanduser().resolve())
        teacher = load_teacher(teacher_weights, size, teacher_out_channels, padding)
        super().__init__(backbone=f"pdn_{size}", image_size=image_size, weights=teacher_weights,
                         pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer, feature_extractor=teacher)
        side = min(self.image_size)
        if pdn_output_size(side, padding) < 1 or side < 64:
            raise ValueError(f"EfficientAD needs images of at least 64 pixels a side, got image_size={image_size}")
        self.hparams = dict(
            imagenet_dir=None if imagenet_dir is None else str(imagenet_dir), teacher_out_channels=teacher_out_channels,
            model_size=size, lr=lr, weight_decay=weight_decay, padding=padding, pad_maps=pad_maps,
            teacher_weights=teacher_weights, image_size=self.image_size, pre_processor=pre_processor,
            post_processor=post_processor, evaluator=evaluator, visualizer=visualizer,
        )
        self.channels = teacher_out_channels
        self.pad = 4 if pad_maps and not padding else 0
        grid = tuple(pdn_output_size(s, padding) for s in self.image_size)
        self.student = PDN(size, 2 * teacher_out_channels, padding)
        self.autoencoder = AutoEncoder(teacher_out_channels, self.image_size, grid)
        # Fitted on the training images' teacher outputs (fit_feature_statistics).
        self.register_buffer("teacher_mean", torch.zeros(teacher_out_channels))
        self.register_buffer("teacher_std", torch.ones(teacher_out_channels))
        # q_0.9 and q_0.995 of the student-teacher and autoencoder maps (calibrate); until then
        # (0, 0.1) leaves the maps as they are.
        self.register_buffer("map_quantiles", torch.tensor([0.0, 0.1, 0.0, 0.1]))
        self.statistics_info: dict = {}
        self.calibration_info: dict = {}
        self.penalty_info: dict = {}
        self._penalty: torch.Tensor | None = None
        self._penalty_loaded = False

    # ---- records ------------------------------------------------------------------------------
    def params(self) -> dict:
        return {**super().params(), "teacher": dict(self.feature_extractor.meta), "penalty": dict(self.penalty_info),
                "teacher_statistics": dict(self.statistics_info), "map_normalization": dict(self.calibration_info)}

    def load_params(self, params: dict) -> None:
        self.penalty_info = dict(params.get("penalty") or {})
        self.statistics_info = dict(params.get("teacher_statistics") or {})
        self.calibration_info = dict(params.get("map_normalization") or {})

    # ---- teacher ------------------------------------------------------------------------------
    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's raw output ``[B,C,h,w]`` for normalised images (the engine caches it)."""
        return self.feature_extractor(self.roi_images(images))

    def feature_params(self) -> dict:
        return {"teacher": "pdn", "model_size": self.hparams["model_size"], "padding": self.hparams["padding"]}

    @torch.no_grad()
    def fit_feature_statistics(self, features: torch.Tensor, chunk: int = 16) -> None:
        """Per-channel mean and standard deviation of the teacher's outputs ``[N,C,h,w]`` over all
        training images and positions (float64 sums, a chunk of images at a time)."""
        total = torch.zeros(features.shape[1], dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for start in range(0, len(features), chunk):
            x = torch.as_tensor(features[start:start + chunk]).to(torch.float64)
            total += x.sum(dim=(0, 2, 3)).cpu()
            total_sq += x.square().sum(dim=(0, 2, 3)).cpu()
        count = len(features) * features.shape[2] * features.shape[3]
        mean = total / count
        self.teacher_mean.copy_(mean)
        self.teacher_std.copy_((total_sq / count - mean.square()).clamp_min(1e-12).sqrt())
        self.statistics_info = {"images": len(features), "source": "training images (teacher outputs)"}
        self.load_penalty_images()

    def _teacher_standardized(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.teacher_mean[:, None, None]) / self.teacher_std[:, None, None]

    # ---- training -----------------------------------------------------------------------------
    def colour_jitter(self, images: torch.Tensor) -> torch.Tensor:
        """The autoencoder's augmentation: brightness, contrast or saturation (one, at random)
        by a factor from U(0.8, 1.2), applied to the image in [0, 1]; normalised images in and out."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        plain = (images * std + mean).clamp(0, 1)
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[int(torch.randint(3, ()))]
        return (adjust(plain, float(torch.empty(()).uniform_(0.8, 1.2))) - mean) / std

    def load_penalty_images(self) -> None:
        """Read the penalty term's images into memory, once (before training: a bad
        ``imagenet_dir`` fails at once; the first step does it when a run is resumed)."""
        if self._penalty_loaded:
            return
        self._penalty, source = penalty_images(self.hparams["imagenet_dir"], self.image_size)
        self._penalty_loaded = True
        self.penalty_info = {"source": source, "images": 0 if self._penalty is None else len(self._penalty)}
        if self._penalty is None:
            warnings.warn(f"EfficientAD trains without the out-of-domain penalty ({source}), so the student may "
                          "learn to match the teacher on defects too. Fix: pass imagenet_dir=<folder of natural "
                          "images, e.g. Imagenette> (CLI: --imagenet-dir) or pip install scikit-image.",
                          PenaltyNotice, stacklevel=3)

    def _penalty_image(self, device: torch.device) -> torch.Tensor | None:
        self.load_penalty_images()
        if self._penalty is None:
            return None
        x = self._penalty[int(torch.randint(len(self._penalty), ()))][None].to(device).float() / 255
        if float(torch.rand(())) < 0.3:  # the reference's RandomGrayscale(0.3)
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        return (x - mean) / torch.tensor(self.std, device=device).view(1, 3, 1, 1)

    def training_step_images(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """One step: normalised images ``[B,3,H,W]`` and their cached teacher outputs -> the loss
        ``hard + penalty + autoencoder + student-autoencoder``."""
        c = self.channels
        images = self.roi_images(images)
        teacher = self._teacher_standardized(features.to(images.dtype))
        loss = hard_loss((teacher - self.student(images)[:, :c]).square())
        penalty = self._penalty_image(images.device)
        if penalty is not None:
            loss = loss + self.student(penalty)[:, :c].square().mean()
        augmented = self.colour_jitter(images)
        with torch.no_grad():
            teacher_aug = self._teacher_standardized(self.feature_extractor(augmented))
        reconstruction = self.autoencoder(augmented)
        loss = loss + (teacher_aug - reconstruction).square().mean()
        return loss + (reconstruction - self.student(augmented)[:, c:]).square().mean()

    def configure_optimizers(self, max_epochs: int, steps_per_epoch: int | None = None):
        """Adam on the student and autoencoder; the learning rate drops to a tenth after 95 % of
        the ``max_epochs * steps_per_epoch`` steps (StepLR stepped every step)."""
        params = list(self.student.parameters()) + list(self.autoencoder.parameters())
        optimizer = torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
        steps = max_epochs * (steps_per_epoch or 1)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, int(0.95 * steps)), gamma=0.1)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit the map normalisation on held-out good images (normalised batches): the 0.9 and
        0.995 quantiles of each raw map, over all their positions.

        Returns those images' scores and map maxima as :meth:`forward` now gives them, from the
        raw maps already computed (the engine sets the threshold from them without scoring the
        images again)."""
        st, ae = [], []
        for images in batches:
            map_st, map_ae = self.raw_maps(images)
            st.append(map_st.float().cpu())
            ae.append(map_ae.float().cpu())
        if not st:
            raise ValueError("EfficientAD's map normalisation needs at least one held-out good image; got none.")
        st, ae = torch.cat(st), torch.cat(ae)
        values = [quantile(st.reshape(-1), 0.9), quantile(st.reshape(-1), 0.995),
                  quantile(ae.reshape(-1), 0.9), quantile(ae.reshape(-1), 0.995)]
        self.map_quantiles.copy_(torch.stack(values))
        names = ("st_start", "st_end", "ae_start", "ae_end")
        self.calibration_info = {
            **{k: float(v) for k, v in zip(names, values)}, "images": len(st),
            "source": "good images given to calibrate() after training (the engine's held-out good training "
                      "images; the training images when it holds none out)"}
        device = self.map_quantiles.device
        scores = torch.cat([self.maps_from_raw(a.to(device), b.to(device))[1].cpu()
                            for a, b in zip(st.split(16), ae.split(16))])
        return scores, scores

    # ---- inference ----------------------------------------------------------------------------
    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> the student-teacher and autoencoder maps ``[B,1,h,w]``, unnormalised."""
        c = self.channels
        images = self.roi_images(images)
        teacher = self._teacher_standardized(self.feature_extractor(images))
        student = self.student(images)
        map_st = (teacher - student[:, :c]).square().mean(dim=1, keepdim=True)
        map_ae = (self.autoencoder(images) - student[:, c:]).square().mean(dim=1, keepdim=True)
        return map_st, map_ae

    def combined_map(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised, averaged map at the PDN grid, padded by ``pad_maps``: ``[B,1,h,w]``."""
        return self._combine(*self.raw_maps(images))

    def _combine(self, map_st: torch.Tensor, map_ae: torch.Tensor) -> torch.Tensor:
        q = self.map_quantiles
        combined = 0.5 * normalize_map(map_st, q[0], q[1]) + 0.5 * normalize_map(map_ae, q[2], q[3])
        return F.pad(combined, (self.pad,) * 4) if self.pad else combined

    def maps_from_raw(self, map_st: torch.Tensor, map_ae: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`raw_maps`' two maps -> the anomaly maps ``[B,1,H,W]`` and scores ``[B]`` of :meth:`forward`."""
        maps = F.interpolate(self._combine(map_st, map_ae), size=self.image_size, mode="bilinear",
                             align_corners=False)
        if self.post_processor:
            maps = torch.sigmoid((maps - 0.1) / 0.1)
        return self.apply_roi(maps, maps.amax(dim=(1, 2, 3)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B,3,H,W]`` normalised images -> anomaly maps ``[B,1,H,W]`` and scores ``[B]`` (each
        map's maximum); in (0, 1) when ``post_processor`` is on (same order)."""
        return self.maps_from_raw(*self.raw_maps(images))
