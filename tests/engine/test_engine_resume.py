"""Reproducibility: seeds, resuming an interrupted run, atomic checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
from defectscope.models import ModelFileError
from _engine_helpers import CATEGORIES, EPOCHS, assert_same_state, build_model, make_engine, trained_state

METRICS = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold", "false_reject_rate", "escape_rate"]


def _test_metrics(engine, model, splits) -> dict:
    metrics = engine.test(model, splits[CATEGORIES[0]].test, category=CATEGORIES[0], save_images=False)
    return {k: metrics[k] for k in METRICS}


def _reference_metrics(reference_run) -> dict:
    return {k: reference_run["metrics"][0][k] for k in METRICS}


def test_same_seed_same_model_other_seed_other_model(reference_run, splits, tmp_path):
    train = splits[CATEGORIES[0]].train
    again = make_engine(tmp_path, "again")
    model = again.fit(build_model(), train)
    assert_same_state(trained_state(model), reference_run["state"])
    assert _test_metrics(again, model, splits) == _reference_metrics(reference_run)

    other = make_engine(tmp_path, "other", seed=1)
    model = other.fit(build_model(), train)
    state = trained_state(model)
    assert not torch.equal(state["segdec.seg_head.0.weight"], reference_run["state"]["segdec.seg_head.0.weight"])
    assert not torch.equal(state["adaptor.weight"], reference_run["state"]["adaptor.weight"])


def test_interrupted_run_resumes_to_the_same_model(reference_run, splits, tmp_path, capsys):
    train = splits[CATEGORIES[0]].train
    stop_after = 1  # epoch index: two of three epochs done

    def interrupt(epoch, loss):
        if epoch == stop_after:
            raise KeyboardInterrupt

    first = make_engine(tmp_path, "resumed", on_epoch_end=interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.fit(build_model(), train)
    model_dir = first.run_dir / "models" / "0"
    assert torch.load(model_dir / "last.ckpt", weights_only=True)["epoch"] == stop_after + 1
    assert not (model_dir / "ckpt.pth").exists()

    epochs_run = []
    second = make_engine(tmp_path, "resumed", on_epoch_end=lambda epoch, loss: epochs_run.append(epoch))
    # Other initial weights: everything must come from the checkpoint.
    model = second.fit(build_model(seed=123), train)
    assert epochs_run == list(range(stop_after + 1, EPOCHS))
    assert f"from epoch {stop_after + 1}/{EPOCHS}" in capsys.readouterr().out
    assert_same_state(trained_state(model), reference_run["state"])
    assert _test_metrics(second, model, splits) == _reference_metrics(reference_run)


def test_resume_refuses_a_run_with_other_settings(splits, tmp_path):
    train = splits[CATEGORIES[0]].train
    make_engine(tmp_path, "run", max_epochs=1).fit(build_model(), train)
    with pytest.raises(ModelFileError, match="other settings") as err:
        make_engine(tmp_path, "run", max_epochs=2).fit(build_model(), train)
    assert "epochs (1 then, 2 now)" in str(err.value) and "--no-resume" in str(err.value)
    with pytest.raises(ModelFileError, match="lr_scale") as err:
        make_engine(tmp_path, "run", max_epochs=1).fit(build_model(lr_scale=3.0), train)
    # Starting again on purpose is allowed.
    make_engine(tmp_path, "run", max_epochs=2, resume=False).fit(build_model(), train)


def test_failed_checkpoint_write_keeps_the_previous_one(reference_run, splits, tmp_path, monkeypatch):
    train = splits[CATEGORIES[0]].train
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, fh, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's last.ckpt
            fh.write(b"partial checkpoint bytes")
            raise OSError("No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    snapshots = []
    engine = make_engine(
        tmp_path, "atomic", on_epoch_end=lambda epoch, loss: snapshots.append((model_dir / "last.ckpt").read_bytes())
    )
    model_dir = engine.run_dir / "models" / "0"
    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="No space left"):
        engine.fit(build_model(), train)
    monkeypatch.undo()
    assert os.listdir(model_dir) == ["last.ckpt"]  # no temporary file left behind
    assert len(snapshots) == 1 and (model_dir / "last.ckpt").read_bytes() == snapshots[0]  # intact
    state = torch.load(model_dir / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1

    # The run resumes from the surviving checkpoint and ends where an uninterrupted run ends.
    model = make_engine(tmp_path, "atomic").fit(build_model(seed=7), train)
    assert_same_state(trained_state(model), reference_run["state"])
