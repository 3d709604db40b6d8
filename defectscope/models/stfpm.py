"""STFPM: a student network learns to reproduce a frozen teacher's feature pyramid.

Paper: Wang, Wu, Cui, Kittler, "Student-Teacher Feature Pyramid Matching for Anomaly
Detection", BMVC 2021 (https://arxiv.org/abs/2103.04257). Reference code: gdwang08/STFPM and
anomalib's ``models/image/stfpm``.

Data flow (shapes for a 256x256 input and ResNet-18 ``layer1``..``layer3``)::

    image [B,3,256,256] -> frozen ImageNet teacher -> [B,64,64,64], [B,128,32,32], [B,256,16,16]
                        -> student, same architecture, random start -> the same shapes
    per layer: unit-length channel vectors t, s; distance d = 0.5 * ||t - s||^2 per position
    training loss: sum over layers of d averaged over positions and images (the paper's
      1 / (2 h w) * sum of squared differences, per image); hard_fraction < 1 averages only the
      worst-fitted share of each layer's positions in the batch (hard-feature mining)
    anomaly map: each layer's d upscaled (bilinear) to the image size, multiplied together;
      image score: the map's maximum

Only normal images are seen in training, so the student matches the teacher on normal
content alone and the two disagree where an image is unusual.

The teacher's features never change, so the engine computes them once per image and caches
them (:meth:`Stfpm.extract_features` flattens the pyramid into one row per image); every step
then runs only the student on the images (``train_on_images_and_features``).

Offline without ResNet-18 weights the teacher falls back to the packaged EfficientNet-Lite0,
with its own layers (blocks.4 and blocks.6, strides 16 and 32, see :data:`STFPM_LAYERS`) or, when
the caller named layers, its layers at the same strides, with a :class:`BackboneFallbackNotice`; the
backbone actually used is what ``hparams`` records, so a saved model reloads the same.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import timm
import torch
import torch.nn.functional as F

from defectscope.backbones import (
    OFFLINE_DEFAULT,
    FeatureExtractor,
    WeightsNotFoundError,
    get_backbone_config,
    torch_hub_checkpoint_dir,
)
from defectscope.models.base import AnomalyModel
from defectscope.models.common import check_setting

# The teacher used when the requested backbone's weights are nowhere on this machine.
FALLBACK_BACKBONE = OFFLINE_DEFAULT

# Layers matched when the caller names none. ResNet-18: the paper's three stages (strides 4, 8,
# 16). EfficientNet-Lite: blocks.4 and blocks.6 (strides 16, 32). Why, on the Lite0 teacher: with
# blocks.1+2+4 the stride-4 layer alone ranked ELPV mono cells *below chance* (0.459; the
# random-start student cannot reproduce low-level texture, so its distance is high on good cells
# too). `defectscope train` defaults, one seed (benchmarks/results/floor_elpv.md and
# floor_synthetic.md), image AUROC blocks.4+6 (was blocks.1+2+4): ELPV mono 0.942 (0.878), poly
# 0.897 (0.737), generated fabric 0.926 (0.895), grass 0.781 (0.761), gravel 0.519 (0.596). The
# price: coarser maps (pixel AUROC fabric 0.830 vs 0.867, gravel 0.764 vs 0.840); pass
# layers=("blocks.1", "blocks.2", "blocks.4") for finer ones.
STFPM_LAYERS = {
    "resnet18": ("layer1", "layer2", "layer3"),
    "efficientnet_lite0": ("blocks.4", "blocks.6"),
    "efficientnet_lite1": ("blocks.4", "blocks.6"),
    "efficientnet_lite2": ("blocks.4", "blocks.6"),
}


# Share of positions the student's loss averages (1.0: all of them, the paper's loss; below 1: the
# worst-fitted share of each layer's positions in a batch, see pyramid_loss). 0.1 was measured on the
# Lite0 teacher's blocks.4+6 and not adopted: a hand training loop (one seed) moved ELPV mono 0.939 ->
# 0.949 and generated grass 0.764 -> 0.800, but `defectscope train` defaults (one seed,
# benchmarks/results/floor_*_runs_stfpm_hard10.jsonl) gave image AUROC mono 0.941 (0.942 with every
# position), poly 0.902 (0.897), grass 0.785 (0.781), gravel 0.554 (0.519), fabric 0.904 (0.926), and
# pixel AUROC grass 0.848 (0.842), gravel 0.738 (0.764), fabric 0.800 (0.830): no clear gain.
HARD_FRACTION = 1.0

# Largest random shift of the student's training images, as a fraction of the image side, and the
# largest training set it is used on (larger sets train on the cached teacher maps). Why: on a small
# training set the student sees each image hundreds of times and memorises it (generated grass, 32
# images: distance 0.16 on seen against 0.35 on unseen good images), and a shift that is not a
# multiple of the teacher's stride gives it new teacher maps of the same content. On larger sets it
# only slows the fit: ELPV mono, 441 cells, hand loop of 1,100 steps, image AUROC 0.932 with shifts
# against 0.952 without. Translation only: flips and rotations would teach the student that a part
# may appear mirrored or turned, which aligned parts never are.
# The shift is a crop at a random offset, not a shifted window of the mirror-padded image: a mirrored
# border puts seams and reversed texture in every training image, which the student then learns to
# call normal. Generated textures, 40 images, 1,200 steps, one seed, image / pixel AUROC with crops
# against mirrored shifts: fabric 0.941 / 0.885 vs 0.895 / 0.798 (no shifts 0.913 / 0.807), gravel
# 0.665 / 0.803 vs 0.614 / 0.781, grass 0.791 / 0.868 vs 0.804 / 0.857.
TRANSLATE = 0.125
TRANSLATE_MAX_IMAGES = 100


def random_crop(images: torch.Tensor, max_fraction: float) -> torch.Tensor:
    """``[B,C,H,W]`` -> ``[B,C,H-ph,W-pw]`` with ``ph = int(max_fraction * H)`` (``pw`` likewise):
    each image cropped at its own random whole-pixel offset in ``[0, ph] x [0, pw]``, so any two
    crops are shifted against each other by up to ``max_fraction`` of the side. Every pixel of a
    crop is a pixel of the image (no padding, no mirrored seams); the student and the teacher are
    fully convolutional, so they take the smaller size."""
    height, width = images.shape[-2:]
    crop_h, crop_w = int(max_fraction * height), int(max_fraction * width)
    if crop_h == 0 and crop_w == 0:
        return images
    # Keep at least one pixel.
    crop_h, crop_w = min(crop_h, height - 1), min(crop_w, width - 1)
    dy = torch.randint(0, crop_h + 1, (len(images),)).tolist()
    dx = torch.randint(0, crop_w + 1, (len(images),)).tolist()
    return torch.stack([image[:, y:y + height - crop_h, x:x + width - crop_w]
                        for image, y, x in zip(images, dy, dx)])


def default_layers(backbone: str) -> list[str]:
    """The layers STFPM matches on ``backbone`` when none are given (:data:`STFPM_LAYERS`, else
    the backbone's own default layers)."""
    config = get_backbone_config(backbone)
    return list(STFPM_LAYERS.get(config.name, config.default_layers))


class BackboneFallbackNotice(UserWarning):
    """The requested teacher backbone had no weights here; another backbone was used instead."""


# ---- the two formulas ---------------------------------------------------------------------
def layer_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``[B,C,h,w]`` twice -> ``[B,1,h,w]``: half the squared distance between the
    L2-normalised channel vectors at each position (0 when they agree, at most 2)."""
    diff = F.normalize(teacher, dim=1) - F.normalize(student, dim=1)
    return 0.5 * diff.pow(2).sum(dim=1, keepdim=True)


def pyramid_loss(teacher_maps: Sequence[torch.Tensor], student_maps: Sequence[torch.Tensor],
                 batch_reduction: str = "sum", hard_fraction: float = 1.0) -> torch.Tensor:
    """The paper's loss: per layer ``1 / (2 h w)`` times the summed squared differences of the
    normalised features of an image, summed over layers; summed over the batch's images
    (``batch_reduction="sum"``, as anomalib does) or averaged (``"mean"``).

    Scale: the sum makes a step ``batch size`` times the mean's. gdwang08/STFPM's code averages
    over the batch and leaves out the 1/2 (twice the mean's gradients). At lr 0.4, batch 8, one
    epoch on the ELPV demo split the sum scored image AUROC 0.860 against the mean's 0.839
    (benchmarks/results/students.md).

    ``hard_fraction`` < 1 averages, per layer, only that fraction of the batch's positions where
    the student is furthest from the teacher (hard-feature mining, as EfficientAD's student loss
    does): the image score is a map maximum, so the normal regions the student fits worst are
    the ones that make good images look defective. 1.0 is the paper's loss.
    """
    if batch_reduction not in ("sum", "mean"):
        raise ValueError(f"batch_reduction must be 'sum' or 'mean', got {batch_reduction!r}")
    if not 0 < hard_fraction <= 1:
        raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction!r}")
    batch = teacher_maps[0].shape[0]
    loss = 0
    for t, s in zip(teacher_maps, student_maps, strict=True):
        distance = layer_distance(t, s).flatten()
        if hard_fraction < 1:
            k = max(1, math.ceil(hard_fraction * distance.numel()))
            distance = distance.topk(k, sorted=False).values
        loss = loss + distance.mean()
    # The mean over the batch's positions is the mean of the per-image averages.
    return loss * batch if batch_reduction == "sum" else loss


def anomaly_map(
    teacher_maps: Sequence[torch.Tensor], student_maps: Sequence[torch.Tensor], size: Sequence[int]
) -> torch.Tensor:
    """The product over layers of each layer's distance map upscaled to ``size`` -> ``[B,1,H,W]``."""
    result = None
    for t, s in zip(teacher_maps, student_maps, strict=True):
        layer = F.interpolate(layer_distance(t, s), size=tuple(size), mode="bilinear", align_corners=False)
        result = layer if result is None else result * layer
    return result


# ---- choosing the teacher -----------------------------------------------------------------
def layer_strides(backbone: str) -> dict[str, int]:
    """``{layer name: stride}`` of a backbone's feature layers (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = timm.create_model(get_backbone_config(backbone).timm_name, pretrained=False, features_only=True)
    return dict(zip(model.feature_info.module_name(), model.feature_info.reduction()))


def fallback_layers(backbone: str, layers: Sequence[str] | None) -> list[str]:
    """The layers of :data:`FALLBACK_BACKBONE` at the strides of ``layers`` of ``backbone``
    (ResNet ``layer1``..``layer3`` -> EfficientNet-Lite0 ``blocks.1``, ``blocks.2``, ``blocks.4``)."""
    strides = layer_strides(backbone)
    wanted = list(layers) if layers else list(get_backbone_config(backbone).default_layers)
    by_stride = {stride: name for name, stride in layer_strides(FALLBACK_BACKBONE).items()}  # last layer per stride
    unknown = [name for name in wanted if name not in strides]
    missing = sorted({strides[name] for name in wanted if name in strides} - set(by_stride))
    if unknown or missing:
        raise ValueError(
            f"Cannot fall back from {backbone!r} layers {wanted} to {FALLBACK_BACKBONE!r}: "
            + (f"unknown layers {unknown} (valid: {list(strides)})" if unknown else
               f"{FALLBACK_BACKBONE} has no layer at stride(s) {missing} (it has {by_stride})")
            + ". Fix: pass layers whose strides are among "
            f"{sorted(by_stride)}, or pass {backbone}'s weights file (weights=...)."
        )
    return [by_stride[strides[name]] for name in wanted]


def build_teacher(
    backbone: str, layers: Sequence[str] | None, weights: str | None, pretrained: bool, allow_fallback: bool
) -> tuple[FeatureExtractor, str, str]:
    """The frozen teacher, the backbone name it was built from, and a fallback note ("" if none).

    Falls back to :data:`FALLBACK_BACKBONE` only when no weights file was given and none was
    found (a file the user names but that is missing is an error, never a silent switch).
    """
    asked = list(layers) if layers else None
    try:
        teacher = FeatureExtractor(backbone, asked or default_layers(backbone), weights=weights, pretrained=pretrained)
        return teacher, backbone, ""
    except WeightsNotFoundError as err:
        if weights is not None or not allow_fallback:
            raise
        looked = "\n".join(line for line in str(err).splitlines() if line.startswith("  - "))
    config = get_backbone_config(backbone)
    # Layers the caller named move to the fallback's layers at the same strides; with none named,
    # the fallback takes its own STFPM layers (the strides that work on it, not ResNet-18's).
    new_layers = fallback_layers(backbone, asked) if asked else default_layers(FALLBACK_BACKBONE)
    teacher = FeatureExtractor(FALLBACK_BACKBONE, new_layers)  # packaged weights, or its own error
    note = (
        f"STFPM: no ImageNet weights for backbone {backbone!r} on this machine, so the teacher and student "
        f"use {FALLBACK_BACKBONE!r} (weights from its pip package) with layers {teacher.layers} at strides "
        f"{teacher.strides}, in place of {asked or default_layers(backbone)}. "
        f"To use {backbone}: copy {config.weight_file} ({config.weight_url}) into {torch_hub_checkpoint_dir()}, "
        f"or pass weights='/path/to/{config.weight_file}' (CLI: --weights); allow_fallback=False "
        f"makes this an error instead. Looked in:\n{looked}"
    )
    return teacher, FALLBACK_BACKBONE, note


def _constant(epoch: int) -> float:
    return 1.0


class Stfpm(AnomalyModel):
    """Student-Teacher Feature Pyramid Matching.

    Args:
        backbone: teacher and student architecture (see :data:`defectscope.backbones.BACKBONES`).
        layers: feature layers matched between teacher and student; None: :data:`STFPM_LAYERS`
            (ResNet-18: the reference's three stages; EfficientNet-Lite: blocks.4 and blocks.6).
        image_size: input size, a square int or (height, width); 256 as in the reference.
        weights: teacher weights file (else the local torch / Hugging Face cache is searched).
        pretrained: False builds a random teacher and searches for no weights (tests only).
        allow_fallback: no weights for ``backbone`` here: use EfficientNet-Lite0 at its strides, with a notice.
        lr: SGD learning rate of the student (0.4 in the reference).
        momentum: SGD momentum (0.9 in the reference).
        weight_decay: SGD weight decay (1e-4 in the paper's code; anomalib uses 1e-3).
        batch_reduction: ``"sum"`` the loss over a batch's images (anomalib's scale: larger steps,
            better after short training here) or ``"mean"`` (the paper's formula per batch).
        hard_fraction: share of each layer's positions in a batch, the worst-fitted ones, that the
            loss averages (hard-feature mining; 1.0: all of them, the paper's loss).
        translate: largest random shift of each training image, a fraction of its side: the
            student trains on a crop of each image that leaves out that fraction of its height and
            width, at a random offset, with the teacher's maps computed on the crop (0: none, the
            cached maps of the whole images are used).
        translate_max_images: shift only when the training set has at most this many images
            (:meth:`fit_feature_statistics` decides; larger sets train on the cached maps).
        pre_processor: resize and normalise inputs in :meth:`predict` (False: already pre-processed tensors).
        post_processor: outputs ``raw / (raw + s)`` in [0, 1), s the top held-out good score (False: raw).
        evaluator: compute metrics when the engine tests the model.
        visualizer: write heat-map overlays when the engine tests the model.
    """

    name = "stfpm"
    # The engine caches the teacher's features and hands them to training_step_images with the images.
    train_on_images_and_features = True
    # Models saved before translate_on existed load with it off (it only matters in training).
    optional_state_prefixes = ("translate_on",)
    min_batch_size = 2
    batch_size_reason = "the student's batch norm needs at least two images a step"
    # `defectscope train` without --epochs: 3 passes, raised to at least this many optimizer steps
    # (defectscope/cli.py, default_epochs). Why 1,200: on ELPV the student underfits (its distance
    # is the same on seen and unseen good cells and still falling); a hand loop on mono scored 0.939
    # at 550 steps and 0.952 at 1,100, and `defectscope train` 0.942 at 440 steps (10 epochs) and
    # 0.953 at 1,232 (28 epochs), its nearest-neighbour floor 0.953 (benchmarks/results/floor_elpv.md).
    # 40 generated images become 300 epochs, which is why small sets are shifted (TRANSLATE).
    default_epochs = 3
    min_default_steps = 1200

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] | None = None,
        image_size: int | tuple[int, int] = 256,
        weights: str | None = None,
        pretrained: bool = True,
        allow_fallback: bool = True,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        batch_reduction: str = "sum",
        hard_fraction: float = HARD_FRACTION,
        translate: float = TRANSLATE,
        translate_max_images: int = TRANSLATE_MAX_IMAGES,
        pre_processor: bool = True,
        post_processor: bool = True,
        evaluator: bool = True,
        visualizer: bool = True,
    ) -> None:
        check_setting("lr", lr, 0, low_open=True)
        check_setting("momentum", momentum, 0, 1, high_open=True)
        check_setting("weight_decay", weight_decay, 0)
        check_setting("hard_fraction", hard_fraction, 0, 1, low_open=True)
        check_setting("translate", translate, 0, 0.5)
        check_setting("translate_max_images", translate_max_images, 0, integer=True)
        if batch_reduction not in ("sum", "mean"):
            raise ValueError(f"batch_reduction must be 'sum' or 'mean', got {batch_reduction!r}. Fix: "
                             "batch_reduction='sum' (the default) or 'mean'.")
        teacher, used_backbone, note = build_teacher(backbone, layers, weights, pretrained, allow_fallback)
        super().__init__(
            backbone=used_backbone,
            image_size=image_size,
            weights=weights,
            pretrained=pretrained,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
            feature_extractor=teacher,
        )
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.batch_reduction, self.hard_fraction = batch_reduction, hard_fraction
        self.translate, self.translate_max_images = translate, translate_max_images
        self.hparams.update(allow_fallback=allow_fallback, lr=lr, momentum=momentum, weight_decay=weight_decay,
                            batch_reduction=batch_reduction, hard_fraction=hard_fraction, translate=translate,
                            translate_max_images=translate_max_images)
        # What the caller asked for when the teacher fell back (written to params.json).
        self.backbone_fallback = {"requested": backbone, "used": used_backbone} if note else {}
        if note:
            warnings.warn(note, BackboneFallbackNotice, stacklevel=2)

        # Same architecture and layers as the teacher, random weights, trainable; the timm
        # network itself (FeatureExtractor stays frozen in eval mode, the student must not).
        self.student = FeatureExtractor(used_backbone, teacher.layers, pretrained=False).model
        self.student.requires_grad_(True)
        self.student.train(self.training)
        # Largest raw score of held-out good images (set by calibrate); scales the post-processor.
        self.register_buffer("map_scale", torch.tensor(1.0))
        # Whether training shifts the images (set from the training set's size by
        # fit_feature_statistics; a buffer, so a resumed training keeps the decision).
        self.register_buffer("translate_on", torch.tensor(False))

    def params(self) -> dict:
        params = super().params()
        if self.backbone_fallback:
            params["backbone_fallback"] = dict(self.backbone_fallback)
        return params

    # ---- features ---------------------------------------------------------------------
    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher: ``[B,3,H,W]`` normalised images -> ``[B, D]``, its feature maps flattened and
        concatenated per image (one cache row per image; :meth:`split_features` undoes it)."""
        return torch.cat([m.flatten(1) for m in self.feature_extractor(self.roi_images(images)).values()], dim=1)

    def feature_params(self) -> dict:
        """Settings that change :meth:`extract_features` output beyond the backbone fingerprint,
        image size and normalisation (which the engine's cache key holds already)."""
        return {"teacher_maps": "flattened", "layers": list(self.feature_extractor.layers)}

    def fit_feature_statistics(self, features: torch.Tensor) -> None:
        """``[N, D]``, every training image's cached teacher maps: STFPM normalises each feature
        vector on its own, so the only thing fitted is whether training shifts the images
        (``translate`` > 0 and N <= ``translate_max_images``)."""
        self.translate_on.fill_(bool(self.translate > 0 and len(features) <= self.translate_max_images))

    @staticmethod
    def split_features(features: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[B, D]`` from :meth:`extract_features` -> the teacher maps, shaped as ``like`` (the
        student's maps of the same images, which have the teacher's shapes)."""
        shapes = [tuple(m.shape[1:]) for m in like]
        sizes = [c * h * w for c, h, w in shapes]
        if features.dim() != 2 or features.shape[1] != sum(sizes):
            raise ValueError(
                f"STFPM expected cached teacher features [B, {sum(sizes)}] (maps {shapes} flattened), got "
                f"{tuple(features.shape)}. Were they extracted at another image size or with other layers? "
                "Fix: delete the run's cache folder and train again."
            )
        parts = torch.split(features, sizes, dim=1)
        return [p.reshape(p.shape[0], *shape) for p, shape in zip(parts, shapes)]

    # ---- training ---------------------------------------------------------------------
    def training_step_images(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """One step: ``images`` ``[B,3,H,W]`` normalised, ``features`` their cached
        :meth:`extract_features` rows ``[B, D]`` -> the scalar loss (:func:`pyramid_loss`).
        On a small training set (``translate_on``, see :meth:`fit_feature_statistics`) the images
        are cropped at random offsets (:func:`random_crop`) and the teacher's maps are computed on
        the crops instead of read from ``features``."""
        images = self.roi_images(images)
        if self.translate_on:
            images = random_crop(images, self.translate)
            with torch.no_grad():
                teacher_maps = list(self.feature_extractor(images).values())
            return pyramid_loss(teacher_maps, self.student(images), self.batch_reduction, self.hard_fraction)
        student_maps = self.student(images)
        teacher_maps = self.split_features(features.to(student_maps[0].dtype), student_maps)
        return pyramid_loss(teacher_maps, student_maps, self.batch_reduction, self.hard_fraction)

    @torch.no_grad()
    def validation_loss(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` normalised held-out good images -> ``[B]``, each image's loss as training
        measures it with every position counted (:func:`pyramid_loss` of that image alone, no
        shift): how far the student is from the teacher on good images it has not seen. The
        engine keeps the epoch where its mean is lowest (``Engine.select_epoch``)."""
        images = self.roi_images(images)
        teacher_maps = list(self.feature_extractor(images).values())
        student_maps = self.student(images)
        return sum(layer_distance(t, s).mean(dim=(1, 2, 3)) for t, s in zip(teacher_maps, student_maps, strict=True))

    def configure_optimizers(self, max_epochs: int):
        """SGD on the student's parameters (``lr``, ``momentum``, ``weight_decay``) and a
        constant schedule (the reference keeps the learning rate fixed)."""
        optimizer = torch.optim.SGD(
            self.student.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Set ``map_scale`` to the largest raw score of held-out good images (normalised
        batches), so post-processed good images score at most about 0.5.

        Returns those images' scores and map maxima as :meth:`forward` now gives them (the
        engine sets the threshold from them without scoring the images again), or None when
        no image came."""
        raw = [self.raw_outputs(images)[1] for images in batches]
        if not raw:
            return None
        raw = torch.cat(raw)
        self.map_scale.fill_(raw.max().clamp_min(1e-12))
        # The score is the map's maximum and the post-processor is monotonic, so both are
        # exactly what forward computes for the score.
        scores = raw / (raw + self.map_scale) if self.post_processor else raw
        return scores, scores

    # ---- inference --------------------------------------------------------------------
    def raw_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B,3,H,W]`` normalised images -> raw anomaly maps ``[B,1,H,W]`` and scores ``[B]``."""
        images = self.roi_images(images)
        teacher_maps = list(self.feature_extractor(images).values())
        student_maps = self.student(images)
        maps = anomaly_map(teacher_maps, student_maps, images.shape[-2:])
        return self.apply_roi(maps, maps.amax(dim=(1, 2, 3)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B,3,H,W]`` normalised images -> anomaly maps ``[B,1,H,W]`` and scores ``[B]`` (the
        map's maximum); in [0, 1) when ``post_processor`` is on (same order as the raw values)."""
        maps, scores = self.raw_outputs(images)
        if self.post_processor:
            return maps / (maps + self.map_scale), scores / (scores + self.map_scale)
        return maps, scores
