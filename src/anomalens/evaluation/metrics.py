"""Anomaly-detection metrics as pure functions of scores and labels.

Image level: AUROC, AP, F1-max. Pixel level: the same three over all pixels, plus AUPRO.

All curves are computed exactly, over every distinct score (one sort, ties grouped), in the
conventions of scikit-learn: ``roc_auc_score`` (trapezoidal ROC), ``average_precision_score``
(step-wise sum of precision times recall increments) and F1-max over the precision-recall curve.

AUPRO follows the MVTec AD protocol (Bergmann et al., 2021): ground-truth regions are the
8-connected components of each mask; the PRO of a threshold is the mean over regions of the share
of the region's pixels above it; the FPR is the share of all normal pixels above it. The PRO curve
is integrated (trapezoids, the last segment interpolated) from FPR 0 to ``fpr_limit`` (0.3) and
divided by ``fpr_limit``.

A metric that is undefined for the data (a single class present) is ``nan``, with a
:class:`UndefinedMetricWarning`, never 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 renamed trapz


class UndefinedMetricWarning(UserWarning):
    """A metric was asked for on data where it is undefined (e.g. only normal samples)."""


def _as_arrays(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in size")
    if scores.size and not np.isfinite(scores).all():
        raise ValueError(f"scores contain {int((~np.isfinite(scores)).sum())} non-finite values")
    return scores, labels


def _undefined(name: str, labels: np.ndarray) -> bool:
    positives = int(labels.sum())
    if labels.size == 0 or positives in (0, labels.size):
        present = "no samples" if labels.size == 0 else ("only anomalous" if positives else "only normal")
        warnings.warn(
            f"{name} is undefined with {present} samples; returning nan", UndefinedMetricWarning, stacklevel=3
        )
        return True
    return False


def binary_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True- and false-positive counts at every distinct threshold, from the highest score down.

    Returns:
        ``(true_positives, false_positives, thresholds)``, each ``(T,)``: counts of samples with
        ``score >= thresholds[i]``.
    """
    scores, labels = _as_arrays(scores, labels)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    last_of_ties = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_ties]
    false_positives = (last_of_ties + 1) - true_positives
    return true_positives, false_positives, sorted_scores[last_of_ties]


def _curve_metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """AUROC, AP and F1-max from one sort of the scores (labels must hold both classes)."""
    true_positives, false_positives, _ = binary_curve(scores, labels)
    tpr = np.r_[0.0, true_positives / true_positives[-1]]
    fpr = np.r_[0.0, false_positives / false_positives[-1]]
    precision = true_positives / (true_positives + false_positives)
    recall = tpr[1:]
    average = np.sum(np.diff(tpr) * precision)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(_trapezoid(tpr, fpr)), float(average), float(f1.max())


def detection_metrics(scores: np.ndarray, labels: np.ndarray, name: str = "metric") -> tuple[float, float, float]:
    """``(AUROC, AP, F1-max)``, each ``nan`` (with a warning) if only one class is present."""
    scores, labels = _as_arrays(scores, labels)
    if _undefined(name, labels):
        return float("nan"), float("nan"), float("nan")
    return _curve_metrics(scores, labels)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; ``nan`` if only one class is present."""
    return detection_metrics(scores, labels, "AUROC")[0]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision, ``sum_n (R_n - R_{n-1}) P_n``; ``nan`` if only one class is present."""
    return detection_metrics(scores, labels, "AP")[1]


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """The best F1 over all thresholds; ``nan`` if only one class is present."""
    return detection_metrics(scores, labels, "F1-max")[2]


