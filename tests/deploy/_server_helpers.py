"""Shared by the server tests: one tiny model, saved as a run folder and exported to ONNX."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from _cli_helpers import save_untrained_ssn
from PIL import Image

PIXEL_THRESHOLD = 0.55


def make_model(base: Path) -> dict:
    """A saved 64 px SuperSimpleNet (fitted statistics, no training: fast), its ONNX export, and
    a few synthetic test images (good and defective)."""
    from defectscope.cli import main
    from defectscope.data import make_synthetic_mvtec

    make_synthetic_mvtec(base / "data", category="tile", image_size=64, n_train=2, n_test_good=2, n_test_defect=2)
    images = sorted((base / "data" / "tile" / "test").rglob("*.png"))
    run_dir = base / "model"
    save_untrained_ssn(run_dir, images, PIXEL_THRESHOLD)
    assert main(["export", str(run_dir), "--output", str(base / "export"), "--exporter", "legacy"]) == 0
    return {"run_dir": run_dir, "onnx": base / "export" / "model.onnx", "images": images}


def png_bytes(array: np.ndarray | None = None, size: int = 64) -> bytes:
    if array is None:
        array = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
