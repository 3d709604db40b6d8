"""The engine and SuperSimpleNet on a CUDA GPU. Skipped where there is none (CI has none);
benchmarks/gpu_check.py is the fuller check with timings."""

from __future__ import annotations

import pytest
import torch
from _engine_helpers import CATEGORIES, build_model, make_engine, read_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def float32_convolutions():
    """TF32 off: PyTorch's default TF32 convolutions move logits by ~3e-3 relative, which is the
    hardware's choice, not a bug in the model; with it off CPU and GPU must agree to round-off."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_the_same_weights_give_the_same_maps_and_scores_on_cpu_and_gpu(float32_convolutions):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cpu = build_model(post_processor=False).eval()
    cpu.fit_feature_statistics(cpu.extract_features(images))
    gpu = build_model(post_processor=False)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda").eval()
    with torch.inference_mode():
        map_cpu, score_cpu = cpu(images)
        map_gpu, score_gpu = gpu(images.cuda())
    assert map_gpu.device.type == "cuda"
    torch.testing.assert_close(map_gpu.cpu(), map_cpu, rtol=1e-4, atol=1e-4 * map_cpu.abs().max().item())
    torch.testing.assert_close(score_gpu.cpu(), score_cpu, rtol=1e-4, atol=1e-4 * score_cpu.abs().max().item())


def test_the_engine_trains_and_tests_on_the_gpu(tmp_path, splits):
    engine = make_engine(tmp_path, "cuda", accelerator="cuda")
    model = engine.fit(build_model(), splits[CATEGORIES[0]].train)
    assert next(model.parameters()).device.type == "cuda"
    metrics = engine.test(model, splits[CATEGORIES[0]].test, category=CATEGORIES[0])
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert read_results(engine.run_dir / "results.csv")[-1]["category"] == CATEGORIES[0]
    score, anomaly_map = model.predict(splits[CATEGORIES[0]].test[0].path)
    assert 0.0 <= score <= 1.0 and anomaly_map.shape[-2:] == (64, 64)
