"""The conformal threshold's false-alarm rate, measured on normal images the detector never saw.

For each seed, the normal training images of a category are shuffled; ``--fit`` of them plus ``--calibration``
held-out ones are given to ``Detector.fit(false_alarm_rate=..., calibration="split", calibration_size=...)`` (the
library draws which are held out), and every other normal image, the rest of train/good and all of test/good, is
scored. The measured rate is the share of those above the threshold, pooled over seeds; the guarantee says its
expectation lies in ``(alpha - 1/(m+1), alpha]``. A Clopper-Pearson 95% interval is given for each measurement.

    python3 benchmarks/false_alarm.py --root ../shared/datasets/mvtec --category bottle --fit 20 --calibration 100 \
        --seeds 0 1 2 3 4 --out benchmarks/results/real-data/false-alarm-bottle.json
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

import anomalens
from anomalens.evaluation.profiling import machine_info
from anomalens.io.datasets import open_dataset
from anomalens.io.images import load_image
from anomalens.io.outputs import atomic_write_json, atomic_write_text
from anomalens.thresholds import conformal_threshold, required_references


def clopper_pearson(flagged: int, total: int, level: float = 0.95) -> tuple[float, float]:
    low = stats.beta.ppf((1 - level) / 2, flagged, total - flagged + 1) if flagged else 0.0
    high = stats.beta.ppf(1 - (1 - level) / 2, flagged + 1, total - flagged) if flagged < total else 1.0
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--dataset", default="mvtec")
    parser.add_argument("--category", required=True)
    parser.add_argument("--fit", type=int, required=True, help="references the detector is fitted on")
    parser.add_argument("--calibration", type=int, required=True, help="references held out for the threshold")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--method", default="patchcore")
    parser.add_argument("--set", nargs="*", default=["backbone=taef2"], help="method options NAME=VALUE")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    options = dict(item.split("=", 1) for item in args.set)
    dataset = open_dataset(args.dataset, args.root)
    train = [sample.image_path for sample in dataset.train_samples(args.category)]
    test_good = [sample.image_path for sample in dataset.test_samples(args.category) if sample.label == 0]
    usable = [alpha for alpha in args.alphas if required_references(alpha) <= args.calibration]
    smallest = min(usable)
    per_seed = []
    for seed in args.seeds:
        began = time.perf_counter()
        order = np.random.default_rng(1000 + seed).permutation(len(train))
        given = [train[index] for index in order[: args.fit + args.calibration]]
        unseen = [train[index] for index in order[args.fit + args.calibration :]] + test_good
        detector = anomalens.create(args.method, seed=seed, **options)
        detector.fit([load_image(path) for path in given], class_name=args.category, false_alarm_rate=smallest,
                     calibration="split", calibration_size=args.calibration)  # fmt: skip
        assert detector.threshold == conformal_threshold(detector.held_out_scores, smallest)
        scores = np.array([result.score for result in detector.predict(unseen)])
        rows = []
        for alpha in usable:
            threshold = conformal_threshold(detector.held_out_scores, alpha)
            rows.append({"alpha": alpha, "threshold": threshold, "flagged": int((scores > threshold).sum()),
                         "normal": int(scores.size)})  # fmt: skip
        per_seed.append({"seed": seed, "n_fitted_on": detector.threshold_calibration["n_fitted_on"],
                         "n_held_out": len(detector.held_out_scores), "unseen_normal": len(unseen),
                         "seconds": round(time.perf_counter() - began, 1), "rates": rows})  # fmt: skip
        print(f"seed {seed}: " + ", ".join(f"alpha {row['alpha']}: {row['flagged']}/{row['normal']}" for row in rows))
    summary = []
    for index, alpha in enumerate(usable):
        flagged = sum(seed["rates"][index]["flagged"] for seed in per_seed)
        total = sum(seed["rates"][index]["normal"] for seed in per_seed)
        low, high = clopper_pearson(flagged, total)
        bound = [alpha - 1 / (args.calibration + 1), alpha]
        summary.append({"alpha": alpha, "flagged": flagged, "normal": total, "measured": flagged / total,
                        "ci95": [low, high], "guarantee": bound,
                        "consistent": bool(low <= bound[1] and high >= bound[0])})  # fmt: skip
    skipped = [alpha for alpha in args.alphas if alpha not in usable]
    result = {
        "category": args.category, "method": args.method, "options": options, "fit": args.fit,
        "calibration": args.calibration, "seeds": args.seeds, "summary": summary, "per_seed": per_seed,
        "alphas_skipped": {str(alpha): f"needs {required_references(alpha)} held-out references" for alpha in skipped},
        "command": "python3 " + " ".join(shlex.quote(part) for part in sys.argv), "machine": machine_info(),
    }  # fmt: skip
    out = Path(args.out)
    atomic_write_json(out, result)
    lines = [f"# Conformal threshold, {args.method} on {args.category}: fitted on {args.fit}, {args.calibration} "
             f"held out, seeds {args.seeds}", "",
             "| alpha asked | flagged / unseen normal | measured | 95% interval | guarantee (mean) | consistent |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in summary:
        low, high = row["ci95"]
        lines.append(f"| {row['alpha']} | {row['flagged']} / {row['normal']} | {row['measured']:.3f} | "
                     f"[{low:.3f}, {high:.3f}] | ({max(row['guarantee'][0], 0):.3f}, {row['guarantee'][1]:.3f}] | "
                     f"{row['consistent']} |")  # fmt: skip
    for alpha, reason in result["alphas_skipped"].items():
        lines.append(f"| {alpha} | n/a: {reason} | | | | |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + f"\n\nCommand: `{result['command']}`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
