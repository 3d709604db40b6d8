"""Two CPU processes under DDP (Lightning Fabric, gloo): training, test and batch prediction
give what one process gives on the same trained model."""

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
    engine = Engine(results_path=results, run_name="ddp", max_epochs=1, batch_size=4, accelerator="cpu",
                    devices=2, strategy="ddp", progress=False)
    engine.fit(model, split.train)
    metrics = engine.test(model, split.test, category="{category}", save_images=False)
    paths = [str(s.path) for s in split.test]
    predictions = engine.predict(model, paths)
    if engine.fabric.is_global_zero:
        json.dump(dict(world=engine.fabric.world_size, metrics={{k: metrics[k] for k in
                  ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")}}, predictions=predictions), open(out, "w"))
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
