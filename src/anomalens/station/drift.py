"""Drift alarms of a station: each product version's scores, in the history's order, through two
:class:`~anomalens.drift.DriftMonitor` tests, each at ``δ/2``:

- ``passing``: the scores of passing parts (below the version's fixed threshold). Defects hardly enter it, so a
  burst of defective parts does not move it; it sees the normal parts creep up (lighting, focus, a worn fixture).
- ``all``: every part's score. It sees what the first cannot: a change that makes nearly every part fail (a moved
  camera, another product on the line) leaves the passing stream almost nothing to see. A lasting change in the
  defect rate also moves it.

The version's alarm is raised when either reaches ``2/δ``; by Ville's inequality and the union bound, a line that
does not drift (both streams exchangeable) ever raises it with probability at most ``δ``.

Every process that records inspections (``serve``, each ``watch``) catches up on the history after recording a
part: it feeds the version's scores it has not seen yet, in id order, so every process computes the same
martingales over the same streams whoever scored each part. The first to see one reach its level records the
alarm (once per version and stream: a unique row) with its webhook event in one transaction. A new version starts
new tests (its threshold, hence its passing stream, is new).

``δ`` is the version's (``version.json``'s ``drift.delta``, set by ``models add --drift-delta``; default
:data:`DEFAULT_DELTA`).
"""

from __future__ import annotations

import logging
import threading
from array import array
from dataclasses import dataclass, field
from typing import Any

from anomalens.drift import ASSUMPTIONS, DriftMonitor, check_delta

logger = logging.getLogger(__name__)

DEFAULT_DELTA = 0.01  # a line that does not drift raises the alarm with probability at most 1%
STREAMS = ("passing", "all")  # the two tests of a version, each at delta / 2
SERIES_POINTS = 400  # points of each martingale the page gets at most (evenly thinned)
RULE = ("two conformal test martingales (Simple Jumper) per product version, over the scores of passing parts and "
        "of all parts in the history's order, each raising the alarm at 2/delta = {bound:g}: on a line that does not "
        "drift the alarm is ever raised with probability at most delta = {delta:g} (Ville's inequality, union "
        "bound)")  # fmt: skip


def drift_record(delta: float = DEFAULT_DELTA) -> dict[str, Any]:
    """The ``drift`` entry of a version's metadata: the rule, its assumptions and ``δ``."""
    delta = check_delta(delta)
    return {"delta": delta, "streams": list(STREAMS), "rule": RULE.format(bound=len(STREAMS) / delta, delta=delta),
            "assumptions": [*ASSUMPTIONS, "for the all-parts stream, the defect rate is steady too"]}  # fmt: skip


def version_delta(record: dict[str, Any]) -> float:
    """A version's ``δ`` (the default for versions made before drift alarms)."""
    return float((record.get("drift") or {}).get("delta", DEFAULT_DELTA))


@dataclass
class _Stream:
    monitor: DriftMonitor
    last_id: int = 0
    ids: array = field(default_factory=lambda: array("q"))  # compact: a line's months of parts
    values: array = field(default_factory=lambda: array("d"))
    alarm_recorded: bool = False


class DriftWatch:
    """The drift tests of the products a process records (see the module docstring)."""

    def __init__(self, history, webhooks: tuple[str, ...] = ()):
        self.history = history
        self.webhooks = tuple(webhooks)
        self._streams: dict[tuple[str, int, str], _Stream] = {}
        self._lock = threading.Lock()

    def observe(self, product: str, version: int, delta: float) -> dict[str, _Stream]:
        """Catch up on the version's scores; record an alarm where a martingale reached its level."""
        with self._lock:
            return {name: self._observe(product, version, delta, number, name) for number, name in enumerate(STREAMS)}

    def _observe(self, product: str, version: int, delta: float, number: int, name: str) -> _Stream:
        key, share = (product, version, name), delta / len(STREAMS)
        stream = self._streams.get(key)
        if stream is None or stream.monitor.delta != share:
            stream = self._streams[key] = _Stream(DriftMonitor(share, seed=len(STREAMS) * version + number))
        for inspection_id, score in self.history.stream_scores(product, version, stream.last_id, name == "passing"):
            state = stream.monitor.update(score)
            stream.last_id = inspection_id
            stream.ids.append(inspection_id)
            stream.values.append(state.martingale)
            if state.alarm and not stream.alarm_recorded:
                self.history.raise_drift_alarm(product, version, name, inspection_id, state.index + 1,
                                               state.martingale, share, self.webhooks)  # fmt: skip
                stream.alarm_recorded = True
        return stream

    def observe_quietly(self, product: str, version: int, delta: float) -> None:
        """:meth:`observe`, a failure logged and never raised (drift must never stop the line)."""
        try:
            self.observe(product, version, delta)
        except Exception as error:  # noqa: BLE001
            logger.error("drift test of %s@%d failed: %s", product, version, error)

    def series(self, product: str, version: int, delta: float) -> dict[str, Any]:
        """Both martingales over the version's parts so far (each thinned to :data:`SERIES_POINTS`), the rule
        and any alarm, JSON-ready (``GET /v1/detectors/{name}/drift``)."""
        streams = self.observe(product, version, delta)
        alarms = {alarm["stream"]: alarm for alarm in self.history.drift_alarms(product) if alarm["version"] == version}
        described = {name: {**_thinned(stream), "martingale": stream.monitor.martingale,
                            "observations": stream.monitor.count, "alarm": stream.monitor.alarm,
                            "bound": stream.monitor.bound, "alarm_record": alarms.get(name)}
                     for name, stream in streams.items()}  # fmt: skip
        return {"product": product, "version": version, **drift_record(delta), "alarm": bool(alarms),
                "streams": described}


def _thinned(stream: _Stream) -> dict[str, list]:
    step = max(1, -(-len(stream.values) // SERIES_POINTS))
    picked = list(range(0, len(stream.values), step))
    if stream.values and picked[-1] != len(stream.values) - 1:
        picked.append(len(stream.values) - 1)
    return {"ids": [stream.ids[index] for index in picked], "martingale_series": [stream.values[index] for index in
                                                                                  picked]}  # fmt: skip
