"""Engine: fit, test and predict on Lightning Fabric, run folders, feature caching."""

from defectscope.engine.engine import Engine
from defectscope.engine.feature_cache import cache_key, extract_features

__all__ = ["Engine", "cache_key", "extract_features"]
