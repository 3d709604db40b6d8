"""Two CPU processes under DDP (Lightning Fabric, gloo): training, test and batch prediction
give what one process gives on the same trained model, and the feature cache is extracted in
shares and gathered into what one process builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _engine_helpers import CATEGORIES

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from defectscope.data import mvtec_split
    from defectscope.engine import Engine
    from defectscope.models import SuperSimpleNet

    root, results, out = sys.argv[1:4]
    split = mvtec_split(root, "{category}")
    torch.manual_seed(0)
    model = SuperSimpleNet(backbone="efficientnet_lite0", image_size=64, upscale_factor=1)
    engine = Engine(results_path=results, run_name="ddp", max_epochs=2, batch_size=4, accelerator="cpu",
                    devices=2, strategy="ddp", progress=False)
    engine.fit(model, split.train)
    metrics = engine.test(model, split.test, category="{category}", save_images=False)
    paths = [str(s.path) for s in split.test]
    predictions = engine.predict(model, paths)
    if engine.fabric.is_global_zero:
        json.dump(dict(world=engine.fabric.world_size, metrics={{k: metrics[k] for k in
                  ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")}}, predictions=predictions), open(out, "w"))
    torch.distributed.destroy_process_group()  # else gloo can abort at exit, now and then
    """
)


@pytest.mark.timeout(300)
def test_ddp_on_two_cpu_processes_matches_one_process(synthetic_root, splits, tmp_path):
    category = CATEGORIES[0]
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(category=category))
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, str(script), str(synthetic_root), str(tmp_path / "results"), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2

    # The same trained model scored by one process.
    from _engine_helpers import make_engine

    from defectscope.models import load_model

    model = load_model(tmp_path / "results" / "project" / "group" / "ddp")
    single = make_engine(tmp_path / "single", "one")
    metrics = single.test(model, splits[category].test, category=category, save_images=False)
    for key, value in result["metrics"].items():
        assert value == pytest.approx(metrics[key], abs=1e-6), key
    predictions = single.predict(model, [s.path for s in splits[category].test])
    assert [p["path"] for p in result["predictions"]] == [p["path"] for p in predictions]  # order kept, no repeats
    np.testing.assert_allclose([p["score"] for p in result["predictions"]], [p["score"] for p in predictions], atol=1e-6)


CACHE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    import defectscope.engine.engine as engine_module
    from defectscope.data import AnomalyDataset, mvtec_split
    from defectscope.engine import Engine, extract_features
    from defectscope.models import SuperSimpleNet

    root, category, results, out = sys.argv[1:5]
    split = mvtec_split(root, category)
    torch.manual_seed(0)
    model = SuperSimpleNet(backbone="efficientnet_lite0", image_size=64, upscale_factor=1)
    # val_fraction=0: the cache holds every training image, as the one-process cache below.
    engine = Engine(results_path=results, run_name="ddp-cache", max_epochs=1, batch_size=3, accelerator="cpu",
                    devices=2, strategy="ddp", progress=False, val_fraction=0)

    def recorded(name, model, dataset, fabric, **kwargs):
        # extract_features, saving what this process got and how many images it ran through the backbone.
        images = []
        backbone = model.extract_features
        model.extract_features = lambda x: images.append(len(x)) or backbone(x)
        try:
            features = extract_features(model, dataset, fabric, **kwargs)
        finally:
            del model.extract_features  # the class's method again
        torch.save(dict(features=features.clone(), images=sum(images)), f"{out}/{name}-{fabric.global_rank}.pt")
        return features

    # The cache Engine.fit builds (in memory, float32) ...
    engine_module.extract_features = lambda *args, **kwargs: recorded("fit", *args, **kwargs)
    engine.fit(model, split.train)
    # ... and a memory-mapped float16 one.
    dataset = AnomalyDataset(split.train, image_size=model.image_size, mean=model.mean, std=model.std)
    recorded("mapped", model, dataset, engine.fabric, batch_size=3, max_memory_gb=0, float16_above_gb=0,
             cache_dir=f"{results}/mapped", progress=False)
    # Gloo processes that exit with their process group alive sometimes abort at interpreter
    # shutdown ("terminate called without an active exception", pytorch/pytorch#190489).
    torch.distributed.destroy_process_group()
    """
)


@pytest.mark.timeout(300)
def test_ddp_processes_share_the_feature_extraction_and_all_hold_the_one_process_cache(
    synthetic_root, splits, tmp_path
):
    import lightning as L
    import torch
    from _engine_helpers import build_model

    from defectscope.data import AnomalyDataset
    from defectscope.engine import cache_key, extract_features

    category = CATEGORIES[0]
    script = tmp_path / "ddp_cache.py"
    script.write_text(CACHE_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, str(script), str(synthetic_root), category, str(tmp_path / "results"), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # What one process builds, with the same batches (3 images).
    model = build_model()
    dataset = AnomalyDataset(splits[category].train, image_size=model.image_size, mean=model.mean, std=model.std)
    one = L.Fabric(accelerator="cpu", devices=1)
    expected = {
        "fit": extract_features(model, dataset, one, batch_size=3, progress=False),
        "mapped": extract_features(model, dataset, one, batch_size=3, max_memory_gb=0, float16_above_gb=0,
                                   cache_dir=tmp_path / "single", progress=False),
    }
    assert expected["fit"].dtype == torch.float32 and expected["mapped"].dtype == torch.float16
    for name, features in expected.items():
        ranks = [torch.load(out / f"{name}-{rank}.pt") for rank in (0, 1)]
        for rank, got in enumerate(ranks):
            # Bit-identical (dtype included), in dataset order.
            torch.testing.assert_close(got["features"], features, rtol=0, atol=0, msg=f"{name}, rank {rank}")
        # 8 images in batches of 3 are 3 batches (3, 3, 2 images), dealt round-robin: rank 0 runs
        # batches 0 and 2, rank 1 batch 1. Each image goes through the backbone once in all.
        assert [got["images"] for got in ranks] == [5, 3], name
    # One complete file, written once (no partial file left behind).
    files = sorted(p.name for p in (tmp_path / "results" / "mapped").iterdir())
    assert files == [f"features-{cache_key(model, dataset)}.npy"]
