"""Pre-trained CNN backbones that work offline: weight facts, weight resolution, feature extraction.

>>> from defectscope.backbones import FeatureExtractor
>>> extractor = FeatureExtractor("efficientnet_lite0")      # packaged weights, no download
>>> mean, std = extractor.config.mean, extractor.config.std  # normalise images with these
>>> features = extractor(images)                             # {"blocks.2": ..., "blocks.4": ...}
"""

from defectscope.backbones.extractor import (
    FeatureExtractor,
    create_classifier,
    feature_layer_names,
)
from defectscope.backbones.registry import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFLINE_DEFAULT,
    BackboneConfig,
    get_backbone_config,
)
from defectscope.backbones.weights import (
    WeightsNotFoundError,
    check_state_dict,
    hf_hub_cache_dir,
    load_weights_file,
    remap_efficientnet_pytorch,
    resolve_weights,
    torch_hub_checkpoint_dir,
)

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFLINE_DEFAULT",
    "BackboneConfig",
    "FeatureExtractor",
    "WeightsNotFoundError",
    "check_state_dict",
    "create_classifier",
    "feature_layer_names",
    "get_backbone_config",
    "hf_hub_cache_dir",
    "load_weights_file",
    "remap_efficientnet_pytorch",
    "resolve_weights",
    "torch_hub_checkpoint_dir",
]
