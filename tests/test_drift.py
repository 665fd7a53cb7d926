"""Drift alarms: the conformal test martingale against a hand-computed case and a brute-force one, its alarm rate on
exchangeable streams against delta by simulation, and the station's alarm recorded once, with its webhook event,
whichever process sees it first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomalens import DriftMonitor
from anomalens.drift import conformal_p_values, simple_jumper
from anomalens.station.drift import DriftWatch, drift_record
from anomalens.station.history import History


def _theta(seed: int, index: int) -> float:
    return float(np.random.default_rng([seed, index]).random())  # the documented tie-breaking draw


def test_the_martingale_by_hand_on_a_fixed_sequence():
    scores = [2.0, 1.0, 2.0, 3.0]
    t = [_theta(0, index) for index in range(4)]
    p = [t[0], (1 + t[1]) / 2, 2 * t[2] / 3, t[3] / 4]  # (#greater + theta * #equal) / n, itself included
    capital = {-1: 1 / 3, 0: 1 / 3, 1: 1 / 3}
    expected = []
    for value in p:  # the Simple Jumper, J = 0.01, written out
        total = capital[-1] + capital[0] + capital[1]
        capital = {eps: (0.99 * capital[eps] + 0.01 * total / 3) * (1 + eps * (value - 0.5)) for eps in capital}
        expected.append(capital[-1] + capital[0] + capital[1])
    assert expected[0] == pytest.approx(1.0)  # the symmetric bets cancel on the first part
    states = DriftMonitor(delta=0.01, seed=0).extend(scores)
    assert [state.p_value for state in states] == pytest.approx(p, abs=1e-12)
    assert [state.martingale for state in states] == pytest.approx(expected, rel=1e-12)


def test_the_incremental_monitor_equals_brute_force_with_ties():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=300), 1).tolist()  # many ties
    states = DriftMonitor(seed=5).extend(scores)
    brute = simple_jumper(conformal_p_values(scores, seed=5))
    assert [state.martingale for state in states] == pytest.approx(brute, rel=1e-9)


def test_the_alarm_rate_on_streams_that_do_not_drift_stays_below_delta():
    """Ville's inequality: P(ever reaching 1/delta) <= delta; 600 seeded exchangeable streams of 300 parts."""
    rng = np.random.default_rng(2)
    delta, runs = 0.1, 600
    alarms = sum(DriftMonitor(delta, seed=run).extend(rng.gamma(2.0, size=300).tolist())[-1].alarm
                 for run in range(runs))  # fmt: skip
    assert alarms / runs <= delta


def test_a_drift_is_caught_soon_after_it_starts():
    rng = np.random.default_rng(3)
    delays = []
    for run in range(20):
        stream = np.concatenate([rng.normal(size=200), rng.normal(size=300) + 1.0])  # scores creep up at 200
        monitor = DriftMonitor(delta=0.01, seed=run)
        monitor.extend(stream.tolist())
        assert monitor.alarm and monitor.alarm_at >= 150
        delays.append(monitor.alarm_at - 200)
    assert float(np.median(delays)) < 100


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1", True])
def test_bad_scores_and_deltas_are_refused(value):
    with pytest.raises(ValueError, match="must be a finite number"):
        DriftMonitor().update(value)
    with pytest.raises(ValueError, match="drift delta=.* must be a number in \\(0, 1\\)"):
        DriftMonitor(delta=1.5)


def _inspection(score: float, label: str = "normal") -> dict:
    return {"product": "part", "version": 1, "source": "test", "image_sha256": "0" * 64, "score": score,
            "label": label}  # fmt: skip


def test_the_station_records_one_alarm_with_its_webhook_whoever_sees_it(db_url):
    first, second = History(db_url), History(db_url)  # two processes' connections
    try:
        rng = np.random.default_rng(4)
        watch_a, watch_b = DriftWatch(first, ("http://receiver/hook",)), DriftWatch(second, ("http://receiver/hook",))
        scores = [*rng.normal(size=60), *(rng.normal(size=80) + 3.0)]
        fed = {"passing": [], "all": []}
        for index, score in enumerate(scores):
            history = first if index % 2 else second
            history.record(_inspection(float(score)))
            fed["passing"].append(float(score))
            fed["all"].append(float(score))
            if index % 7 == 0:
                history.record(_inspection(99.0, "anomalous"))  # a flagged part: in the all-parts stream only
                fed["all"].append(99.0)
            (watch_a if index % 2 else watch_b).observe("part", 1, 0.01)
        seen_a, seen_b = watch_a.observe("part", 1, 0.01), watch_b.observe("part", 1, 0.01)
        alarms = {alarm["stream"]: alarm for alarm in first.drift_alarms("part")}
        for number, name in enumerate(("passing", "all")):  # seeds: 2 * version + the stream's number
            brute = simple_jumper(conformal_p_values(fed[name], seed=2 + number))
            assert list(seen_a[name].values) == pytest.approx(brute) == list(seen_b[name].values)  # the same test
            crossed = [index + 1 for index, value in enumerate(brute) if value >= 2 / 0.01]  # each at delta / 2
            assert (alarms[name]["observations"] == crossed[0]) if crossed else name not in alarms
        assert alarms and all(alarm["delta"] == 0.005 for alarm in alarms.values())
        events = [json.loads(event["payload"]) for event in first.events() if event["event"] == "drift"]
        assert sorted(event["stream"] for event in events) == sorted(alarms)  # one event per alarm, no more
        series = watch_a.series("part", 1, 0.01)
        assert series["alarm"] and series["streams"]["passing"]["bound"] == pytest.approx(200)
        assert len(series["streams"]["all"]["martingale_series"]) == len(fed["all"])
    finally:
        first.close()
        second.close()


def test_a_version_records_its_drift_rule():
    record = drift_record(0.05)
    assert record["delta"] == 0.05 and "2/delta = 40" in record["rule"] and record["streams"] == ["passing", "all"]
