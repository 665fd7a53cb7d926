"""Drift alarms, measured: how soon the conformal test martingale (``anomalens.DriftMonitor``) raises its alarm
after a drift starts, and how often it raises one on a line that does not drift, against delta.

Scores are real: PatchCore on TAEF2 (real weights, 256 px, coreset 10%) fitted on 10 good MVTec AD bottle images
with a conformal threshold at alpha = 0.1, scoring the other 219 good bottle images (199 training, 20 test) as they
are and as each drift makes them:

- ``brightness-sudden``: 20% brighter from the change on;
- ``brightness-gradual``: brighter by 0% to 30%, rising linearly over the drifted parts;
- ``blur-sudden``: a 1.5 px Gaussian blur (focus lost);
- ``shift-sudden``: the camera moved: the image translated by 40 px (8% of the part) right and down;
- ``material-sudden``: another product's parts (MPDD metal_plate) arrive instead.

Each run is a stream of 400 parts: 150 undrifted parts, then 250 drifted ones (the change at part 150), each
segment drawn at random (seeded) from the scored pools. Three rules: one test at delta over the scores of
**passing** parts (below the version's fixed threshold), one over **all** parts, and the **station**'s: both, each
at delta/2 (the alarm when either fires). Detection delay: line parts after the change until the alarm (runs
without an alarm within the stream are counted as missed).
Undrifted streams: 1,000 seeded streams of 400 parts drawn from the good parts' scores, as they are; the share
that ever raised an alarm is compared with delta (Ville's inequality bounds it by delta).

    python3 benchmarks/drift.py [--shared ../shared] [--out benchmarks/results/drift.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

import anomalens
from anomalens import DriftMonitor
from anomalens.evaluation.profiling import write_benchmark_json

DELTAS = (0.01, 0.05)
CHANGE, LENGTH, RUNS, NULL_RUNS = 150, 400, 200, 1000


def _brighter(factor: float):
    return lambda image: np.asarray(ImageEnhance.Brightness(Image.fromarray(image)).enhance(factor))


def _blur(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5)))


def _shift(image: np.ndarray) -> np.ndarray:
    moved = np.roll(image, (40, 40), axis=(0, 1))
    moved[:40], moved[:, :40] = image[:1].mean(axis=(0, 1)), image[:, :1].mean(axis=(0, 1))  # uncovered: background
    return moved


def _score(detector, images: list[np.ndarray]) -> np.ndarray:
    return np.asarray([result.score for result in detector.predict(images)])


STREAMS = ("passing parts", "all parts", "station: both at delta/2")


def _alarm_at(scores: np.ndarray, threshold: float, delta: float, seed: int, passing: bool) -> int | None:
    """The line part (index in ``scores``) at which the test raised its alarm (``None``: never)."""
    fed = np.flatnonzero(scores <= threshold) if passing else np.arange(len(scores))
    monitor = DriftMonitor(delta, seed=seed)
    for index in fed:
        if monitor.update(float(scores[index])).alarm:
            return int(index)
    return None


def _first_alarm(scores: np.ndarray, threshold: float, delta: float, seed: int, stream: str) -> int | None:
    """The line part at which ``stream``'s rule alarms: one test at ``delta``, or the station's two at ``delta/2``."""
    if stream != STREAMS[2]:
        return _alarm_at(scores, threshold, delta, seed, stream == STREAMS[0])
    found = [_alarm_at(scores, threshold, delta / 2, seed + number, passing)
             for number, passing in enumerate((True, False))]  # fmt: skip
    return min((index for index in found if index is not None), default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--out", default="benchmarks/results/drift.json")
    args = parser.parse_args()
    shared = Path(args.shared)
    os.environ.setdefault("ANOMALENS_WEIGHTS_DIR", str(shared / "weights"))
    bottle = shared / "datasets/mvtec/bottle"
    goods = sorted((bottle / "train/good").glob("*.png"))
    lab = [np.asarray(Image.open(path).convert("RGB")) for path in goods[:10]]
    normals = [np.asarray(Image.open(path).convert("RGB")) for path in goods[10:]]
    normals += [np.asarray(Image.open(path).convert("RGB")) for path in sorted((bottle / "test/good").glob("*.png"))]
    plates = [np.asarray(Image.open(path).convert("RGB"))
              for path in sorted((shared / "datasets/mpdd/metal_plate/train/good").glob("*.png"))]  # fmt: skip
    detector = anomalens.create("patchcore", backbone="taef2").fit(lab, false_alarm_rate=0.1)
    threshold = detector.threshold
    started = time.perf_counter()
    pools = {"none": _score(detector, normals)}
    drifted_inputs = normals[: LENGTH - CHANGE]
    transforms = {"brightness-sudden": _brighter(1.2), "blur-sudden": _blur, "shift-sudden": _shift}
    for kind, transform in transforms.items():
        pools[kind] = _score(detector, [transform(image) for image in drifted_inputs])
        print(kind, "scored", flush=True)
    ramp = np.linspace(1.0, 1.3, len(drifted_inputs))
    pools["brightness-gradual"] = _score(detector, [_brighter(f)(image) for f, image in zip(ramp, drifted_inputs)])
    pools["material-sudden"] = _score(detector, plates)
    scoring_seconds = time.perf_counter() - started
    rows = []
    for kind in [kind for kind in pools if kind != "none"]:
        for delta in DELTAS:
            for stream in STREAMS:
                delays, false_before = [], 0
                for run in range(RUNS):
                    rng = np.random.default_rng(run)
                    before = rng.choice(pools["none"], CHANGE, replace=False)
                    if kind == "brightness-gradual":  # the ramp in order: each part brighter than the last
                        after = pools[kind]
                    else:
                        after = rng.choice(pools[kind], LENGTH - CHANGE, replace=len(pools[kind]) < LENGTH - CHANGE)
                    alarm = _first_alarm(np.r_[before, after], threshold, delta, run, stream)
                    false_before += alarm is not None and alarm < CHANGE
                    delays.append(alarm - CHANGE if alarm is not None and alarm >= CHANGE else None)
                found = [delay for delay in delays if delay is not None]
                passed_after = float((pools[kind] <= threshold).mean())
                rows.append({"drift": kind, "delta": delta, "stream": stream,
                             "detected": len(found) / RUNS, "alarms_before_change": false_before,
                             "median_delay": float(np.median(found)) if found else None,
                             "p90_delay": round(float(np.percentile(found, 90)), 1) if found else None,
                             "drifted_parts_passing": round(passed_after, 3)})  # fmt: skip
                print(rows[-1], flush=True)
    null_rows = []
    for delta in DELTAS:
        for stream in STREAMS:
            alarms = 0
            for run in range(NULL_RUNS):
                line = np.random.default_rng(10_000 + run).choice(pools["none"], LENGTH, replace=True)
                alarms += _first_alarm(line, threshold, delta, run, stream) is not None
            null_rows.append({"delta": delta, "stream": stream, "runs": NULL_RUNS, "alarm_rate": alarms / NULL_RUNS})
            print(null_rows[-1], flush=True)
    result = write_benchmark_json(args.out, {"threshold": threshold, "scoring_seconds": round(scoring_seconds, 1),
                                             "change_at": CHANGE, "length": LENGTH, "runs": RUNS, "rows": rows,
                                             "undrifted": null_rows})  # fmt: skip
    Path(args.out).with_suffix(".md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    lines = ["# Drift alarms: detection delay and the alarm rate without drift", "", f"`{result['command']}`", "",
             f"Streams of {result['length']} bottle parts, the drift starting at part {result['change_at']}; "
             f"{result['runs']} seeded runs per row. Delay: line parts from the change to the alarm (runs without one "
             "within the stream are not detected).", "",
             "| drift | delta | stream | detected | median delay | p90 delay | alarms before the change | "
             "drifted parts passing |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["rows"]:
        lines.append(f"| {row['drift']} | {row['delta']} | {row['stream']} | {row['detected']:.2f} | "
                     f"{row['median_delay']} | {row['p90_delay']} | {row['alarms_before_change']} | "
                     f"{row['drifted_parts_passing']} |")  # fmt: skip
    lines += ["", "Streams that do not drift (the good parts' scores, drawn at random):", "",
              "| delta | stream | runs | alarm rate (must be <= delta) |", "|---|---|---|---|"]
    for row in result["undrifted"]:
        lines.append(f"| {row['delta']} | {row['stream']} | {row['runs']} | {row['alarm_rate']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
