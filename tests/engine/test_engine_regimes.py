"""Supervision regimes: the engine picks the regime from the data (or a request), tells the
user, and trains weak labels without pixel supervision."""

from __future__ import annotations

import json

import pytest
from _engine_helpers import CATEGORIES, assert_same_state, build_model, make_engine, trained_state

from defectscope.data import Sample


def _defects(splits, with_mask: int, without_mask: int) -> list[Sample]:
    defects = [s for s in splits[CATEGORIES[0]].test if s.label == 1 and s.mask_path is not None]
    assert len(defects) >= with_mask + without_mask
    weak = [Sample(s.path, 1, None, s.defect_type) for s in defects[with_mask : with_mask + without_mask]]
    return defects[:with_mask] + weak


def _spy(model, calls):
    original = model.training_forward

    def spy(features, masks=None, labels=None, mask_known=None):
        outputs = original(features, masks, labels, mask_known)
        calls.append(dict(labels=labels, mask_known=mask_known, seg_valid=outputs[4].detach()))
        return outputs

    model.training_forward = spy


@pytest.mark.parametrize(
    ("with_mask", "without_mask", "regime", "words"),
    [
        # 2 of the 8 good images are held out to set the threshold.
        (0, 0, "unsupervised", "unsupervised (6 good images); 2 held out"),
        (2, 0, "supervised", "supervised (6 good images, 2 defective: 2 with masks"),
        (0, 2, "weakly", "weakly supervised (6 good images, 2 defective: 0 with masks, 2 with image labels only"),
        (1, 1, "mixed", "mixed supervision (6 good images, 2 defective: 1 with masks, 1 with image labels only"),
    ],
)
def test_auto_regime_follows_the_data_and_is_reported(splits, tmp_path, capsys, with_mask, without_mask, regime, words):
    train = list(splits[CATEGORIES[0]].train) + _defects(splits, with_mask, without_mask)
    model = build_model()
    engine = make_engine(tmp_path, regime, max_epochs=1)
    engine.fit(model, train)
    assert engine.regime == regime
    assert f"Training regime: {words}" in capsys.readouterr().out
    supervised = regime != "unsupervised"
    assert model.supervised is supervised and model.hparams["supervised"] is supervised
    # The reference's supervised setting: no stop-gradient between the heads.
    assert model.segdec.stop_grad is (not supervised)
    params = json.loads((engine.run_dir / "models" / "0" / "params.json").read_text())
    assert params["training"]["regime"] == regime


def test_weak_labels_leave_their_positions_out_of_the_segmentation_loss(splits, tmp_path):
    train = list(splits[CATEGORIES[0]].train) + _defects(splits, 1, 1)
    model = build_model()
    calls = []
    _spy(model, calls)
    make_engine(tmp_path, "weak", max_epochs=2).fit(model, train)
    weak_seen = known_defect_seen = False
    for call in calls:
        known, labels, valid = call["mask_known"], call["labels"], call["seg_valid"]
        assert known is not None  # mixed data: the engine passes which masks are known
        b = len(labels)
        for i in range(b):
            for copy in (i, i + b):
                if not known[i]:
                    weak_seen = True
                    assert labels[i] == 1
                    # Only synthetic-noise positions can count; most of the map must not.
                    assert valid[copy].float().mean() < 1
                else:
                    known_defect_seen |= bool(labels[i] == 1)
                    assert valid[copy].all()
    assert weak_seen and known_defect_seen


def test_requested_unsupervised_drops_labelled_defects_with_a_notice(splits, tmp_path, capsys):
    train = list(splits[CATEGORIES[0]].train) + _defects(splits, 2, 0)
    engine = make_engine(tmp_path, "unsup", max_epochs=1)
    model = engine.fit(build_model(), train, regime="unsupervised")
    out = capsys.readouterr().out
    assert "notice: Regime 'unsupervised' requested: the 2 labelled defective" in out
    assert engine.regime == "unsupervised" and not model.supervised
    # Same model as training on the good images alone.
    alone = make_engine(tmp_path, "alone", max_epochs=1).fit(build_model(), splits[CATEGORIES[0]].train)
    assert_same_state(trained_state(alone), trained_state(model))


