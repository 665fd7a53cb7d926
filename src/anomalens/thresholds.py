"""Choosing a threshold from normal references: the rules, their guarantees, and pure helpers.

The threshold rules (``Detector.fit(threshold=..., false_alarm_rate=...)``, ``--threshold`` /
``--false-alarm-rate`` on the command line):

- **conformal** (``false_alarm_rate=α``): the threshold is the ``k``-th smallest of ``m`` held-out reference
  scores, ``k = ceil((m + 1)(1 - α))``. If a new normal image and the ``m`` held-out references are exchangeable
  (drawn the same way, none chosen after looking at scores) and scores have no ties, then
  ``P(new normal image flagged) <= α`` (and ``> α - 1/(m + 1)``), whatever the method or the data
  (Vovk et al. 2005; Bates et al. 2023, "Testing for outliers with conformal p-values"). It needs
  ``m >= ceil(1/α) - 1`` held-out references (99 for α = 0.01, 19 for 0.05, 9 for 0.1); with fewer the
  quantile does not exist and the error says how many are needed. The guarantee is marginal: it averages over
  the draw of the references, so one run's measured rate may exceed α by chance.

  Held-out scores come from one of two calibration schemes:

  - ``split``: ``m`` references (a seeded draw) are held out, the detector is fitted on the others **and stays
    fitted on them only**; each held-out reference is scored once. The guarantee above holds exactly.
  - ``leave-one-out``: each reference is scored by the detector fitted on all the others, and the detector is
    then fitted on all ``n`` (``m = n``). This is exactly the full-conformal guarantee for methods whose scores
    can only fall when a reference is added (a nearest-neighbour distance to a memory bank, e.g. PatchCore with
    ``coreset_ratio=1`` and ``image_score=max``): adding the test image to the bank could only lower the
    references' scores, so the threshold is conservative. For other methods it is cross-conformal, close to
    ``α`` in practice but with no finite-sample proof (the benchmark's false-alarm table measures it).
  - ``k-fold``: the references are split into ``folds`` seeded folds; each fold is scored by the detector fitted
    on the others, and the detector is then fitted on all. Cross-conformal: like leave-one-out (its special case)
    at the cost of ``folds`` refits; held-out scores come from detectors fitted on fewer references, which makes
    the threshold conservative rather than loose.
  - ``auto``: leave-one-out with up to :data:`LOO_LIMIT` references (one refit per reference), else split (the
    guarantee, at the cost of the held-out references in the memory).

- **leave-one-out** (the default with two or more references): the largest held-out score, i.e. the conformal rule
  at ``α = 1 / (n + 1)``, the smallest rate ``n`` references can certify. Held out one by one up to
  :data:`LOO_LIMIT` references, in :data:`FOLDS` folds above (a refit per fold, the detector then fitted on all).
- **given**: a number from the user. **none**: no threshold, no labels.

The pixel threshold (for defect masks) follows the same rule applied to the held-out references' map maxima: a
normal image then gets any pixel marked with probability at most ``α``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CALIBRATIONS = ("auto", "leave-one-out", "k-fold", "split")
LOO_LIMIT = 16  # "auto" calibration: leave-one-out up to this many references (one refit each), above: split
FOLDS = 5  # folds of "k-fold" calibration (and of the default rule above LOO_LIMIT references)
GUARANTEE = {
    "split": "P(a normal image is flagged) <= alpha, exactly, if normal images and the held-out references are "
    "exchangeable (the detector is fitted on the other references only)",
    "leave-one-out": "P(a normal image is flagged) <= alpha exactly for scores that can only fall when a reference "
    "is added (nearest-neighbour memory banks without subsampling); otherwise cross-conformal, approximately alpha",
    "k-fold": "cross-conformal: approximately alpha; held-out scores come from detectors fitted on fewer references, "
    "so for nearest-neighbour scores the threshold errs high (fewer false alarms)",
}
ASSUMPTIONS = (
    "normal images to be scored and the held-out references are exchangeable (same product, same capture, "
    "references not chosen by their scores)",
    "the guarantee is marginal over the draw of the references: one run's false-alarm rate can exceed alpha",
)


def required_references(alpha: float) -> int:
    """Fewest held-out scores ``m`` for which the conformal quantile at ``alpha`` exists: ``ceil(1/α) - 1``."""
    return max(1, math.ceil(1.0 / alpha - 1e-9) - 1)


def conformal_rank(count: int, alpha: float) -> int:
    """The 1-based rank ``k = ceil((m + 1)(1 - α))`` of the conformal threshold among ``m`` sorted scores."""
    return math.ceil((count + 1) * (1.0 - alpha) - 1e-9)


def conformal_threshold(held_out_scores: Sequence[float], alpha: float) -> float:
    """The ``k``-th smallest held-out score (:func:`conformal_rank`); a score above it is flagged.

    Raises:
        ValueError: ``alpha`` outside (0, 1), or too few scores for it (the message says how many are needed).
    """
    check_alpha(alpha)
    scores = np.sort(np.asarray(held_out_scores, dtype=np.float64))
    rank = conformal_rank(len(scores), alpha)
    if rank > len(scores):
        raise ValueError(
            f"false_alarm_rate={alpha} needs at least {required_references(alpha)} held-out reference images, "
            f"got {len(scores)}; give more references or a larger false_alarm_rate "
            f"(with {len(scores)}, the smallest is {1.0 / (len(scores) + 1):.3g})"
        )
    return float(scores[rank - 1])


def check_pixel_threshold(pixel_threshold: float | str | None) -> None:
    """Refuse a ``pixel_threshold`` that is not ``None``, ``"auto"`` or a finite number (NaN included)."""
    if pixel_threshold is None or pixel_threshold == "auto":
        return
    if isinstance(pixel_threshold, bool) or not isinstance(pixel_threshold, (int, float)) or not math.isfinite(
        pixel_threshold
    ):
        raise ValueError(f"pixel_threshold={pixel_threshold!r} must be a finite number, None or 'auto'")


def check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"false_alarm_rate={alpha!r} must be a number in (0, 1), e.g. 0.05")
    return float(alpha)


@dataclass
class ThresholdPlan:
    """What :meth:`Detector.fit` will do to choose its thresholds, decided (and validated) before any work."""

    rule: str  # "given", "leave-one-out" (the max rule), "conformal" or "none"
    calibration: str | None = None  # "leave-one-out" or "split" when references are held out, else None
    alpha: float | None = None  # the false-alarm rate asked (conformal only)
    calibration_indices: list[int] = field(default_factory=list)  # references held out (split), else all
    given: float | None = None  # the given threshold
    folds: list[list[int]] = field(default_factory=list)  # leave-one-out / k-fold: the references of each fold

    def fit_indices(self, count: int) -> list[int]:
        """The references the final detector is fitted on: all but the held-out ones for ``split``."""
        held = set(self.calibration_indices) if self.calibration == "split" else set()
        return [index for index in range(count) if index not in held]


def plan_thresholds(
    threshold: float | str | None,
    references: int,
    *,
    false_alarm_rate: float | None = None,
    calibration: str = "auto",
    calibration_size: int | None = None,
    seed: int = 0,
) -> ThresholdPlan:
    """Validate the threshold options of ``fit()`` against the number of references and say what to do.

    Raises:
        ValueError: An invalid value, or too few references for the rule or the ``false_alarm_rate`` asked (the
            message names the value and the number needed).
    """
    from anomalens.detector import THRESHOLD_RULES

    rules = (*THRESHOLD_RULES, "conformal")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration={calibration!r} must be one of {', '.join(CALIBRATIONS)}")
    if false_alarm_rate is not None:
        alpha = check_alpha(false_alarm_rate)
        if threshold not in ("auto", "conformal"):
            raise ValueError(f"false_alarm_rate={alpha} chooses the threshold; it cannot be combined with "
                             f"threshold={threshold!r}")  # fmt: skip
        needed = required_references(alpha)
        scheme = calibration
        if scheme == "auto":
            scheme = "leave-one-out" if references <= LOO_LIMIT else "split"
        if scheme in ("leave-one-out", "k-fold"):
            if references < max(needed, 2):
                raise ValueError(
                    f"false_alarm_rate={alpha} needs at least {needed} reference images ({scheme} calibration), "
                    f"got {references}; the smallest rate {references} references support is "
                    f"{1.0 / (references + 1):.3g}" if references else
                    f"false_alarm_rate={alpha} needs at least {needed} reference images, got none"
                )  # fmt: skip
            return held_out_plan("conformal", scheme, references, seed, alpha)
        size = calibration_size if calibration_size is not None else max(needed, min(references // 2, 100))
        if isinstance(size, bool) or not isinstance(size, int) or size < needed:
            raise ValueError(f"calibration_size={size!r} must be an integer >= {needed} for false_alarm_rate={alpha}")
        if references < size + 1:
            raise ValueError(
                f"false_alarm_rate={alpha} with split calibration needs at least {size + 1} reference images "
                f"({size} held out, at least 1 to fit on), got {references}"
            )
        held = sorted(np.random.default_rng(seed).choice(references, size=size, replace=False).tolist())
        return ThresholdPlan("conformal", "split", alpha, held)
    if threshold is None:
        return ThresholdPlan("none")
    if isinstance(threshold, str):
        if threshold not in rules:
            raise ValueError(f"threshold={threshold!r} must be a finite number, None, or one of {rules}")
        if threshold == "conformal":
            raise ValueError("threshold='conformal' needs false_alarm_rate=ALPHA (e.g. 0.05)")
        if threshold == "leave-one-out" and references < 2:
            raise ValueError(f"threshold='leave-one-out' needs at least 2 reference images, got {references}")
        if references >= 2:
            scheme = calibration if calibration in ("leave-one-out", "k-fold") else (
                "leave-one-out" if references <= LOO_LIMIT else "k-fold")  # fmt: skip
            return held_out_plan("leave-one-out", scheme, references, seed)
        return ThresholdPlan("none")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold={threshold!r} must be a finite number, None, or one of {rules}")
    return ThresholdPlan("given", given=float(threshold))


def held_out_plan(rule: str, scheme: str, references: int, seed: int, alpha: float | None = None) -> ThresholdPlan:
    """A plan holding every reference out once: one per fold (``leave-one-out``) or in :data:`FOLDS` seeded folds
    (``k-fold``)."""
    if scheme == "leave-one-out":
        folds = [[index] for index in range(references)]
    else:
        order = np.random.default_rng(seed).permutation(references)
        folds = [sorted(fold.tolist()) for fold in np.array_split(order, min(FOLDS, references)) if len(fold)]
    return ThresholdPlan(rule, scheme, alpha, list(range(references)), folds=folds)


def threshold_from(plan: ThresholdPlan, held_out: Sequence[float]) -> float | None:
    """The threshold a plan gives on held-out values (scores, or map maxima for the pixel threshold)."""
    if plan.rule == "conformal":
        return conformal_threshold(held_out, plan.alpha)  # type: ignore[arg-type]
    if plan.rule == "leave-one-out" and len(held_out):
        return float(max(held_out))
    return None


def describe_plan(plan: ThresholdPlan, references: int) -> dict[str, Any]:
    """The JSON record of how a threshold was chosen, for ``config.json`` and ``run.json``."""
    record: dict[str, Any] = {"rule": plan.rule, "calibration": plan.calibration, "n_references": references}
    if plan.calibration:
        record["n_held_out"] = len(plan.calibration_indices)
        record["n_fitted_on"] = len(plan.fit_indices(references))
    if plan.calibration == "k-fold":
        record["folds"] = len(plan.folds)
    if plan.calibration == "split":
        record["held_out_indices"] = list(plan.calibration_indices)
    if plan.rule == "conformal":
        count = len(plan.calibration_indices)
        record.update(false_alarm_rate=plan.alpha, rank=conformal_rank(count, plan.alpha),  # type: ignore[arg-type]
                      guarantee=GUARANTEE[plan.calibration], assumptions=list(ASSUMPTIONS),  # type: ignore[index]
                      false_alarm_bound=[max(0.0, plan.alpha - 1.0 / (count + 1)), plan.alpha])  # type: ignore[operator]
    elif plan.rule == "leave-one-out":
        record["equivalent_false_alarm_rate"] = 1.0 / (references + 1)
        record["note"] = "the largest held-out score: the conformal rule at alpha = 1/(n+1)"
    return record
