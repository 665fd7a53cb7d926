"""Metrics against scikit-learn and against brute-force references on small random cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anomalens.evaluation import metrics


def _sklearn_f1max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    return np.max(2 * precision * recall / np.maximum(precision + recall, 1e-300))


@pytest.mark.parametrize("seed", range(6))
def test_detection_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(5, 400))
    labels = rng.random(size) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = np.round(rng.random(size) + 0.5 * labels, int(rng.integers(1, 4)))  # rounding creates ties
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert metrics.f1_max(scores, labels) == pytest.approx(_sklearn_f1max(labels, scores), abs=1e-12)


def test_perfect_and_inverted_rankings():
    labels = np.array([0, 0, 1, 1])
    assert metrics.auroc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert metrics.auroc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert metrics.f1_max(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0


@pytest.mark.parametrize("function", [metrics.auroc, metrics.average_precision, metrics.f1_max])
def test_single_class_is_nan_with_warning(function):
    with pytest.warns(metrics.UndefinedMetricWarning, match="only normal"):
        assert np.isnan(function(np.array([0.1, 0.5]), np.array([0, 0])))


def test_aupro_undefined_without_anomalous_pixels():
    with pytest.warns(metrics.UndefinedMetricWarning):
        assert np.isnan(metrics.aupro([np.zeros((4, 4))], [np.zeros((4, 4), bool)]))


def _brute_force_aupro(maps, masks, limit=0.3):
    """Threshold every distinct value; PRO per 8-connected region; integrate up to ``limit``."""
    maps, masks = np.stack(maps), np.stack(masks)
    regions = []
    for mask in masks:
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([labelled == index for index in range(1, count + 1)])
    negatives = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = (predicted & negatives).sum() / negatives.sum()
        overlaps = [(predicted[i] & region).sum() / region.sum() for i in range(len(maps)) for region in regions[i]]
        points.append((fpr, np.mean(overlaps)))
    fprs, pros = np.array(points).T
    area, previous = 0.0, (0.0, 0.0)
    for fpr, pro in zip(fprs[1:], pros[1:]):
        if fpr > limit:
            interpolated = previous[1] + (limit - previous[0]) / (fpr - previous[0]) * (pro - previous[1])
            area += (limit - previous[0]) * (previous[1] + interpolated) / 2
            return area / limit
        area += (fpr - previous[0]) * (previous[1] + pro) / 2
        previous = (fpr, pro)
    return area / limit


@pytest.mark.parametrize("seed", range(5))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for index in range(3):
        mask = np.zeros((9, 11), bool)
        for _ in range(int(rng.integers(0 if index else 1, 3))):
            top, left = rng.integers(0, 6, 2)
            mask[top : top + int(rng.integers(1, 4)), left : left + int(rng.integers(1, 5))] = True
        maps.append(np.round(rng.random((9, 11)) + 0.6 * mask, 2))
        masks.append(mask)
    assert metrics.aupro(maps, masks) == pytest.approx(_brute_force_aupro(maps, masks), abs=1e-10)


def test_aupro_uses_eight_connectivity():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one region
    scores = np.zeros((4, 4))
    scores[0, 0] = 1.0  # finds half of the single region at FPR 0
    fpr, pro = metrics.pro_curve([scores], [mask])
    assert pro[1] == pytest.approx(0.5)  # with 4-connectivity two regions would give 0.5 as well, so:
    scores[1, 1] = 0.9
    fpr, pro = metrics.pro_curve([scores], [mask])
    assert list(pro[:3]) == pytest.approx([0.0, 0.5, 1.0]) and fpr[2] == 0.0
    assert metrics.aupro([scores], [mask]) == pytest.approx(1.0)


def test_compute_all_layout_and_missing_masks():
    rng = np.random.default_rng(0)
    maps = [rng.random((6, 6)) for _ in range(4)]
    masks = [np.zeros((6, 6), bool) for _ in range(4)]
    masks[2][1:3, 1:3] = True
    masks[3][4:, 4:] = True
    values = metrics.compute_all([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1], maps, masks)
    assert set(values) == set(metrics.ALL_METRICS) and values["image_auroc"] == 1.0
    assert all(0.0 <= value <= 1.0 for value in values.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        without = metrics.compute_all([0.1, 0.9], [0, 1], maps[:2], None)
    assert without["image_auroc"] == 1.0 and np.isnan(without["pixel_aupro"]) and np.isnan(without["pixel_auroc"])
