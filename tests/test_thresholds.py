"""Calibrated thresholds: the conformal quantile against its p-value definition, its guarantee by simulation, and
the detector's calibration schemes against refitting by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

import anomalens
from anomalens.cli import main
from anomalens.thresholds import (
    ThresholdOptions,
    apply_threshold_options,
    conformal_threshold,
    plan_thresholds,
    required_references,
)

from conftest import TINY_CONFIGS, textured_image


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.2, 0.5])
@pytest.mark.parametrize("count", [9, 19, 99, 150])
def test_threshold_flags_exactly_the_images_whose_conformal_p_value_is_at_most_alpha(alpha, count):
    """Flagging ``score > threshold`` is the conformal test ``p = (1 + #{held-out >= score}) / (m + 1) <= alpha``."""
    held_out = np.random.default_rng(count).normal(size=count)
    if count < required_references(alpha):
        with pytest.raises(ValueError, match=f"needs at least {required_references(alpha)} held-out"):
            conformal_threshold(held_out, alpha)
        return
    threshold = conformal_threshold(held_out, alpha)
    for score in np.concatenate([held_out, np.linspace(-4, 4, 101)]):
        p_value = (1 + int((held_out >= score).sum())) / (count + 1)
        assert (score > threshold) == (p_value <= alpha + 1e-12), score


@pytest.mark.parametrize("alpha,count", [(0.05, 19), (0.1, 30), (0.2, 9)])
def test_false_alarm_rate_is_within_the_bound_by_simulation(alpha, count):
    """Exchangeable normal scores: averaged over draws, P(flag) lies in (alpha - 1/(m+1), alpha]."""
    rng = np.random.default_rng(0)
    trials, per_trial = 4000, 50
    rates = []
    for _ in range(trials):
        scores = rng.gamma(2.0, size=count + per_trial)
        threshold = conformal_threshold(scores[:count], alpha)
        rates.append(float((scores[count:] > threshold).mean()))
    mean, error = float(np.mean(rates)), 3 * float(np.std(rates)) / np.sqrt(trials)
    assert alpha - 1 / (count + 1) - error <= mean <= alpha + error


def test_too_few_references_for_alpha_says_how_many():
    with pytest.raises(ValueError, match=r"false_alarm_rate=0.05 needs at least 19 reference images.*got 5.*0.167"):
        plan_thresholds(ThresholdOptions(false_alarm_rate=0.05), 5)
    with pytest.raises(ValueError, match=r"false_alarm_rate=1.5 must be a number in \(0, 1\)"):
        plan_thresholds(ThresholdOptions(false_alarm_rate=1.5), 5)
    with pytest.raises(ValueError, match=r"calibration='jackknife' must be one of auto, leave-one-out, k-fold"):
        plan_thresholds(ThresholdOptions(false_alarm_rate=0.5, calibration="jackknife"), 5)
    with pytest.raises(ValueError, match=r"split calibration needs at least 4 reference images"):
        plan_thresholds(ThresholdOptions(false_alarm_rate=0.5, calibration="split", calibration_size=3), 3)


def _references(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [textured_image(rng, 40, 48) for _ in range(count)]


def test_split_calibration_keeps_the_detector_fitted_on_the_other_references_only():
    references = _references(6)
    options = {**TINY_CONFIGS["patchcore"], "coreset_ratio": 1.0}
    detector = anomalens.create("patchcore", **options)
    detector.fit(references, false_alarm_rate=0.25, calibration="split")
    held = detector.threshold_calibration["held_out_indices"]
    assert len(held) == 3 and detector.threshold_calibration["n_fitted_on"] == 3  # max(ceil(1/0.25)-1, 6 // 2)
    kept = [image for index, image in enumerate(references) if index not in held]
    by_hand = anomalens.create("patchcore", **options).fit(kept, threshold=None)
    held_scores = [by_hand.predict(references[index])[0].score for index in held]
    assert detector.held_out_scores == pytest.approx(held_scores, abs=1e-6)  # scored as one batch, not singly
    query = textured_image(np.random.default_rng(9), 40, 48)
    assert detector.predict(query)[0].score == pytest.approx(by_hand.predict(query)[0].score, rel=1e-6)
    # k = ceil(4 * 0.75) = 3: the largest of the three held-out scores
    assert detector.threshold == pytest.approx(sorted(held_scores)[2], abs=1e-6)
    assert detector.threshold_source == "conformal"


def test_leave_one_out_calibration_matches_refitting_per_fold():
    references = _references(5)
    options = {**TINY_CONFIGS["patchcore"], "coreset_ratio": 1.0}
    folds = []
    for index in range(5):
        others = references[:index] + references[index + 1 :]
        fold = anomalens.create("patchcore", **options).fit(others, threshold=None)
        folds.append(fold.predict(references[index])[0])
    scores = sorted(result.score for result in folds)
    detector = anomalens.create("patchcore", **options).fit(references, false_alarm_rate=0.4)
    assert detector.threshold == pytest.approx(scores[3], rel=1e-6)  # k = ceil(6 * 0.6) = 4
    assert detector.threshold_calibration["calibration"] == "leave-one-out"
    maxima = sorted(float(result.anomaly_map.max()) for result in folds)
    assert detector.pixel_threshold == pytest.approx(maxima[3], rel=1e-5)  # the same rule on map maxima
    default = anomalens.create("patchcore", **options).fit(references)  # today's rule: the largest, alpha = 1/(n+1)
    assert default.threshold == pytest.approx(scores[-1], rel=1e-6)
    assert default.threshold_calibration["equivalent_false_alarm_rate"] == pytest.approx(1 / 6)


def test_cli_false_alarm_rate_records_the_rule_and_refuses_too_few_references(capsys, mvtec_root, tmp_path):
    tiny = ["--method", "patchcore", "--backbone", "taef2", "--pretrained", "none", "--set", "image_size=32"]
    references = str(mvtec_root / "widget" / "train" / "good")
    inputs = str(mvtec_root / "widget" / "test")
    out = tmp_path / "out"
    code = main(["-q", "predict", *tiny, inputs, "--reference", references, "--false-alarm-rate", "0.25",
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    calibration = run["threshold_calibration"]
    assert run["threshold_source"] == "conformal" and calibration["false_alarm_rate"] == 0.25
    assert calibration["n_held_out"] == 4 and "exchangeable" in " ".join(calibration["assumptions"])
    assert run["threshold"] == sorted(run["held_out_scores"])[3]  # k = ceil(5 * 0.75) = 4 of 4
    capsys.readouterr()
    code = main(["-q", "predict", *tiny, inputs, "--reference", references, "--false-alarm-rate", "0.05",
                 "--out", str(tmp_path / "other")])  # fmt: skip
    assert code == 2 and "needs at least 19 reference images" in capsys.readouterr().err


def test_default_rule_holds_many_references_out_in_folds_not_one_by_one():
    """Above 16 references the default rule refits once per fold (5), not once per reference; each held-out score
    equals the score from a detector fitted by hand on the references outside its fold."""
    references = _references(18)
    options = {**TINY_CONFIGS["patchcore"], "coreset_ratio": 1.0}
    detector = anomalens.create("patchcore", **options)
    fits = []
    fit_encoded = detector._fit_encoded
    detector._fit_encoded = lambda encoded, class_name: fits.append(len(encoded)) or fit_encoded(encoded, class_name)
    detector.fit(references)
    assert detector.threshold_calibration["calibration"] == "k-fold" and len(fits) == 5 + 1 and fits[-1] == 18
    plan = plan_thresholds(ThresholdOptions(), 18, seed=detector.config.seed)
    assert sorted(index for fold in plan.folds for index in fold) == list(range(18)) and len(plan.folds) == 5
    for fold in plan.folds:
        others = [image for index, image in enumerate(references) if index not in fold]
        by_hand = anomalens.create("patchcore", **options).fit(others, threshold=None)
        scores = [result.score for result in by_hand.predict([references[index] for index in fold])]  # one batch
        assert [detector.held_out_scores[index] for index in fold] == pytest.approx(scores, rel=1e-5)
    assert detector.threshold == pytest.approx(max(detector.held_out_scores))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "high", True])
def test_a_bad_pixel_threshold_is_refused_on_every_path(value):
    references = _references(3)
    with pytest.raises(ValueError, match="pixel_threshold=.* must be a finite number"):
        anomalens.create("patchcore", **TINY_CONFIGS["patchcore"]).fit(references, pixel_threshold=value)
    fitted = anomalens.create("patchcore", **TINY_CONFIGS["patchcore"]).fit(references)
    with pytest.raises(ValueError, match="pixel_threshold=.* must be a finite number"):
        apply_threshold_options(fitted, [], None, ThresholdOptions(pixel_threshold=value))  # a fitted detector
