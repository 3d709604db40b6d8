"""Pictures people would rather look at than read: heat-map overlays of test images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from defectscope.data import load_image


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 ``[H,W,3]`` image and ``[H,W]`` map -> RGB overlay (jet colours, scaled to ``vmin..vmax``)."""
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colours = (colormaps["jet"](scaled)[..., :3] * 255).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def save_overlay(
    path: str | Path,
    image_path: str | Path,
    anomaly_map: np.ndarray,
    score: float,
    threshold: float,
    vmin: float,
    vmax: float,
    mask: np.ndarray | None = None,
) -> Path:
    """Write ``image | heat-map overlay | ground truth (if any)`` side by side, with the score,
    as one PNG. ``anomaly_map`` is ``[h,w]``; the image is resized to it."""
    h, w = anomaly_map.shape
    image = np.asarray(load_image(image_path).resize((w, h), Image.BILINEAR))
    panels = [image, heatmap_overlay(image, anomaly_map, vmin, vmax)]
    if mask is not None:
        outline = image.copy()
        outline[mask.astype(bool)] = (0.5 * outline[mask.astype(bool)] + [127, 0, 0]).astype(np.uint8)
        panels.append(outline)
    strip = Image.fromarray(np.concatenate(panels, axis=1))
    verdict = "DEFECT" if score >= threshold else "good"
    draw = ImageDraw.Draw(strip)
    draw.rectangle((0, 0, 150, 14), fill=(0, 0, 0))
    draw.text((3, 2), f"{verdict} score={score:.3f}", fill=(255, 80, 80) if verdict == "DEFECT" else (120, 255, 120))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path
