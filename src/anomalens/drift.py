"""Drift alarms with a guarantee: a conformal test martingale over a line's scores (numpy only).

A line drifts (lighting, a moved camera, a new supplier's material) and every score creeps up; nobody notices
until the false alarms pile up, or the threshold is raised by hand. :class:`DriftMonitor` tests, part after part,
whether the scores are still **exchangeable** (drawn the same way, in any order), and raises an alarm when the
evidence against it is strong, with a bound on the alarm's false-alarm probability that holds for the whole,
unbounded stream.

The rule (Vovk, Nouretdinov & Gammerman 2003, "Testing exchangeability on-line"; Vovk et al. 2021, "Retrain or
not retrain? Conformal test martingales for change-point detection"):

1. Each new score ``z_n`` gets its conformal p-value among the scores so far (itself included),
   ``p_n = (#{i <= n: z_i > z_n} + θ_n #{i <= n: z_i = z_n}) / n`` with ``θ_n`` uniform in [0, 1] (a seeded draw,
   so every process computes the same value). If the scores are exchangeable, ``p_1, p_2, ...`` are independent
   and uniform on [0, 1] (Vovk et al. 2003, Theorem 1), whatever the scores' distribution.
2. The **Simple Jumper** martingale bets on them: three betting functions ``f_ε(p) = 1 + ε (p - 1/2)``,
   ``ε ∈ {-1, 0, 1}`` (scores creeping up make p-values small, which ``ε = -1`` wins on; ``ε = 1`` wins when they
   fall), with capital moved between them at rate ``J`` per step so that it can switch when a drift starts late.
   Each ``f_ε`` integrates to 1 over [0, 1], so under exchangeability the capital ``M_n`` is a nonnegative
   martingale with ``M_0 = 1``.
3. An alarm is raised when ``M_n >= 1 / δ``. By Ville's inequality, ``P(sup_n M_n >= 1/δ) <= δ``: on a line that
   does not drift, the probability of **ever** raising the alarm is at most ``δ``.

Assumptions: the scores fed are exchangeable when nothing drifts (one detector version, one product, parts in
the order they come, no selection by score other than a fixed rule such as "passing parts only"); the alarm says
that the stream changed, not why. The station runs two tests per product version, over the scores of passing
parts and of all parts, each at ``δ/2`` (:mod:`anomalens.station.drift`).

Example:
    >>> import random
    >>> line = random.Random(0)
    >>> monitor = DriftMonitor(delta=0.01, seed=0)
    >>> states = monitor.extend([line.random() for _ in range(300)])  # scores that do not drift
    >>> monitor.alarm
    False
    >>> states = monitor.extend([1.0 + line.random() for _ in range(100)])  # every score higher from now on
    >>> monitor.alarm, 300 < monitor.alarm_at < 400
    (True, True)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

JUMP = 0.01  # the Simple Jumper's switching rate J (Vovk et al. 2021 use 0.01)
EPSILONS = (-1.0, 0.0, 1.0)  # the betting functions f_eps(p) = 1 + eps (p - 1/2)
RULE = ("conformal test martingale (Simple Jumper, J={jump}) over the smoothed conformal p-values of the scores fed; "
        "alarm when it reaches 1/delta = {bound:g}: on a line that does not drift (exchangeable scores) the alarm "
        "is ever raised with probability at most delta = {delta:g} (Ville's inequality)")
ASSUMPTIONS = (
    "without drift, the scores fed are exchangeable: one product, one detector version, parts in the order they "
    "come, selected by a fixed rule only (passing parts: the version's fixed threshold)",
    "the alarm says that the stream changed (lighting, camera, material, the defect rate), not why",
)


def check_delta(delta: Any) -> float:
    """``delta`` as a float in (0, 1), or a ``ValueError`` naming it."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"drift delta={delta!r} must be a number in (0, 1), e.g. 0.01")
    return float(delta)


def tie_breaker(seed: int, index: int) -> float:
    """``θ_n``: the uniform draw that smooths the ``index``-th p-value (the same in every process for a seed)."""
    return float(np.random.default_rng([seed, index]).random())


