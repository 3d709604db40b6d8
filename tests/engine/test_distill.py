"""Teacher distillation (defectscope distill-teacher): the reference's patch descriptors, a tiny
run that writes a teacher EfficientAD loads, resuming a killed run, and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from defectscope.cli import UsageError
from defectscope.cli_distill import build_parser, main
from defectscope.engine.distill import checkpoint_path, distill_teacher, reference_projection
from defectscope.models import EfficientAd
from defectscope.models.model_files import ModelFileError

TINY = dict(image_size=32, batch_size=2, progress=False, accelerator="cpu")  # backbone at 64 px, PDN grid 8x8


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Natural-image stand-ins in class sub-folders, as ImageNet's train folder."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for klass in ("a", "b"):
        (root / klass).mkdir()
        for i in range(3):
            noise = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)
            Image.fromarray(noise).resize((96, 80)).save(root / klass / f"{i}.png")
    return root


def reference_embed(layer2: torch.Tensor, layer3: torch.Tensor, out: int = 384, dim: int = 1024) -> torch.Tensor:
    """nelson1425/EfficientAD pretraining.py's FeatureExtractor.embed, written out: 3x3 patches of
    each layer, the coarse layer's patches upscaled to the fine grid, each layer's patch vector
    average-pooled to ``dim``, stacked, pooled to ``out``."""
    b, _, h, w = layer2.shape
    vectors = []
    for feature in (layer2, layer3):
        c, fh, fw = feature.shape[1:]
        patches = F.unfold(feature, kernel_size=3, padding=1).reshape(b, c * 9, fh, fw)
        patches = F.interpolate(patches, size=(h, w), mode="bilinear", align_corners=False)
        flat = patches.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)
        vectors.append(F.adaptive_avg_pool1d(flat, dim).squeeze(1))
    stacked = torch.stack(vectors, dim=1).reshape(b * h * w, 1, -1)
    return F.adaptive_avg_pool1d(stacked, out).reshape(b, h, w, out).permute(0, 3, 1, 2)


def test_projection_is_the_reference_patch_descriptor():
    torch.manual_seed(0)
    layer2, layer3 = torch.randn(2, 40, 8, 8, dtype=torch.float64), torch.randn(2, 112, 4, 4, dtype=torch.float64)
    w2, w3 = (w.double() for w in reference_projection([40, 112]))
    ours = F.conv2d(layer2, w2, padding=1) + F.interpolate(F.conv2d(layer3, w3, padding=1), size=(8, 8),
                                                           mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, reference_embed(layer2, layer3))


def test_distilled_teacher_is_a_file_efficientad_loads(image_dir, tmp_path):
    output = tmp_path / "teacher_s.pth"
    meta = distill_teacher(output, images=image_dir, steps=3, seed=1, **TINY)
    assert output.is_file() and not checkpoint_path(output).exists()
    assert meta["steps"] == 3 and meta["seed"] == 1 and meta["backbone"] == "efficientnet_lite0"
    assert meta["images"] == f"random crops of 6 images of {image_dir.resolve()}"
    assert np.isfinite(meta["final_loss"]) and meta["model_size"] == "s"
    model = EfficientAd(teacher_weights=str(output), image_size=64)
    assert "distilled from efficientnet_lite0" in model.feature_extractor.weights_source
    assert "3 steps, seed 1" in model.params()["backbone_weights_source"]
    assert model.params()["teacher"]["images"] == meta["images"]
    with pytest.raises(ModelFileError, match=r"PDN-S teacher, but model_size='m'"):
        EfficientAd(teacher_weights=str(output), model_size="m", image_size=64)


def test_a_killed_distillation_resumes_to_the_same_teacher(image_dir, tmp_path):
    whole = tmp_path / "whole.pth"
    distill_teacher(whole, images=image_dir, steps=4, checkpoint_every=1, **TINY)

    def kill_after_two(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    output = tmp_path / "killed.pth"
    with pytest.raises(KeyboardInterrupt):
        distill_teacher(output, images=image_dir, steps=4, checkpoint_every=1, on_step=kill_after_two, **TINY)
    assert checkpoint_path(output).is_file() and not output.exists()
    with pytest.raises(ModelFileError, match=r"other settings \(batch_size\).*--no-resume"):
        distill_teacher(output, images=image_dir, steps=4, **{**TINY, "batch_size": 1})
    meta = distill_teacher(output, images=image_dir, steps=4, checkpoint_every=1, **TINY)
    assert meta["resumed_from"] == 2 and not checkpoint_path(output).exists()
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (whole, output))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_command_line_writes_a_teacher_from_the_packaged_pictures(tmp_path, capsys):
    output = tmp_path / "teacher_m.pth"
    status = main(["--model-size", "M", "--output", str(output), "--steps", "1", "--batch-size", "1",
                   "--image-size", "32", "--no-progress", "--accelerator", "cpu"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "PDN-M teacher distilled from efficientnet_lite0 on random crops of 19 scikit-image" in printed
    assert f"--teacher-weights {output}" in printed
    meta = torch.load(output, weights_only=True)["meta"]
    assert meta["model_size"] == "m" and meta["steps"] == 1
    EfficientAd(teacher_weights=str(output), model_size="m", image_size=64)


def test_command_line_help_and_bad_options(capsys):
    assert main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "scikit-image" in help_text and "--images DIR" in help_text and "--no-resume" in help_text
    with pytest.raises(UsageError, match="--steps"):
        main(["--output", "x.pth", "--steps", "0"])
    with pytest.raises(UsageError, match="--output"):
        main([])
    assert build_parser().parse_args(["--output", "t.pth"]).steps == 2000
