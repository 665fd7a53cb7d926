"""Calibrated thresholds: the conformal quantile against its p-value definition, its guarantee by simulation, and
the detector's calibration schemes against refitting by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import anomalens
from anomalens.cli import main
from anomalens.thresholds import (
    ThresholdOptions,
    apply_threshold_options,
    conformal_threshold,
    fit_holding_out,
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


def test_default_rule_holds_many_references_out_in_folds_on_one_fit():
    """Above 16 references the default rule holds references out in 5 folds, all scored on one fit with each
    fold's memory entries left out; each held-out score equals the score from a detector fitted by hand on the
    references outside its fold."""
    references = _references(18)
    options = {**TINY_CONFIGS["patchcore"], "coreset_ratio": 1.0}
    detector = anomalens.create("patchcore", **options)
    fits = []
    fit_encoded = detector._fit_encoded
    detector._fit_encoded = lambda encoded, class_name: fits.append(len(encoded)) or fit_encoded(encoded, class_name)
    detector.fit(references)
    assert detector.threshold_calibration["calibration"] == "k-fold" and fits == [18]
    assert detector.threshold_calibration["fold_memory"].startswith("one fit on all references")
    plan = plan_thresholds(ThresholdOptions(), 18, seed=detector.config.seed)
    assert sorted(index for fold in plan.folds for index in fold) == list(range(18)) and len(plan.folds) == 5
    for fold in plan.folds:
        others = [image for index, image in enumerate(references) if index not in fold]
        by_hand = anomalens.create("patchcore", **options).fit(others, threshold=None)
        scores = [result.score for result in by_hand.predict([references[index] for index in fold])]  # one batch
        assert [detector.held_out_scores[index] for index in fold] == pytest.approx(scores, rel=1e-5)
    assert detector.threshold == pytest.approx(max(detector.held_out_scores))
    whole = anomalens.create("patchcore", **options).fit(references, threshold=None)
    assert torch.equal(detector.memory.bank, whole.memory.bank)  # the memory is back whole after the folds


@pytest.mark.parametrize("method", ["winclip", "clipfusion"])
def test_few_shot_clip_methods_hold_out_on_one_fit_as_refitting_by_hand(method):
    """WinCLIP+ and CLIPFusion keep every reference feature (no coreset): leaving a reference's entries out is
    exactly a fit on the others, checked against fits by hand."""
    references = _references(4)
    detector = anomalens.create(method, **TINY_CONFIGS[method]).fit(references)
    assert detector.threshold_calibration["fold_memory"].startswith("one fit on all references")
    for index in range(4):
        others = references[:index] + references[index + 1 :]
        by_hand = anomalens.create(method, **TINY_CONFIGS[method]).fit(others, threshold=None)
        assert detector.held_out_scores[index] == pytest.approx(by_hand.predict(references[index])[0].score,
                                                                rel=1e-5, abs=1e-6)  # fmt: skip


def _greedy_refill(kept: torch.Tensor, offered: torch.Tensor, radius: float) -> torch.Tensor:
    """The k-center rule one pick at a time: add the offered feature farthest from the memory while it lies beyond
    ``radius``."""
    memory = kept.clone()
    while offered.shape[0]:
        distances = torch.cdist(offered, memory).min(1).values
        best = int(distances.argmax())
        if not float(distances[best]) > radius:
            break
        memory = torch.cat([memory, offered[best : best + 1]])
    return memory


def test_coreset_folds_leave_out_their_entries_and_refill_the_holes_as_by_hand():
    """With a coreset, a held-out reference is scored against the other references' entries of the fit on all,
    plus the others' features whose nearest entry was the held-out one's, added by the k-center rule while beyond
    the coverage radius. All recomputed by hand: the coreset (public greedy_coreset_indices, the seed's
    generator), owners by integer division, nearest entries and the radius by torch.cdist, a one-pick-at-a-time
    refill, and a detector whose memory is set by hand. The refilled memory covers the others within the radius."""
    from anomalens.nn.memory import greedy_coreset_indices

    references = _references(6)
    options = {**TINY_CONFIGS["patchcore"], "coreset_ratio": 0.25}
    detector = anomalens.create("patchcore", **options).fit(references, calibration="leave-one-out")
    assert detector.memory.owners is None  # dropped after the folds
    with torch.inference_mode():
        grids = detector._embed_arrays(references)  # (6, h, w, C)
    rows = grids.reshape(-1, grids.shape[-1]).clone()
    per_image = grids.shape[1] * grids.shape[2]
    count = int(np.ceil(0.25 * rows.shape[0]))
    picks = greedy_coreset_indices(rows, count, projection_dim=detector.config.coreset_projection_dim,
                                   generator=torch.Generator().manual_seed(detector.config.seed))  # fmt: skip
    assert torch.equal(detector.memory.bank, rows[picks])
    owners, row_owners = picks // per_image, torch.arange(rows.shape[0]) // per_image
    distances = torch.cdist(rows, rows[picks])
    radius, nearest = float(distances.min(1).values.max()), distances.argmin(1)
    for index in range(6):
        offered = rows[(owners[nearest] == index) & (row_owners != index)]
        memory = _greedy_refill(rows[picks[owners != index]], offered, radius)
        others = rows[row_owners != index]
        assert float(torch.cdist(others, memory).min(1).values.max()) <= radius + 1e-5
        by_hand = anomalens.create("patchcore", **{**options, "coreset_ratio": 1.0})
        by_hand.fit(references[:1], threshold=None)
        by_hand.memory.bank = memory.contiguous()
        assert detector.held_out_scores[index] == pytest.approx(by_hand.predict(references[index])[0].score, rel=1e-5)
    plan = plan_thresholds(ThresholdOptions(calibration="leave-one-out"), 6, seed=detector.config.seed)
    refit = anomalens.create("patchcore", **options)
    fit_holding_out(refit, references, None, plan, lambda done, total: None, 4, refit_folds=True)
    assert plan.fold_memory == "refit" and torch.equal(refit.memory.bank, detector.memory.bank)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "high", True])
def test_a_bad_pixel_threshold_is_refused_on_every_path(value):
    references = _references(3)
    with pytest.raises(ValueError, match="pixel_threshold=.* must be a finite number"):
        anomalens.create("patchcore", **TINY_CONFIGS["patchcore"]).fit(references, pixel_threshold=value)
    fitted = anomalens.create("patchcore", **TINY_CONFIGS["patchcore"]).fit(references)
    with pytest.raises(ValueError, match="pixel_threshold=.* must be a finite number"):
        apply_threshold_options(fitted, [], None, ThresholdOptions(pixel_threshold=value))  # a fitted detector