def conformal_p_values(scores: Sequence[float], seed: int = 0) -> list[float]:
    """The smoothed conformal p-values of a score sequence, each against the scores before it and itself
    (step 1 of the module docstring), by brute force; :class:`DriftMonitor` computes the same incrementally."""
    values = []
    for index, score in enumerate(scores):
        seen = scores[: index + 1]
        greater = sum(value > score for value in seen)
        equal = sum(value == score for value in seen)
        values.append((greater + tie_breaker(seed, index) * equal) / (index + 1))
    return values


def simple_jumper(p_values: Iterable[float], jump: float = JUMP) -> list[float]:
    """The Simple Jumper martingale's value after each p-value (step 2 of the module docstring)."""
    capital = {epsilon: 1.0 / len(EPSILONS) for epsilon in EPSILONS}
    values = []
    for p_value in p_values:
        total = sum(capital.values())
        for epsilon in EPSILONS:
            capital[epsilon] = ((1.0 - jump) * capital[epsilon] + jump * total / len(EPSILONS)) * (
                1.0 + epsilon * (p_value - 0.5))  # fmt: skip
        values.append(sum(capital.values()))
    return values


@dataclass(frozen=True)
class DriftState:
    """The monitor after one score."""

    index: int  # 0-based position of the score in the stream
    p_value: float
    martingale: float
    alarm: bool  # the martingale has reached 1/delta at this score or before


class DriftMonitor:
    """An on-line drift test with a guarantee (see the module docstring).

    Args:
        delta: The bound on the probability of ever raising the alarm on a stream that does not drift.
        jump: The Simple Jumper's switching rate ``J``.
        seed: Seeds the tie-breaking draws (the same seed gives the same martingale on the same scores).
    """

    def __init__(self, delta: float = 0.01, jump: float = JUMP, seed: int = 0):
        self.delta = check_delta(delta)
        if isinstance(jump, bool) or not isinstance(jump, (int, float)) or not 0.0 <= jump <= 1.0:
            raise ValueError(f"drift jump={jump!r} must be a number in [0, 1]")
        self.jump = float(jump)
        self.seed = int(seed)
        self._sorted: list[float] = []
        self._capital = {epsilon: 1.0 / len(EPSILONS) for epsilon in EPSILONS}
        self.martingale = 1.0
        self.alarm_at: int | None = None  # index of the score at which the alarm was raised

    @property
    def count(self) -> int:
        return len(self._sorted)

    @property
    def alarm(self) -> bool:
        return self.alarm_at is not None

    @property
    def bound(self) -> float:
        """``1 / delta``: the martingale value that raises the alarm."""
        return 1.0 / self.delta

    def update(self, score: float) -> DriftState:
        """Feed one score; the state after it.

        Raises:
            ValueError: A score that is not a finite number.
        """
        if isinstance(score, bool) or not isinstance(score, (int, float, np.floating)) or not math.isfinite(score):
            raise ValueError(f"drift monitor score {score!r} must be a finite number")
        score = float(score)
        index = self.count
        bisect.insort(self._sorted, score)
        seen = index + 1
        low, high = bisect.bisect_left(self._sorted, score), bisect.bisect_right(self._sorted, score)
        p_value = (seen - high + tie_breaker(self.seed, index) * (high - low)) / seen
        total = sum(self._capital.values())
        for epsilon in EPSILONS:
            self._capital[epsilon] = ((1.0 - self.jump) * self._capital[epsilon] + self.jump * total / len(EPSILONS)) \
                * (1.0 + epsilon * (p_value - 0.5))
        self.martingale = sum(self._capital.values())
        if self.alarm_at is None and self.martingale >= self.bound:
            self.alarm_at = index
        return DriftState(index, p_value, self.martingale, self.alarm)

    def extend(self, scores: Iterable[float]) -> list[DriftState]:
        """Feed scores in order; the state after each."""
        return [self.update(score) for score in scores]

    def describe(self) -> dict[str, Any]:
        """The rule, its assumptions and the state, JSON-ready (the detector's metadata and the page show it)."""
        return {"rule": RULE.format(jump=self.jump, bound=self.bound, delta=self.delta), "delta": self.delta,
                "jump": self.jump, "assumptions": list(ASSUMPTIONS), "observations": self.count,
                "martingale": self.martingale, "alarm": self.alarm, "alarm_at": self.alarm_at}  # fmt: skip
