"""Frozen ImageNet feature extractors built from timm ``features_only`` models.

Anomaly detectors in defectscope (SuperSimpleNet, SimpleNet, STFPM, EfficientAD) read mid-level
feature maps of a frozen, pre-trained CNN. :class:`FeatureExtractor` is that CNN: weights from
:func:`~defectscope.backbones.weights.resolve_weights`, always in eval mode, no gradients to its
parameters, and a ``fingerprint`` that changes whenever the features would.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence

import timm
import torch
from torch import Tensor, nn

from defectscope.backbones.registry import BackboneConfig, get_backbone_config
from defectscope.backbones.weights import resolve_weights

RANDOM_WEIGHTS = "random initialisation (pretrained=False)"


def feature_layer_names(backbone: str) -> list[str]:
    """The layer names a backbone can return, in network order (timm ``feature_info``)."""
    config = get_backbone_config(backbone)
    with torch.device("meta"):
        model = timm.create_model(config.timm_name, pretrained=False, features_only=True)
    return list(model.feature_info.module_name())


def _load_checked(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load the part of a full-classifier state dict that ``model`` uses; every key must be there.

    timm's feature models keep the classifier's parameter names and drop the head (and, for
    ResNets, the stages after the last requested one), so ``state`` is a superset of what is
    needed; a missing key means a naming change and fails here rather than leaving random weights.
    """
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(
            f"Weights from {source} lack {len(missing)} tensors the feature model needs, "
            f"e.g. {missing[:3]}."
        )
    model.load_state_dict({k: state[k] for k in wanted}, strict=True)


def _fingerprint(name: str, layers: Sequence[str], state: Mapping[str, Tensor]) -> str:
    """Short hash of architecture, layers and weights, for feature-cache keys.

    Hashes every tensor's name and shape and the exact bytes of an evenly strided sample of up
    to 256 of its values. Any two different checkpoints (or a fine-tuned one) differ in those
    samples; hashing all bytes would cost ~0.2 s for WideResNet-50 for no practical gain. Exact
    bytes rather than sums, so the hash does not depend on thread count or machine.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{name}|{','.join(layers)}".encode())
    for key, tensor in state.items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256]
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureExtractor(nn.Module):
    """A frozen timm backbone returning the feature maps of chosen layers.

    Args:
        backbone: a name from ``BACKBONES`` (optionally with a timm tag, ``"resnet18.tv_in1k"``).
        layers: layer names from timm ``feature_info.module_name()``, e.g. ``["layer2", "layer3"]``
            for ResNets, ``["blocks.2", "blocks.4"]`` for EfficientNet-Lite. ``None``: the
            backbone's ``default_layers``. Outputs are in network order whatever order is given.
        weights: a weights file or state dict; ``None`` looks for packaged or cached weights.
        pretrained: ``False`` builds random weights and looks for no file (for tests).
        allow_download: let timm download weights that are nowhere on this machine.

    Attributes:
        config: the :class:`BackboneConfig`; take ``mean``/``std`` for normalisation from it.
        layers, channels, strides: per returned layer, in network order.
        weights_source: where the weights came from.
        fingerprint: 16 hex characters identifying backbone, layers and weights.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        weights: str | os.PathLike | Mapping[str, Tensor] | None = None,
        pretrained: bool = True,
        allow_download: bool = False,
    ) -> None:
        super().__init__()
        self.config: BackboneConfig = get_backbone_config(backbone)
        valid = feature_layer_names(backbone)
        if layers is None:
            layers = list(self.config.default_layers)
        elif isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        unknown = [name for name in layers if name not in valid]
        if unknown or not layers or len(set(layers)) != len(layers):
            problem = f"unknown {unknown}" if unknown else "empty or repeated names"
            raise ValueError(
                f"Invalid layers {layers} for backbone {self.config.name!r} ({problem}). "
                f"Valid layers: {valid}."
            )
        out_indices = sorted(valid.index(name) for name in layers)

        if not pretrained and weights is not None:
            raise ValueError("weights were given but pretrained=False; pass one or the other.")

        self.model = timm.create_model(
            self.config.timm_name, pretrained=False, features_only=True, out_indices=out_indices
        )
        if pretrained:
            state, self.weights_source = resolve_weights(backbone, weights, allow_download)
            _load_checked(self.model, state, self.weights_source)
        else:
            self.weights_source = RANDOM_WEIGHTS

        self.layers: list[str] = [valid[i] for i in out_indices]
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.strides: list[int] = list(self.model.feature_info.reduction())
        assert list(self.model.feature_info.module_name()) == self.layers

        self.requires_grad_(False)
        super().train(False)
        self.fingerprint: str = _fingerprint(
            self.config.timm_name, self.layers, self.model.state_dict()
        )

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode: BatchNorm statistics of a frozen backbone must never update."""
        return super().train(False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Feature maps of the chosen layers.

        Args:
            images: ``[B, 3, H, W]``, normalised with ``config.mean`` / ``config.std``.

        Returns:
            ``{layer: [B, C_i, ceil(H / s_i), ceil(W / s_i)]}`` for ``layer, C_i, s_i`` in
            ``zip(layers, channels, strides)``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"FeatureExtractor expects images of shape [B, 3, H, W], got {tuple(images.shape)}."
            )
        return dict(zip(self.layers, self.model(images)))

    def extra_repr(self) -> str:
        return (
            f"backbone={self.config.name!r}, layers={self.layers}, "
            f"weights_source={self.weights_source!r}, fingerprint={self.fingerprint!r}"
        )


def create_classifier(
    name: str,
    weights: str | os.PathLike | Mapping[str, Tensor] | None = None,
    pretrained: bool = True,
    allow_download: bool = False,
) -> nn.Module:
    """The full timm ImageNet classifier for a backbone, weights resolved as for features.

    Returned in eval mode, gradients left on; ``model.weights_source`` says where the weights
    came from. Normalise inputs with ``get_backbone_config(name).mean`` / ``.std``.
    """
    config = get_backbone_config(name)
    if not pretrained and weights is not None:
        raise ValueError("weights were given but pretrained=False; pass one or the other.")
    model = timm.create_model(config.timm_name, pretrained=False)
    if pretrained:
        state, source = resolve_weights(name, weights, allow_download)
        model.load_state_dict(state, strict=True)
    else:
        source = RANDOM_WEIGHTS
    model.weights_source = source
    return model.eval()
