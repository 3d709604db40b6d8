"""Tiling of large images (defectscope/data/tiling.py) and ``train --tile``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import read_csv, run_cli, single_thread  # noqa: F401 (single_thread: an autouse fixture)
from PIL import Image

from defectscope.data import Sample
from defectscope.data.tiling import (
    TiledSample,
    Tiler,
    blend_window,
    make_large_image,
    stitch,
    tile_boxes,
    tile_samples,
)


# ---- the grid ---------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width,tile,overlap", [(2000, 4000, 256, 32), (300, 257, 128, 0), (100, 90, 128, 8),
                                                      (512, 512, 256, 0), (700, 333, (128, 96), 16)])
def test_tiles_cover_every_pixel_flush_with_the_border(height, width, tile, overlap):
    boxes = tile_boxes(height, width, tile, overlap)
    covered = np.zeros((height, width), np.int32)
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert (bottom - top, right - left) == (min(th, height), min(tw, width))
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    assert max(b[2] for b in boxes) == width and max(b[3] for b in boxes) == height
    lefts = sorted({b[0] for b in boxes})
    if len(lefts) > 1:  # neighbours share at least `overlap` pixels, never a gap
        assert all(b - a <= min(tw, width) - overlap for a, b in zip(lefts, lefts[1:]))


def test_a_4000x2000_frame_at_256_with_32_overlap_is_18_by_9_tiles():
    boxes = tile_boxes(2000, 4000, 256, 32)
    assert len(boxes) == 18 * 9 and boxes[0] == (0, 0, 256, 256) and boxes[-1] == (3744, 1744, 4000, 2000)


def test_bad_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        tile_boxes(100, 100, 64, 64)
    with pytest.raises(ValueError, match="under half"):
        Tiler(64, 32)


# ---- stitching ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [0, 16, 40])
def test_stitching_the_tiles_of_a_map_gives_the_map_back(overlap):
    full = torch.rand(1, 300, 500, generator=torch.Generator().manual_seed(0))
    boxes = tile_boxes(300, 500, 128, overlap)
    stitched = stitch([full[:, t:b, l:r] for l, t, r, b in boxes], boxes, (300, 500), overlap)
    torch.testing.assert_close(stitched, full)


def test_overlaps_blend_without_seams():
    """Two tiles that disagree by a constant: across their overlap the stitched map moves
    smoothly from one to the other (no step larger than the ramp's)."""
    boxes = tile_boxes(64, 224, 128, 32)
    assert len(boxes) == 2
    maps = [torch.zeros(1, 64, 128), torch.ones(1, 64, 128)]
    row = stitch(maps, boxes, (64, 224), 32)[0, 10]
    steps = (row[1:] - row[:-1]).abs()
    assert float(row[0]) == 0 and float(row[-1]) == 1 and float(steps.max()) < 0.2
    window = blend_window(8, 8, 3)
    assert float(window.min()) > 0 and float(window[4, 4]) == 1


# ---- a 4000x2000 frame with one small defect, through a trained SuperSimpleNet --------------------
def test_4000x2000_frame_one_small_defect_tops_the_stitched_map():
    """One good frame's tiles train a SuperSimpleNet (64 px input, 256 px tiles); on a new frame
    with one dark spot (radius 20 px, 0.03 % of the frame) the stitched map peaks on the spot, and
    its score is above a good frame's."""
    from defectscope.models import SuperSimpleNet

    torch.manual_seed(0)
    model = SuperSimpleNet(backbone="efficientnet_lite0", image_size=64, upscale_factor=1)
    tiler = Tiler(256, 32, batch_size=64)
    good = torch.from_numpy(make_large_image(seed=1)).permute(2, 0, 1).float() / 255
    tiles = tiler._tiles(model, good, tile_boxes(2000, 4000, 256, 32))
    with torch.no_grad():
        feats = model.extract_features(tiles)
    model.fit_feature_statistics(feats)
    optimizer, _ = model.configure_optimizers(10)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = model.training_step(feats[torch.randperm(len(feats), generator=g)[:16]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    cy, cx = 1300, 2900
    score, full = tiler.predict(model, make_large_image(defect=(cy, cx, 20), seed=3))
    good_score, _ = tiler.predict(model, make_large_image(seed=4))
    assert full.shape == (2000, 4000)
    peak = np.unravel_index(int(full.argmax()), full.shape)
    assert abs(peak[0] - cy) <= 40 and abs(peak[1] - cx) <= 40, peak
    assert score == pytest.approx(float(full.max())) and score > good_score + 0.1


# ---- training tiles and the engine ----------------------------------------------------------------
def test_tile_samples_splits_large_images_only(tmp_path):
    Image.fromarray(make_large_image(300, 500, seed=0)).save(tmp_path / "big.png")
    Image.fromarray(make_large_image(100, 100, seed=0)).save(tmp_path / "small.png")
    out = tile_samples([Sample(tmp_path / "big.png", 0), Sample(tmp_path / "small.png", 0)], 128, 16)
    tiles = [s for s in out if isinstance(s, TiledSample)]
    assert len(tiles) == len(tile_boxes(300, 500, 128, 16)) and len(out) == len(tiles) + 1
    from defectscope.data import AnomalyDataset

    item = AnomalyDataset(tiles[:1], image_size=64, mean=None, std=None)[0]
    expected = torch.from_numpy(make_large_image(300, 500, seed=0)[:128, :128]).permute(2, 0, 1).float() / 255
    expected = torch.nn.functional.interpolate(expected[None], size=(64, 64), mode="bilinear", antialias=True,
                                               align_corners=False)[0]
    torch.testing.assert_close(item["image"], expected, atol=1e-5, rtol=0)


def test_cli_train_with_tiles_non_square_input(tmp_path, monkeypatch):
    """``train --tile 128 --tile-overlap 16 --image-size 96 64``: trains on tiles of 384x256 frames,
    tests on stitched maps, and saves the tiling with the model."""
    monkeypatch.chdir(tmp_path)
    good, bad, masks = tmp_path / "good", tmp_path / "bad", tmp_path / "masks"
    for folder in (good, bad, masks):
        folder.mkdir()
    for i in range(6):
        Image.fromarray(make_large_image(256, 384, seed=10 + i)).save(good / f"g{i}.png")
    for i in range(2):
        cy, cx = 60 + 100 * i, 90 + 150 * i
        Image.fromarray(make_large_image(256, 384, defect=(cy, cx, 12), seed=20 + i)).save(bad / f"b{i}.png")
        mask = np.zeros((256, 384), np.uint8)
        yy, xx = np.ogrid[:256, :384]
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= 144] = 255
        Image.fromarray(mask).save(masks / f"b{i}.png")
    code = run_cli(["train", "--data", "folder", "--normal-dir", good, "--abnormal-dir", bad, "--mask-dir", masks,
                    "--test-split-ratio", 0.34, "--epochs", 1, "--image-size", 96, 64, "--tile", 128,
                    "--tile-overlap", 16, "--upscale-factor", 1, "--results-path", tmp_path / "results",
                    "--run-name", "tiles", "--no-images", "--no-progress", "--accelerator", "cpu", "--val-fraction", 0.25])
    assert code == 0
    run_dir = tmp_path / "results" / "defectscope" / "folder" / "tiles"
    params = json.loads((run_dir / "models" / "0" / "params.json").read_text())
    assert params["tiling"] == {"tile": 128, "overlap": 16}
    assert params["hparams"]["image_size"] == [64, 96]
    assert params["training"]["train_size"] >= 2 * 9  # trained on tiles: 9 per 256x384 frame
    rows = read_csv(run_dir / "results.csv")
    assert rows[0]["n_test"] not in ("", "0")
    assert rows[0]["pixel_auroc"] not in ("", "nan")  # pixel metrics on the stitched maps
    # Tile width follows the input's aspect ratio: 128 high, 192 wide.
    assert tile_boxes(256, 384, (128, 192), 16)[0] == (0, 0, 192, 128)
    # The loaded model scores a frame by its tiles too: a full-resolution map, its maximum the score.
    from defectscope.models import load_model

    model = load_model(run_dir)
    assert model.tiling_info == {"tile": 128, "overlap": 16}
    score, anomaly_map = model.predict(bad / "b0.png")
    assert anomaly_map.shape == (256, 384) and score == pytest.approx(float(anomaly_map.max()))
    # `predict` streams tiled too: the same score as model.predict, regions in full-frame pixels.
    out = tmp_path / "pred"
    assert run_cli(["predict", run_dir, bad / "b0.png", good / "g0.png", "--output", out, "--no-progress",
                    "--accelerator", "cpu", "--save-maps", "npy"]) == 0
    rows = {Path(r["file"]).name: r for r in read_csv(out / "predictions.csv")}
    assert float(rows["b0.png"]["score"]) == pytest.approx(score, rel=1e-5)
    saved = np.load(next((out / "maps").glob("*b0*.npy")))
    assert saved.shape == (256, 384)
    np.testing.assert_allclose(saved, anomaly_map, rtol=1e-4, atol=1e-6)