def test_requested_supervised_with_missing_masks_falls_back_to_weak_labels(splits, tmp_path, capsys):
    train = list(splits[CATEGORIES[0]].train) + _defects(splits, 1, 1)
    engine = make_engine(tmp_path, "sup", max_epochs=1)
    engine.fit(build_model(), train, regime="supervised")
    out = capsys.readouterr().out
    assert "1 of 2 defective training images have no mask: they train on their image label only" in out
    assert engine.regime == "mixed"
    assert (engine.run_dir / "models" / "0" / "ckpt.pth").is_file()


def test_supervised_request_without_defects_trains_unsupervised(splits, tmp_path, capsys):
    engine = make_engine(tmp_path, "none", max_epochs=1)
    engine.fit(build_model(supervised=True), splits[CATEGORIES[0]].train, regime="weakly")
    assert "has no labelled defective images: training unsupervised" in capsys.readouterr().out
    assert engine.regime == "unsupervised"


def test_killed_supervised_run_resumes_to_the_same_model(splits, tmp_path):
    train = list(splits[CATEGORIES[0]].train) + _defects(splits, 1, 1)
    full = make_engine(tmp_path, "full").fit(build_model(), train)

    def interrupt(epoch, loss):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_engine(tmp_path, "killed", on_epoch_end=interrupt).fit(build_model(), train)
    resumed = make_engine(tmp_path, "killed").fit(build_model(seed=7), train)
    assert_same_state(trained_state(full), trained_state(resumed))


def test_gradient_clipping_applies_only_when_set_and_supervised(splits, tmp_path, monkeypatch):
    train = list(splits[CATEGORIES[0]].train) + _defects(splits, 1, 0)
    for clip, data, expected in ((1.0, train, True), (None, train, False), (1.0, splits[CATEGORIES[0]].train, False)):
        engine = make_engine(tmp_path, f"clip-{clip}-{len(data)}", max_epochs=1)
        calls = []
        original = engine.fabric.clip_gradients
        monkeypatch.setattr(engine.fabric, "clip_gradients",
                            lambda *a, **k: calls.append(k["max_norm"]) or original(*a, **k))
        engine.fit(build_model(supervised_grad_clip=clip), data)
        assert (calls and set(calls) == {1.0}) if expected else not calls


def test_weakly_supervised_fit_fits_the_label_probe_and_thresholds_the_fused_score(splits, tmp_path):
    """After the optimizer loop the engine hands the model every training feature and label; the
    threshold is the rule applied to the fused scores forward gives the held-out good images."""
    import torch

    from defectscope.data.dataset import AnomalyDataset
    from defectscope.metrics.threshold import fit_threshold

    train = list(splits[CATEGORIES[0]].train) + _defects(splits, 0, 3)
    model = build_model()
    seen = {}
    original = model.fit_on_training_features

    def spy(features, labels):
        seen.update(n=len(features), defects=int(labels.sum()), training=model.training)
        return original(features, labels)

    model.fit_on_training_features = spy
    engine = make_engine(tmp_path, "probe", max_epochs=1)
    engine.fit(model, train)
    assert seen == {"n": 6 + 3, "defects": 3, "training": False}  # 2 of 8 good held out
    params = json.loads((engine.run_dir / "models" / "0" / "params.json").read_text())
    assert params["label_probe"]["fitted_on"] == {"good": 6, "defective": 3}
    assert params["label_probe"]["calibrated_on"] == 2
    assert model.resolved_image_score == "fused"
    held_out = [s for s in train if str(s.path) in model.data_info["validation_images"]]
    dataset = AnomalyDataset(held_out, image_size=model.image_size, mean=model.mean, std=model.std)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.no_grad():
        scores = model(images)[1].numpy()
    expected = fit_threshold([0] * len(scores), scores, max_false_reject=engine.max_false_reject)
    assert float(model.threshold) == pytest.approx(expected["threshold"], rel=1e-6)
