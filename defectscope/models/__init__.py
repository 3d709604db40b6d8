"""Models: one self-contained file per architecture and a small registry by name."""

from defectscope.models.base import AnomalyModel, find_model_dir, list_model_dirs
from defectscope.models.efficientad import EfficientAd
from defectscope.models.model_files import ModelFileError
from defectscope.models.simplenet import SimpleNet
from defectscope.models.stfpm import Stfpm
from defectscope.models.supersimplenet import SuperSimpleNet

MODELS: dict[str, type[AnomalyModel]] = {
    "supersimplenet": SuperSimpleNet,
    "simplenet": SimpleNet,
    "efficientad": EfficientAd,
    "stfpm": Stfpm,
}


def model_key(name: str) -> str:
    """Registry key of a model name: case, '-' and '_' do not matter ("Super-SimpleNet")."""
    return name.lower().replace("-", "").replace("_", "")


def create_model(name: str, **kwargs) -> AnomalyModel:
    """Build a model by registry name (see :func:`model_key`)."""
    key = model_key(name)
    if key not in MODELS:
        import difflib

        close = difflib.get_close_matches(key, MODELS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown model '{name}'. Available: {', '.join(MODELS)}.{hint}")
    return MODELS[key](**kwargs)


def load_model(path, weights=None, category=None) -> AnomalyModel:
    """Rebuild a trained model from a run folder (or its models/<n> folder) using params.json;
    ``category`` picks the model of a multi-category run."""
    return AnomalyModel.load_from_path(path, weights=weights, category=category)


__all__ = ["AnomalyModel", "EfficientAd", "MODELS", "ModelFileError", "list_model_dirs", "SimpleNet", "Stfpm", "SuperSimpleNet", "create_model", "find_model_dir", "load_model",
           "model_key"]
