"""The verdict threshold rules (defectscope.metrics.threshold), against brute force and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from defectscope.metrics.threshold import fit_threshold, verdict_rates


def test_false_reject_rule_is_the_rank_threshold():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=299)
    info = fit_threshold(np.zeros(299), scores, max_false_reject=0.05)
    # Brute force: k = ceil(300 * 0.95) = 285; the threshold lies between the 285th and 286th scores.
    ordered = np.sort(scores)
    assert ordered[284] < info["threshold"] <= ordered[285]
    assert np.sum(scores >= info["threshold"]) == 299 - 285
    assert info["expected_false_reject"] == pytest.approx(15 / 300)
    assert info["validation_false_reject"] == pytest.approx(14 / 299)
    assert info["notes"] == [] and info["n_good"] == 299


def test_false_reject_rule_keeps_its_promise_on_new_good_images():
    """Over many draws of the held-out set, the rate on fresh good images averages at most
    the rate asked, and the reported interval covers the realised rate about 95 % of the time."""
    rng = np.random.default_rng(1)
    realised, covered = [], 0
    for _ in range(400):
        held_out = rng.gamma(2.0, size=150)
        info = fit_threshold(np.zeros(150), held_out, max_false_reject=0.05)
        # Exact rate of a Gamma(2) score above the threshold (the survival function).
        t = info["threshold"]
        rate = math.exp(-t) * (1 + t)
        realised.append(rate)
        lo, hi = info["false_reject_interval"]
        covered += lo <= rate <= hi
    assert np.mean(realised) <= 0.05 + 0.004  # the promise, up to simulation noise
    assert np.mean(realised) == pytest.approx(info["expected_false_reject"], abs=0.004)
    assert 0.92 <= covered / 400 <= 0.98


def test_too_few_good_images_for_the_rate_asked_is_said():
    scores = np.linspace(0, 1, 40)
    info = fit_threshold(np.zeros(40), scores, max_false_reject=0.01)
    assert info["threshold"] > scores.max()
    assert info["validation_false_reject"] == 0.0
    assert info["expected_false_reject"] == pytest.approx(1 / 41)
    assert "40 held-out good images are too few for a 1.00% false-reject rate" in info["notes"][0]
    assert "needs at least 99" in info["notes"][0]


def test_f1_rule_matches_brute_force_on_held_out_defects():
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(30), np.ones(10)].astype(int)
    scores = np.r_[rng.normal(0, 1, 30), rng.normal(1.5, 1, 10)]
    info = fit_threshold(labels, scores, rule="f1")
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert f1_score(labels, scores >= info["threshold"]) == pytest.approx(best)
    assert info["rule"] == "f1" and info["n_defect"] == 10


@pytest.mark.parametrize(
    ("labels", "scores", "kwargs", "words"),
    [
        ([1, 1], [0.1, 0.2], {}, "no held-out good image"),
        ([0, 0, 0], [0.1, 0.2, 0.3], {"rule": "f1"}, "F1 rule needs held-out labelled defects"),
        ([0, 0], [0.1, float("nan")], {}, "NaN or inf"),
        ([0, 0], [0.1, 0.2], {"rule": "youden"}, "Unknown threshold rule"),
        ([0, 0], [0.1, 0.2], {"max_false_reject": 0}, r"rate in \(0, 1\)"),
        ([0, 0], [0.1, 0.2], {"max_false_reject": 1.5}, r"rate in \(0, 1\)"),
        ([0, 0], [0.1, 0.2], {"max_false_reject": float("nan")}, r"rate in \(0, 1\)"),
        ([0, 0, 1], [0.1, 0.2], {}, "differ in length"),
    ],
    ids=["no-good", "f1-without-defects", "nan-score", "unknown-rule", "rate-0", "rate-above-1", "rate-nan",
         "length-mismatch"],
)
def test_bad_threshold_inputs_are_refused(labels, scores, kwargs, words):
    with pytest.raises(ValueError, match=words):
        fit_threshold(labels, scores, **kwargs)


def test_verdict_rates_count_by_hand():
    rates = verdict_rates([0, 0, 0, 1, 1], [0.1, 0.5, 0.9, 0.4, 0.95], 0.5)
    assert rates["false_reject_rate"] == pytest.approx(2 / 3) and rates["escape_rate"] == pytest.approx(1 / 2)
    only_defects = verdict_rates([1, 1], [0.1, 0.9], 0.5)
    assert math.isnan(only_defects["false_reject_rate"]) and only_defects["escape_rate"] == 0.5
