"""Running a trained model on the line: exported models, the inferencer and prediction outputs (no PyTorch needed).

- :func:`export_model` (needs torch): a trained model -> one ONNX graph / OpenVINO IR and a JSON;
- :func:`load_inferencer` (no torch): runs the exported file with onnxruntime or OpenVINO;
- :func:`create_app` (FastAPI, the ``serve`` extra): a run folder or exported model as an HTTP
  service and web page (``defectscope serve``).

Names are imported on first use, so ``import defectscope.deploy`` never imports torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "export_model": "defectscope.deploy.export",
    "ExportError": "defectscope.deploy.export",
    "MissingExportDependency": "defectscope.deploy.export",
    "Inferencer": "defectscope.deploy.inferencer",
    "load_inferencer": "defectscope.deploy.inferencer",
    "create_app": "defectscope.deploy.server",
}

__all__ = ["ExportError", "Inferencer", "MissingExportDependency", "create_app", "export_model", "load_inferencer"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'defectscope.deploy' has no attribute {name!r}")
