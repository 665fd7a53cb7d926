"""Calibrated fits in minutes (issue 34, item 3): the default ``fit`` with a threshold on many references, timed
against the plain fit, and its false-alarm rate on normal images it never saw.

PatchCore on TAEF2 (real weights), MVTec AD bottle. One process, one machine, three fits of the same references:

- ``plain``: ``fit(threshold=None)``: one coreset, no held-out scores (the speed benchmark's fit);
- ``shared`` (now the default): ``fit()``, the leave-one-out rule held out in k folds on one fit, each fold's
  memory entries left out and the coreset's holes refilled (``anomalens.thresholds.fit_holding_out``);
- ``refit`` (before, with ``--refit``): the same plan with a coreset fitted per fold.

Then the guarantee, on a smaller fit so that many normal images stay unseen: for each seed, ``--fit`` train/good
images (a seeded draw) calibrated at ``false_alarm_rate=alpha`` by ``leave-one-out`` and ``k-fold`` on the shared
memory, and by ``split`` (the exact guarantee, the reference), each detector scoring every other normal image
(the rest of train/good and all of test/good). Rates pooled over seeds, with Clopper-Pearson 95% intervals, plus
each detector's image AUROC on the test set.

    python3 benchmarks/calibrated_fit.py --shared ../shared --refit \\
        --out benchmarks/results/calibrated-fit-bottle-round3.json
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
from false_alarm import clopper_pearson  # this folder's script, beside it on the path
from sklearn.metrics import roc_auc_score

import anomalens
from anomalens.evaluation.profiling import write_benchmark_json
from anomalens.io.outputs import atomic_write_text


def refitting(detector):
    """The same detector scoring each fold on a fit of its own (the former way)."""
    detector.__class__ = type(f"{type(detector).__name__}Refit", (type(detector),), {"folds_share_memory": False})
    return detector


def timed_fit(weights: Path, references: list, how: str) -> tuple[object, float]:
    detector = anomalens.create("patchcore", backbone="taef2", weights_dir=weights)
    if how == "refit":
        refitting(detector)
    started = time.perf_counter()
    detector.fit(references, class_name="bottle", threshold=None if how == "plain" else "auto")
    return detector, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--refit", action="store_true", help="also time the former fit (a coreset per fold)")
    parser.add_argument("--fit", type=int, default=60, help="references of the false-alarm check's fits")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/calibrated-fit-bottle-round3.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.shared) / "datasets" / "mvtec" / "bottle"
    weights = Path(args.shared) / "weights"
    train = sorted((root / "train" / "good").glob("*.png"))
    test = sorted(path for path in (root / "test").rglob("*.png"))
    test_good = [path for path in test if path.parent.name == "good"]
    labels = [int(path.parent.name != "good") for path in test]
    result: dict = {"benchmark": "calibrated fit, PatchCore-TAEF2 (real weights), MVTec AD bottle",
                    "references": len(train)}  # fmt: skip

    if not args.skip_timing:
        arrays = [anomalens.load_image(path) for path in train]
        timing = {}
        for how in ["plain", "shared", *(["refit"] if args.refit else [])]:
            detector, seconds = timed_fit(weights, arrays, how)
            good_scores = [item.score for item in detector.predict(test_good)] if how != "plain" else []
            timing[how] = {"seconds": round(seconds, 1), "threshold": detector.threshold,
                           "calibration": detector.threshold_calibration,
                           "test_good_flagged": sum(score > detector.threshold for score in good_scores)
                           if good_scores else None, "test_good": len(good_scores)}  # fmt: skip
            logging.warning("%s fit on %d references: %.1f s", how, len(arrays), seconds)
        timing["shared_over_plain"] = round(timing["shared"]["seconds"] / timing["plain"]["seconds"], 2)
        if args.refit:
            timing["refit_over_plain"] = round(timing["refit"]["seconds"] / timing["plain"]["seconds"], 2)
            timing["speedup"] = round(timing["refit"]["seconds"] / timing["shared"]["seconds"], 2)
        result["timing"] = timing

    schemes = ["leave-one-out", "k-fold", "split"]
    pooled = {scheme: [0, 0] for scheme in schemes}
    per_seed = []
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(train))
        fitted = [train[index] for index in order[: args.fit]]
        unseen = [train[index] for index in order[args.fit :]] + test_good
        row = {"seed": seed}
        for scheme in schemes:
            detector = anomalens.create("patchcore", backbone="taef2", weights_dir=weights, seed=seed)
            started = time.perf_counter()
            detector.fit(fitted, class_name="bottle", false_alarm_rate=args.alpha, calibration=scheme)
            seconds = time.perf_counter() - started
            unseen_scores = np.array([item.score for item in detector.predict(unseen)])
            test_scores = np.array([item.score for item in detector.predict(test)])
            flagged = int((unseen_scores > detector.threshold).sum())
            pooled[scheme][0] += flagged
            pooled[scheme][1] += len(unseen)
            row[scheme] = {"threshold": detector.threshold, "flagged": flagged, "unseen": len(unseen),
                           "rate": flagged / len(unseen), "fit_seconds": round(seconds, 1),
                           "held_out": detector.threshold_calibration["n_held_out"],
                           "fitted_on": detector.threshold_calibration["n_fitted_on"],
                           "image_auroc": float(roc_auc_score(labels, test_scores)),
                           "recall_at_threshold": float((test_scores[np.array(labels) == 1]
                                                         > detector.threshold).mean())}  # fmt: skip
            logging.warning("seed %d %s: %d/%d flagged", seed, scheme, flagged, len(unseen))
        per_seed.append(row)
    result["false_alarms"] = {
        "alpha": args.alpha, "fit": args.fit, "seeds": args.seeds, "per_seed": per_seed,
        "pooled": {scheme: {"flagged": flagged, "unseen": total, "rate": flagged / total,
                            "ci95": clopper_pearson(flagged, total)}
                   for scheme, (flagged, total) in pooled.items()},
    }  # fmt: skip
    result = write_benchmark_json(args.out, result)
    atomic_write_text(Path(args.out).with_suffix(".md"), _markdown(result))


def _markdown(result: dict) -> str:
    lines = [f"# {result['benchmark']}", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} threads.", ""]  # fmt: skip
    timing = result.get("timing")
    if timing:
        lines += ["| fit on all references | seconds | x plain | threshold | folds | test/good flagged |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for how in ("plain", "shared", "refit"):
            if how in timing:
                row = timing[how]
                folds = row["calibration"].get("fold_memory", "-") if row["calibration"] else "-"
                flagged = f"{row['test_good_flagged']}/{row['test_good']}" if row["test_good"] else "-"
                ratio = round(row["seconds"] / timing["plain"]["seconds"], 2)
                lines.append(f"| {how} | {row['seconds']} | {ratio} | {row['threshold']} | {folds} | {flagged} |")
        lines.append("")
    alarms = result["false_alarms"]
    lines += [f"False alarms at alpha = {alarms['alpha']}, fits on {alarms['fit']} references, seeds "
              f"{alarms['seeds']}:", "", "| calibration | flagged / unseen normals | rate (95% CI) | mean image AUROC "
              "| mean defect recall at the threshold | mean fit s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for scheme, pooled in alarms["pooled"].items():
        rows = [row[scheme] for row in alarms["per_seed"]]
        low, high = pooled["ci95"]
        lines.append(f"| {scheme} | {pooled['flagged']} / {pooled['unseen']} | {pooled['rate']:.3f} "
                     f"({low:.3f}-{high:.3f}) | {np.mean([r['image_auroc'] for r in rows]):.4f} | "
                     f"{np.mean([r['recall_at_threshold'] for r in rows]):.3f} | "
                     f"{np.mean([r['fit_seconds'] for r in rows]):.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