def pro_curve(anomaly_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve over all thresholds.

    Args:
        anomaly_maps: ``(H, W)`` maps (or one ``(N, H, W)`` array).
        masks: Matching boolean ``(H, W)`` ground truths.

    Returns:
        ``(fpr, pro)``, each ``(T + 1,)``, starting at ``(0, 0)`` and ending at ``(1, 1)``.
    """
    if len(anomaly_maps) != len(masks):
        raise ValueError(f"{len(anomaly_maps)} maps but {len(masks)} masks")
    region_ids, scores = [], []
    next_region = 1
    for index, (anomaly_map, mask) in enumerate(zip(anomaly_maps, masks)):
        anomaly_map = np.asarray(anomaly_map)
        mask = np.asarray(mask).astype(bool)
        if anomaly_map.shape != mask.shape:
            raise ValueError(f"map {index} has shape {anomaly_map.shape} but its mask {mask.shape}")
        labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        region_ids.append(np.where(labelled > 0, labelled + next_region - 1, 0).ravel())
        scores.append(anomaly_map.ravel())
        next_region += count
    regions = np.concatenate(region_ids)
    scores_flat = np.concatenate(scores).astype(np.float64)
    region_count = next_region - 1
    negatives = int((regions == 0).sum())
    region_sizes = np.bincount(regions, minlength=next_region).astype(np.float64)
    # Each pixel's contribution when the threshold passes it: to the FPR if normal, to the PRO if anomalous.
    fpr_weight = np.where(regions == 0, 1.0 / max(negatives, 1), 0.0)
    pro_weight = np.where(regions > 0, 1.0 / (region_sizes[regions] * max(region_count, 1)), 0.0)
    order = np.argsort(-scores_flat, kind="stable")
    sorted_scores = scores_flat[order]
    last_of_ties = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    fpr = np.cumsum(fpr_weight[order])[last_of_ties]
    pro = np.cumsum(pro_weight[order])[last_of_ties]
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(anomaly_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``; ``nan`` without anomalous or normal pixels."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    flat_masks = (
        np.concatenate([np.asarray(mask).astype(bool).ravel() for mask in masks]) if len(masks) else np.zeros(0)
    )
    if _undefined("AUPRO", flat_masks):
        return float("nan")
    fpr, pro = pro_curve(anomaly_maps, masks)
    # Keep the curve up to the limit and close it with the interpolated point at fpr_limit.
    inside = fpr <= fpr_limit
    fpr_kept, pro_kept = fpr[inside], pro[inside]
    if fpr_kept[-1] < fpr_limit:
        after = np.flatnonzero(~inside)[0]
        span = fpr[after] - fpr[after - 1]
        weight = (fpr_limit - fpr[after - 1]) / span if span > 0 else 0.0
        fpr_kept = np.r_[fpr_kept, fpr_limit]
        pro_kept = np.r_[pro_kept, pro[after - 1] + weight * (pro[after] - pro[after - 1])]
    return float(_trapezoid(pro_kept, fpr_kept) / fpr_limit)


IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
ALL_METRICS = IMAGE_METRICS + PIXEL_METRICS


def compute_all(
    image_scores: Sequence[float],
    image_labels: Sequence[int],
    anomaly_maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
) -> dict[str, float]:
    """The seven metrics of the papers' tables, as fractions in [0, 1] (``nan`` where undefined).

    ``masks=None`` (no ground truth for the pixels) makes the four pixel metrics ``nan``.
    """
    image_auroc, image_ap, image_f1max = detection_metrics(image_scores, image_labels, "image metrics")
    if masks is None:
        nan = float("nan")
        return dict(zip(ALL_METRICS, (image_auroc, image_ap, image_f1max, nan, nan, nan, nan)))
    pixel_scores = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in anomaly_maps])
    pixel_labels = np.concatenate([np.asarray(m).astype(bool).ravel() for m in masks])
    pixel_auroc, pixel_ap, pixel_f1max = detection_metrics(pixel_scores, pixel_labels, "pixel metrics")
    return {
        "image_auroc": image_auroc,
        "image_ap": image_ap,
        "image_f1max": image_f1max,
        "pixel_auroc": pixel_auroc,
        "pixel_ap": pixel_ap,
        "pixel_f1max": pixel_f1max,
        "pixel_aupro": aupro(anomaly_maps, masks),
    }
