"""Training batches: labelled defects get a fixed share of every batch (balanced sampling);
without them, a plain seeded shuffle. Checked on the engine's batch plan directly."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _engine_helpers import make_engine


def _labels(good: int, defects: int) -> torch.Tensor:
    # Defects scattered among the good images, as a data set lists them.
    labels = torch.zeros(good + defects)
    labels[torch.randperm(good + defects, generator=torch.Generator().manual_seed(1))[:defects]] = 1
    return labels


def test_each_batch_holds_the_share_of_defects_and_each_good_image_once(tmp_path):
    engine = make_engine(tmp_path, "b", batch_size=8, defects_per_batch=2)
    labels = _labels(good=50, defects=7)
    batches = engine._epoch_batches(labels, epoch=0)
    good_seen = Counter()
    defect_seen = Counter()
    for idx in batches:
        assert len(set(idx.tolist())) == len(idx)
        assert int(labels[idx].sum()) == 2
        assert len(idx) <= 8
        good_seen.update(i for i in idx.tolist() if labels[i] == 0)
        defect_seen.update(i for i in idx.tolist() if labels[i] == 1)
    # One pass over the good images: 50 images, 6 per batch -> 9 batches (the last one short).
    assert len(batches) == 9
    assert sorted(good_seen) == (labels == 0).nonzero().squeeze(1).tolist()
    assert set(good_seen.values()) == {1}
    # 18 defect draws over 7 defects, taken in turn from shuffles: each seen 2 or 3 times.
    assert sorted(defect_seen) == (labels == 1).nonzero().squeeze(1).tolist()
    assert sum(defect_seen.values()) == 18
    assert max(defect_seen.values()) - min(defect_seen.values()) <= 1


def test_the_plan_depends_only_on_seed_and_epoch(tmp_path):
    labels = _labels(good=30, defects=4)
    a = make_engine(tmp_path, "a", batch_size=8, defects_per_batch=2)
    b = make_engine(tmp_path, "b", batch_size=8, defects_per_batch=2)
    same = [torch.equal(x, y) for x, y in zip(a._epoch_batches(labels, 3), b._epoch_batches(labels, 3))]
    assert same and all(same)
    other = a._epoch_batches(labels, 4)
    assert not all(torch.equal(x, y) for x, y in zip(a._epoch_batches(labels, 3), other))


def test_processes_share_the_good_images_and_take_the_same_number_of_steps(tmp_path):
    engine = make_engine(tmp_path, "d", batch_size=4, defects_per_batch=1)
    labels = _labels(good=41, defects=3)
    ranks = [engine._epoch_batches(labels, 0, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    good = [set(i for b in plan for i in b.tolist() if labels[i] == 0) for plan in ranks]
    assert not good[0] & good[1]
    assert len(good[0] | good[1]) == 40  # 41 good images, cut to a multiple of the 2 processes
    # Step by step the two processes draw different defects from the shared cycle.
    defects = [[i for i in b.tolist() if labels[i] == 1] for b in ranks[0]], [
        [i for i in b.tolist() if labels[i] == 1] for b in ranks[1]]
    assert all(len(d) == 1 for plan in defects for d in plan)
    assert any(x != y for x, y in zip(*defects))


@pytest.mark.parametrize(("share", "defects"), [(0, 5), (2, 0)])
def test_plain_shuffle_without_a_share_or_without_defects(tmp_path, share, defects):
    engine = make_engine(tmp_path, "p", batch_size=8, defects_per_batch=share)
    labels = _labels(good=30, defects=defects)
    batches = engine._epoch_batches(labels, epoch=2)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0 * 100003 + 2))
    assert torch.equal(torch.cat(batches), order)
    assert [len(b) for b in batches] == [8, 8, 8, 8, 8][: len(batches) - 1] + [len(labels) - 8 * (len(batches) - 1)]


def test_default_share_is_a_quarter_of_the_batch(tmp_path):
    assert make_engine(tmp_path, "q", batch_size=8).defects_per_batch == 2
    assert make_engine(tmp_path, "q", batch_size=2).defects_per_batch == 1
    assert make_engine(tmp_path, "q", batch_size=1).defects_per_batch == 0


@pytest.mark.parametrize("bad", [-1, 8, 2.5, True])
def test_bad_share_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="defects_per_batch must be an integer from 0 to batch_size - 1"):
        make_engine(tmp_path, "x", batch_size=8, defects_per_batch=bad)


@pytest.mark.parametrize(("image_score", "expected"), [("mean", [1, 1, 1, 1]), ("auto", None)])
def test_weak_labels_get_their_share_only_when_they_reach_the_loss(splits, tmp_path, image_score, expected):
    """Through fit, 2 labelled defects (image labels only) among 6 good images, batch 4: a model that
    learns from image labels (SuperSimpleNet training its classifier for the mean score) sees one
    in every step; with the fused score (no classifier) they are shuffled in with the good images."""
    from _engine_helpers import CATEGORIES, build_model

    from defectscope.data import Sample

    defects = [Sample(s.path, 1, None, s.defect_type) for s in splits[CATEGORIES[0]].test if s.label == 1][:2]
    model = build_model(image_score=image_score)
    seen = []
    original = model.training_forward

    def spy(features, masks=None, labels=None, mask_known=None):
        seen.append(int(labels.sum()))
        return original(features, masks, labels, mask_known)

    model.training_forward = spy
    make_engine(tmp_path, "w", batch_size=4, defects_per_batch=1, max_epochs=2).fit(
        model, list(splits[CATEGORIES[0]].train) + defects)
    if expected is not None:
        # 8 good training images, 2 held out: 6 good -> 2 steps per epoch of 3 good + 1 defect.
        assert seen == expected
    else:
        # Plain shuffle of the 8 images: 2 steps of 4 per epoch, each defect once per epoch.
        assert len(seen) == 4 and sum(seen) == 4
