"""Thresholds in one place: the rules and their guarantees, the options that choose one, the fold loop that holds
references out, and the :class:`Calibration` a detector carries. Needs numpy only (the torch-free runtime uses it).

The threshold rules (``Detector.fit(threshold=..., false_alarm_rate=...)``, ``--threshold`` /
``--false-alarm-rate`` on the command line; one declaration for both, :class:`ThresholdOptions`):

- **conformal** (``false_alarm_rate=α``): the threshold is the ``k``-th smallest of ``m`` held-out reference
  scores, ``k = ceil((m + 1)(1 - α))``. If a new normal image and the ``m`` held-out references are exchangeable
  (drawn the same way, none chosen after looking at scores) and scores have no ties, then
  ``P(new normal image flagged) <= α`` (and ``> α - 1/(m + 1)``), whatever the method or the data
  (Vovk et al. 2005; Bates et al. 2023, "Testing for outliers with conformal p-values"). It needs
  ``m >= ceil(1/α) - 1`` held-out references (99 for α = 0.01, 19 for 0.05, 9 for 0.1); with fewer the
  quantile does not exist and the error says how many are needed. The guarantee is marginal: it averages over
  the draw of the references, so one run's measured rate may exceed α by chance.

  Held-out scores come from one of these calibration schemes (:data:`CALIBRATIONS`):

  - ``split``: ``m`` references (a seeded draw) are held out, the detector is fitted on the others **and stays
    fitted on them only**; each held-out reference is scored once. The guarantee above holds exactly.
  - ``leave-one-out``: each reference is scored by the detector fitted on all the others, and the detector is
    then fitted on all ``n`` (``m = n``). This is exactly the full-conformal guarantee for methods whose scores
    can only fall when a reference is added (a nearest-neighbour distance to a memory bank, e.g. PatchCore with
    ``coreset_ratio=1`` and ``image_score=max``): adding the test image to the bank could only lower the
    references' scores, so the threshold is conservative. For other methods it is cross-conformal, close to
    ``α`` in practice but with no finite-sample proof (the benchmark's false-alarm table measures it).
  - ``k-fold``: the references are split into :data:`FOLDS` seeded folds; each fold is scored by the detector
    fitted on the others, and the detector is then fitted on all. Cross-conformal: like leave-one-out (its
    special case); held-out scores come from detectors fitted on fewer references, which makes the threshold
    conservative rather than loose.
  - ``auto``: leave-one-out with up to :data:`LOO_LIMIT` references, else split (the guarantee, at the cost of
    the held-out references in the memory).

  For memory methods (PatchCore, WinCLIP+, CLIPFusion few-shot) leave-one-out and k-fold cost one fit: the
  detector is fitted on all references once and each fold is scored with its own references' memory entries
  left out (:func:`fit_holding_out`). Without coreset subsampling that is exactly a fit on the others; with a
  coreset, the holes left are refilled from the others' features so that the memory covers them within the
  coverage radius, as a coreset fitted on them would. Other methods refit per fold.

- **leave-one-out** (the default with two or more references): the largest held-out score, i.e. the conformal rule
  at ``α = 1 / (n + 1)``, the smallest rate ``n`` references can certify. Held out one by one up to
  :data:`LOO_LIMIT` references, in :data:`FOLDS` folds above (a refit per fold, the detector then fitted on all).
- **given**: a number from the user. **none**: no threshold, no labels.

The pixel threshold (for defect masks) follows the same rule applied to the held-out references' map maxima: a
normal image then gets any pixel marked with probability at most ``α``.

A rule that chooses a threshold from held-out values is a :class:`HeldOutRule` in :data:`RULES`;
:func:`register_threshold_rule` adds one, which ``fit(threshold=NAME)`` and ``--threshold NAME`` then accept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import numpy as np

from anomalens.checks import check_options

CALIBRATIONS = ("auto", "leave-one-out", "k-fold", "split")  # how references are held out
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
FOLD_MEMORY = {  # how held-out folds were scored (fit_holding_out), in the calibration record
    "shared": "one fit on all references; each fold scored with its own references' memory entries left out",
    "refit": "a fit on the other references for each fold, then one on all",
}
ASSUMPTIONS = (
    "normal images to be scored and the held-out references are exchangeable (same product, same capture, "
    "references not chosen by their scores)",
    "the guarantee is marginal over the draw of the references: one run's false-alarm rate can exceed alpha",
)
MAX_TEXT = 64  # characters of a threshold given as text (a form field, a command-line value)


# ---------------------------------------------------------------------------------------------------- pure helpers
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


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float in (0, 1), or a ``ValueError`` naming it."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"false_alarm_rate={alpha!r} must be a number in (0, 1), e.g. 0.05")
    return float(alpha)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) with a finite value."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------- the rules
@dataclass(frozen=True)
class HeldOutRule:
    """A rule choosing a threshold from held-out values (reference scores, or their maps' maxima)."""

    name: str  # what fit(threshold=NAME), --threshold NAME and a calibration's source say
    choose: Callable[[np.ndarray, float | None], float]  # (held-out values, alpha) -> the threshold
    text: str  # the rule in words, for run.json
    needs_alpha: bool = False  # whether it takes false_alarm_rate (conformal) or not (leave-one-out)
    describe: Callable[[int, int, float | None], dict] = lambda held_out, references, alpha: {}  # extra record


def _describe_conformal(held_out: int, references: int, alpha: float | None) -> dict:
    return {"false_alarm_rate": alpha, "rank": conformal_rank(held_out, alpha),  # type: ignore[arg-type]
            "assumptions": list(ASSUMPTIONS),
            "false_alarm_bound": [max(0.0, alpha - 1.0 / (held_out + 1)), alpha]}  # type: ignore[operator]  # fmt: skip


RULES: dict[str, HeldOutRule] = {
    "leave-one-out": HeldOutRule(
        "leave-one-out", lambda values, alpha: float(np.max(values)),
        "leave-one-out: max over references of the score of each reference against the others "
        "(the conformal rule at alpha = 1/(n+1))",
        describe=lambda held_out, references, alpha: {
            "equivalent_false_alarm_rate": 1.0 / (references + 1),
            "note": "the largest held-out score: the conformal rule at alpha = 1/(n+1)"},
    ),
    "conformal": HeldOutRule(
        "conformal", lambda values, alpha: conformal_threshold(values, alpha),  # type: ignore[arg-type]
        "conformal: the ceil((m+1)(1-alpha))-th smallest of m held-out reference scores "
        "(see threshold_calibration for the guarantee and its assumptions)",
        needs_alpha=True, describe=_describe_conformal,
    ),
}  # fmt: skip


def register_threshold_rule(rule: HeldOutRule) -> HeldOutRule:
    """Add a held-out rule; ``fit(threshold=rule.name)`` and ``--threshold NAME`` accept it from then on.

    Raises:
        ValueError: The name is taken by a rule or by one of the words ``auto``, ``given``, ``none``.
    """
    if rule.name in RULES or rule.name in ("auto", "given", "none"):
        raise ValueError(f"threshold rule {rule.name!r} exists already; taken: auto, given, none, {', '.join(RULES)}")
    RULES[rule.name] = rule
    return rule


def threshold_sources() -> tuple[str, ...]:
    """Every value a calibration's ``source`` can take: ``given``, ``none`` and the rules' names."""
    return ("given", "none", *RULES)


# ---------------------------------------------------------------------------------------------------- the options
@dataclass
class ThresholdOptions:
    """How ``fit`` chooses the image and pixel thresholds; the command line's ``--threshold`` options are generated
    from this one declaration (``ReferenceOptions`` extends it)."""

    owner: ClassVar[str] = "fit"  # named in error messages

    threshold: float | str | None = "auto"  # auto, leave-one-out (or another rule), a finite number, or none
    false_alarm_rate: float | None = None  # alpha: a normal image is flagged with probability <= alpha (conformal)
    calibration: str = field(default="auto", metadata={"choices": CALIBRATIONS})  # how references are held out
    calibration_size: int | None = None  # references held out by split calibration; default: see the docs
    pixel_threshold: float | str | None = "auto"  # map value above which pixels are defective: auto, a number, none

    def __post_init__(self) -> None:
        if isinstance(self.threshold, str) and self.threshold.strip().lower() in ("none", ""):
            self.threshold = None
        if isinstance(self.pixel_threshold, str) and self.pixel_threshold.strip().lower() in ("none", ""):
            self.pixel_threshold = None
        rules = ", ".join(RULES)
        alpha = self.false_alarm_rate
        named = self.threshold if isinstance(self.threshold, str) else None
        check_options(self.owner, self, {
            "threshold": (self.threshold is None or named in ("auto", *RULES) or is_finite_number(self.threshold),
                          f"a finite number, none, auto or a rule ({rules})"),
            "false_alarm_rate": (alpha is None or (is_finite_number(alpha) and 0 < alpha < 1), "a number in (0, 1)"),
            "calibration": (self.calibration in CALIBRATIONS, f"one of {', '.join(CALIBRATIONS)}"),
            "calibration_size": (self.calibration_size is None or (isinstance(self.calibration_size, int)
                                 and not isinstance(self.calibration_size, bool) and self.calibration_size >= 1),
                                 "an integer >= 1 or none"),
            "pixel_threshold": (self.pixel_threshold in (None, "auto") or is_finite_number(self.pixel_threshold),
                                "a finite number, none or auto"),
        })  # fmt: skip
        if alpha is not None and not (named == "auto" or (named in RULES and RULES[named].needs_alpha)):
            raise ValueError(f"false_alarm_rate={alpha} chooses the threshold; it cannot be combined with "
                             f"threshold={self.threshold!r}")  # fmt: skip
        if named in RULES and RULES[named].needs_alpha and alpha is None:
            raise ValueError(f"threshold={named!r} needs false_alarm_rate=ALPHA (e.g. 0.05)")

    def plan(self, references: int, seed: int = 0) -> ThresholdPlan:
        """What fitting on ``references`` images does for these options (see :func:`plan_thresholds`)."""
        return plan_thresholds(self, references, seed)


def threshold_from_text(text: str) -> ThresholdOptions:
    """The options of a threshold given as text (a form field): ``auto``, a rule name, a finite number or ``none``.

    Raises:
        ValueError: Longer than :data:`MAX_TEXT` characters, or not one of those (the message says which).
    """
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise ValueError(f"threshold {text[:MAX_TEXT]!r}... must be a finite number, none, auto or a rule "
                         f"({', '.join(RULES)}) of at most {MAX_TEXT} characters")  # fmt: skip
    try:
        value: float | str = float(text)
    except ValueError:
        value = text
    return ThresholdOptions(threshold=value)


# ---------------------------------------------------------------------------------------------------- the plan
@dataclass
class ThresholdPlan:
    """What :meth:`Detector.fit` will do to choose its thresholds, decided (and validated) before any work."""

    rule: str  # "given", "none" or a held-out rule's name (RULES)
    calibration: str | None = None  # "leave-one-out", "k-fold" or "split" when references are held out
    alpha: float | None = None  # the false-alarm rate asked (a rule that needs one)
    calibration_indices: list[int] = field(default_factory=list)  # references held out (split), else all
    given: float | None = None  # the given threshold
    folds: list[list[int]] = field(default_factory=list)  # leave-one-out / k-fold: the references of each fold
    fold_memory: str | None = None  # how folds were scored: "shared" (one fit, each fold's entries left out) or
    # "refit" (a fit per fold); set by fit_holding_out

    def fit_indices(self, count: int) -> list[int]:
        """The references the final detector is fitted on: all but the held-out ones for ``split``."""
        held = set(self.calibration_indices) if self.calibration == "split" else set()
        return [index for index in range(count) if index not in held]

    def holding_out(self, references: int, seed: int) -> ThresholdPlan:
        """This plan, or where it holds nothing out, the same rule with every reference held out once
        (leave-one-out up to :data:`LOO_LIMIT`, k-fold above): for a method that needs held-out references
        whatever the threshold rule (an ensemble's common scale)."""
        if self.calibration is not None or references < 2:
            return self
        scheme = "leave-one-out" if references <= LOO_LIMIT else "k-fold"
        return replace(held_out_plan(self.rule, scheme, references, seed, self.alpha), given=self.given)


def plan_thresholds(options: ThresholdOptions, references: int, seed: int = 0) -> ThresholdPlan:
    """Check ``options`` against the number of references and say what fitting will do.

    Raises:
        ValueError: Too few references for the rule or the ``false_alarm_rate`` asked (the message names the value
            and the number needed).
    """
    threshold = options.threshold
    if options.false_alarm_rate is not None:
        return _alpha_plan(options, references, seed)
    if threshold is None:
        return ThresholdPlan("none")
    if is_finite_number(threshold):
        return ThresholdPlan("given", given=float(threshold))
    if threshold != "auto" and references < 2:
        raise ValueError(f"threshold={threshold!r} needs at least 2 reference images, got {references}")
    if references < 2:
        return ThresholdPlan("none")
    scheme = options.calibration if options.calibration in ("leave-one-out", "k-fold") else (
        "leave-one-out" if references <= LOO_LIMIT else "k-fold")  # fmt: skip
    return held_out_plan("leave-one-out" if threshold == "auto" else str(threshold), scheme, references, seed)


def _alpha_plan(options: ThresholdOptions, references: int, seed: int) -> ThresholdPlan:
    """The plan of a rule that takes a false-alarm rate (conformal by default)."""
    alpha = check_alpha(options.false_alarm_rate)
    rule = "conformal" if options.threshold == "auto" else str(options.threshold)
    needed = required_references(alpha)
    scheme = options.calibration
    if scheme == "auto":
        scheme = "leave-one-out" if references <= LOO_LIMIT else "split"
    if scheme in ("leave-one-out", "k-fold"):
        if references < max(needed, 2):
            raise ValueError(
                f"false_alarm_rate={alpha} needs at least {needed} reference images ({scheme} calibration), got "
                f"{references}; the smallest rate {references} references support is {1.0 / (references + 1):.3g}"
                if references else f"false_alarm_rate={alpha} needs at least {needed} reference images, got none"
            )  # fmt: skip
        return held_out_plan(rule, scheme, references, seed, alpha)
    size = options.calibration_size if options.calibration_size is not None else max(needed, min(references // 2, 100))
    if size < needed:
        raise ValueError(f"calibration_size={size!r} must be an integer >= {needed} for false_alarm_rate={alpha}")
    if references < size + 1:
        raise ValueError(
            f"false_alarm_rate={alpha} with split calibration needs at least {size + 1} reference images "
            f"({size} held out, at least 1 to fit on), got {references}"
        )
    held = sorted(np.random.default_rng(seed).choice(references, size=size, replace=False).tolist())
    return ThresholdPlan(rule, "split", alpha, held)


def held_out_plan(rule: str, scheme: str, references: int, seed: int, alpha: float | None = None) -> ThresholdPlan:
    """A plan holding every reference out once: one per fold (``leave-one-out``) or in :data:`FOLDS` seeded folds
    (``k-fold``)."""
    if scheme == "leave-one-out":
        folds = [[index] for index in range(references)]
    else:
        order = np.random.default_rng(seed).permutation(references)
        folds = [sorted(fold.tolist()) for fold in np.array_split(order, min(FOLDS, references)) if len(fold)]
    return ThresholdPlan(rule, scheme, alpha, list(range(references)), folds=folds)


def describe_plan(plan: ThresholdPlan, references: int) -> dict[str, Any]:
    """The JSON record of how a threshold was chosen, for ``config.json`` and ``run.json``."""
    record: dict[str, Any] = {"rule": plan.rule, "calibration": plan.calibration, "n_references": references}
    if plan.calibration:
        record["n_held_out"] = len(plan.calibration_indices)
        record["n_fitted_on"] = len(plan.fit_indices(references))
    if plan.calibration == "k-fold":
        record["folds"] = len(plan.folds)
    if plan.fold_memory:
        record["fold_memory"] = FOLD_MEMORY[plan.fold_memory]
    if plan.calibration == "split":
        record["held_out_indices"] = list(plan.calibration_indices)
    if plan.rule in RULES:
        if RULES[plan.rule].needs_alpha and plan.calibration:
            record["guarantee"] = GUARANTEE[plan.calibration]
        record.update(RULES[plan.rule].describe(len(plan.calibration_indices), references, plan.alpha))
    return record


# ---------------------------------------------------------------------------------------------------- the fold loop
class Refittable(Protocol):
    """What the fold loop needs of a detector (every :class:`~anomalens.detector.Detector` has it)."""

    def _encode_tiled(self, arrays: list, report: Callable[[int, int], None], total: int) -> list[list]: ...

    def _fit_on(self, encoded: list[list], class_name: str | None, empty: bool = False,
                owners: Sequence[int] | None = None) -> None: ...  # fmt: skip

    folds_share_memory: bool

    def _can_leave_out(self, folds: Sequence[Sequence[int]]) -> bool: ...

    def _without_references(self, references: Sequence[int]) -> AbstractContextManager[None]: ...

    def _forget_owners(self) -> None: ...

    def predict_arrays(self, arrays: Sequence[np.ndarray], sources: Sequence[str] | None = None) -> list: ...


def fit_holding_out(detector: Refittable, arrays: list[np.ndarray], class_name: str | None, plan: ThresholdPlan,
                    report: Callable[[int, int], None], batch_size: int,
                    refit_folds: bool = False) -> list:  # fmt: skip
    """Fit ``detector`` on ``arrays`` as ``plan`` says and return the held-out references' results (maps
    included), in the order of ``plan.calibration_indices`` (none without calibration).

    Each reference is encoded once. Leave-one-out and k-fold folds are scored in one of two ways (recorded in
    ``plan.fold_memory``):

    - ``"shared"``: where all a method learns from references is a memory of their features (PatchCore, WinCLIP+,
      CLIPFusion few-shot), the detector is fitted once on all references, each memory entry knowing its
      reference, and each fold is scored with its own references' entries left out: one fit (one coreset) and
      one scoring pass per reference, whatever the number of folds. Without subsampling that is exactly the
      memory a fit on the other references holds; with a coreset, the holes the fold's entries leave are refilled
      from the other references' features (:meth:`~anomalens.nn.memory.NearestNeighbourMemory.without`), so the
      memory covers the others within the coverage radius, as their own coreset would.
    - ``"refit"`` (other methods, or ``refit_folds``): a fit on the other references' features per fold, then one
      on all.

    ``report(done, total)`` follows the work.
    """
    held = plan.calibration_indices if plan.calibration else []
    total = len(arrays) + len(held)
    encoded = detector._encode_tiled(arrays, report, total)
    by_index: dict[int, Any] = {}

    def score(indices: Sequence[int]) -> None:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            by_index.update(zip(chunk, detector.predict_arrays([arrays[index] for index in chunk])))
            report(len(arrays) + len(by_index), total)

    keep = plan.fit_indices(len(arrays))
    if plan.folds and not refit_folds and detector.folds_share_memory:
        detector._fit_on([encoded[index] for index in keep], class_name, owners=keep)
        try:
            if detector._can_leave_out(plan.folds):
                plan.fold_memory = "shared"
                for fold in plan.folds:
                    with detector._without_references(fold):
                        score(fold)
                return [by_index[index] for index in held]
        finally:
            detector._forget_owners()
    if plan.folds:
        plan.fold_memory = "refit"
    for fold in plan.folds:  # leave-one-out or k-fold: each fold scored by the detector fitted on the others
        chosen = set(fold)
        detector._fit_on([group for index, group in enumerate(encoded) if index not in chosen], class_name)
        score(fold)
    detector._fit_on([encoded[index] for index in keep], class_name, empty=not arrays)
    if plan.calibration == "split":
        score(held)
    return [by_index[index] for index in held]


# ---------------------------------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """Everything a detector knows about its thresholds; every path that labels an image or draws a map asks it.

    Built by :meth:`from_held_out` (a fit), :meth:`from_dict` (a saved or exported detector) or
    :meth:`with_options` (a threshold given to a fitted detector); the constructor refuses a non-finite threshold,
    so no path can label with NaN.
    """

    threshold: float | None = None  # score above which an image is anomalous; None: no labels
    source: str = "none"  # how it was chosen: given, none, or a rule (leave-one-out, conformal, ...)
    pixel_threshold: float | None = None  # map value above which a pixel is defective; None: no masks
    held_out_scores: tuple[float, ...] = ()  # held-out reference scores behind the thresholds
    record: Mapping[str, Any] = field(default_factory=dict)  # the rule, calibration scheme, sizes and guarantee
    map_scale: tuple[float, float] | None = None  # the overlays' colour scale (low, high), from the references

    def __post_init__(self) -> None:
        for name in ("threshold", "pixel_threshold"):
            value = getattr(self, name)
            if value is not None and not is_finite_number(value):
                raise ValueError(f"{name}={value!r} must be a finite number or None")
            object.__setattr__(self, name, None if value is None else float(value))
        source = "none" if self.threshold is None else ("given" if self.source == "none" else self.source)
        if source not in threshold_sources():
            raise ValueError(f"threshold source {source!r} must be one of {', '.join(threshold_sources())}")
        scale = self.map_scale
        if scale is not None and not (len(scale) == 2 and all(map(is_finite_number, scale)) and scale[0] < scale[1]):
            raise ValueError(f"map_scale={scale!r} must be two finite numbers LOW < HIGH, or None")
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "held_out_scores", tuple(float(value) for value in self.held_out_scores))
        object.__setattr__(self, "record", dict(self.record))
        object.__setattr__(self, "map_scale", None if scale is None else (float(scale[0]), float(scale[1])))

    def label(self, score: float) -> bool | None:
        """The one label rule: ``score > threshold`` (``None`` without a threshold)."""
        return None if self.threshold is None else bool(score > self.threshold)

    def p_value(self, score: float) -> float | None:
        """The conformal p-value of ``score`` against the held-out reference scores,
        ``(1 + #{held-out >= score}) / (m + 1)``: small for a score above most normal references (``None``
        without held-out scores). Flagging ``p <= α`` is the conformal rule at ``α`` (Bates et al. 2023)."""
        if not self.held_out_scores or not math.isfinite(score):
            return None
        above = sum(held >= score for held in self.held_out_scores)
        return (1 + above) / (len(self.held_out_scores) + 1)

    @property
    def rule_text(self) -> str | None:
        """The source's rule in words, if it is a held-out rule."""
        return RULES[self.source].text if self.source in RULES else None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_held_out(cls, plan: ThresholdPlan, held_out: Sequence[Any], references: int,
                      pixel_threshold: float | str | None = "auto") -> Calibration:  # fmt: skip
        """The thresholds ``plan`` gives on held-out results (``score`` and ``anomaly_map`` each)."""
        scores = np.asarray([float(result.score) for result in held_out], dtype=np.float64)
        rule = RULES.get(plan.rule)
        threshold = plan.given if plan.rule == "given" else (
            rule.choose(scores, plan.alpha) if rule is not None and len(scores) else None)  # fmt: skip
        if is_finite_number(pixel_threshold):
            pixel: float | None = float(pixel_threshold)  # type: ignore[arg-type]
        elif pixel_threshold == "auto" and rule is not None and len(held_out):
            pixel = rule.choose(np.asarray([float(result.anomaly_map.max()) for result in held_out]), plan.alpha)
        else:
            pixel = None
        return cls(threshold=threshold, source=plan.rule if threshold is not None else "none",
                   pixel_threshold=pixel, held_out_scores=tuple(scores.tolist()),
                   record={**describe_plan(plan, references), "pixel_rule": "given" if is_finite_number(
                       pixel_threshold) else "auto"} if plan.rule != "none" else {},
                   map_scale=map_scale(pixel, [result.anomaly_map for result in held_out]))  # fmt: skip

    def with_options(self, options: ThresholdOptions) -> Calibration:
        """These thresholds after ``options`` given without new references: a number replaces the threshold
        (``given``), ``none`` removes it, ``auto`` keeps it; likewise the pixel threshold.

        Raises:
            ValueError: A rule or a false-alarm rate, which needs references to hold out.
        """
        if options.false_alarm_rate is not None or options.threshold not in ("auto", None) and not is_finite_number(
            options.threshold
        ):
            wanted = f"false_alarm_rate={options.false_alarm_rate}" if options.false_alarm_rate is not None else (
                f"threshold={options.threshold!r}")  # fmt: skip
            raise ValueError(f"{wanted} needs normal reference images to hold out (--reference DIR)")
        changed = self
        if options.threshold is None or is_finite_number(options.threshold):
            changed = replace(changed, threshold=options.threshold, source="given")
        if options.pixel_threshold != "auto":
            changed = replace(changed, pixel_threshold=options.pixel_threshold,
                              record={**changed.record, "pixel_rule": "given"})
        return changed

    def recalibrated(self, held_out: Sequence[Any], where: str) -> Calibration:
        """The same rule applied again to new held-out results (``score`` and ``anomaly_map`` each): normal images
        the detector as it is now never saw (after an update of its references). A given threshold stays as given
        and no threshold stays none; the record says where the held-out images came from (``where``) and restates
        the assumptions for them.

        Raises:
            ValueError: Too few held-out results for the rule (the message says how many are needed).
        """
        rule = RULES.get(self.source)
        if rule is None:
            return replace(self, record={**self.record, "recalibrated": False,
                                         "recalibration_note": f"a {self.source} threshold is kept as it is"})
        alpha = self.record.get("false_alarm_rate") if rule.needs_alpha else None
        if rule.needs_alpha and alpha is None:
            raise ValueError(f"the {self.source} threshold records no false_alarm_rate to recalibrate with")
        scores = np.asarray([float(result.score) for result in held_out], dtype=np.float64)
        if len(scores) == 0:
            raise ValueError("recalibration needs held-out normal images, got none")
        if rule.needs_alpha and len(scores) < required_references(alpha):
            raise ValueError(f"recalibrating false_alarm_rate={alpha} needs at least {required_references(alpha)} "
                             f"held-out normal images, got {len(scores)}")  # fmt: skip
        threshold = rule.choose(scores, alpha)
        pixel = self.pixel_threshold
        if pixel is not None and self.record.get("pixel_rule", "auto") == "auto":
            pixel = rule.choose(np.asarray([float(result.anomaly_map.max()) for result in held_out]), alpha)
        record = {**self.record, **rule.describe(len(scores), len(scores), alpha), "calibration": "split",
                  "n_held_out": len(scores), "recalibrated": True, "held_out_from": where,
                  "assumptions": [f"normal images to be scored and the held-out images ({where}) are exchangeable: "
                                  "the guarantee is about the line these images came from, not the lab's references",
                                  ASSUMPTIONS[1]]}  # fmt: skip
        record.pop("held_out_indices", None)
        return replace(self, threshold=threshold, pixel_threshold=pixel, held_out_scores=tuple(scores.tolist()),
                       record=record, map_scale=map_scale(pixel, [result.anomaly_map for result in held_out]))

    # ------------------------------------------------------------------ persistence
    KEYS: ClassVar[tuple[str, ...]] = ("threshold", "threshold_source", "threshold_calibration", "held_out_scores",
                                       "pixel_threshold", "map_scale")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The JSON fields every file format writes (``config.json``, ``metadata.json``, ``run.json``)."""
        return {"threshold": self.threshold, "threshold_source": self.source,
                "threshold_calibration": dict(self.record), "held_out_scores": list(self.held_out_scores),
                "pixel_threshold": self.pixel_threshold, "map_scale": list(self.map_scale) if self.map_scale else None}

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> Calibration:
        """The calibration in a file's fields (:meth:`to_dict`'s keys; missing ones mean none).

        Raises:
            ValueError: A non-finite threshold or an unknown source (a damaged or hand-edited file).
        """
        threshold = fields.get("threshold")
        return cls(threshold=threshold, source=fields.get("threshold_source") or ("given" if threshold is not None
                   else "none"), pixel_threshold=fields.get("pixel_threshold"),
                   held_out_scores=tuple(fields.get("held_out_scores") or ()),
                   record=dict(fields.get("threshold_calibration") or {}),
                   map_scale=tuple(fields["map_scale"]) if fields.get("map_scale") else None)  # fmt: skip

    # ------------------------------------------------------------------ drawing
    def map_scale_for(self, given: Sequence[float] | None = None, zero_shot: bool = False) -> tuple[
            tuple[float, float] | None, str]:  # fmt: skip
        """The colour scale of overlays and where it comes from, in order of precedence:

        - ``"given"``: ``given`` (``--map-scale LOW HIGH``);
        - ``"references"``: :attr:`map_scale`: ``low`` is the typical value of held-out normal references' maps,
          the pixel threshold sits at the middle of the palette, ``high = 2 * pixel_threshold - low``;
        - ``"pixel-threshold"``: ``(0, 2 * pixel_threshold)`` for a given pixel threshold without held-out
          references;
        - ``"fixed"``: ``(0, 1)`` for a method fitted without references (``zero_shot``: its maps are
          probabilities or cosine distances);
        - ``"per-image"``: each map's own min-max (nothing else to go by; colours then do not compare between
          images, which ``run.json`` says).

        Raises:
            ValueError: ``given`` is not two finite numbers LOW < HIGH.
        """
        if given is not None:
            values = tuple(given)
            if not (len(values) == 2 and all(map(is_finite_number, values)) and values[0] < values[1]):
                raise ValueError(f"map scale {given!r} must be two finite numbers LOW < HIGH")
            return (float(values[0]), float(values[1])), "given"
        if self.map_scale:
            return self.map_scale, "references"
        if self.pixel_threshold is not None and self.pixel_threshold > 0:
            return (0.0, 2.0 * self.pixel_threshold), "pixel-threshold"
        if zero_shot:
            return (0.0, 1.0), "fixed"
        return None, "per-image"


def map_scale(pixel_threshold: float | None, held_out_maps: Sequence[np.ndarray]) -> tuple[float, float] | None:
    """The overlays' colour scale ``(low, high)`` from held-out references: ``low`` is the typical value of normal
    maps (the mean of their medians; 0 without them) and the pixel threshold sits in the middle of the palette,
    ``high = 2 * pixel_threshold - low``. ``None`` without a pixel threshold above ``low``."""
    if pixel_threshold is None:
        return None
    low = float(np.mean([np.median(item) for item in held_out_maps])) if len(held_out_maps) else 0.0
    if pixel_threshold <= low:
        return None
    return low, 2.0 * pixel_threshold - low


class Calibrated:
    """The threshold attributes of a detector (torch or exported), each read from its :class:`Calibration`.

    ``detector.threshold = x`` (and ``pixel_threshold``) give a threshold by hand, checked like any other.
    """

    calibration: Calibration

    @property
    def threshold(self) -> float | None:
        return self.calibration.threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self.calibration = replace(self.calibration, threshold=value, source="given")

    @property
    def pixel_threshold(self) -> float | None:
        return self.calibration.pixel_threshold

    @pixel_threshold.setter
    def pixel_threshold(self, value: float | None) -> None:
        self.calibration = replace(self.calibration, pixel_threshold=value)

    @property
    def threshold_source(self) -> str:
        return self.calibration.source

    @property
    def held_out_scores(self) -> list[float]:
        return list(self.calibration.held_out_scores)

    @property
    def threshold_calibration(self) -> dict[str, Any]:
        return dict(self.calibration.record)

    @property
    def map_scale(self) -> tuple[float, float] | None:
        return self.calibration.map_scale


def apply_threshold_options(detector: Any, references: Sequence[Any], class_name: str | None,
                            options: ThresholdOptions, progress: Callable[[int, int], None] | None = None) -> str:
    """Fit ``detector`` on ``references`` where there are any and set its thresholds: the one place that decides
    where a threshold comes from, for every engine, the server and the command line.

    - With references and a few-shot method: ``fit`` by ``options`` (conformal, leave-one-out, given, none).
    - Else a detector not fitted yet is fitted without references (zero-shot), by ``options``.
    - Else the fitted detector keeps its calibration, changed by what ``options`` give
      (:meth:`Calibration.with_options`).

    Returns:
        The threshold's source after it (``detector.calibration.source``).
    """
    references = list(references or [])
    if references or not detector.is_fitted:  # fit() refuses references a method cannot take, in its own words
        if not references and options.false_alarm_rate is not None:
            raise ValueError(f"false_alarm_rate={options.false_alarm_rate} needs normal reference images to hold out "
                             f"(--reference DIR); method {detector.method_name!r} was given none")  # fmt: skip
        detector.fit(references or None, class_name=class_name, progress=progress, options=options)
    else:
        detector.calibration = detector.calibration.with_options(options)
    return detector.calibration.source
