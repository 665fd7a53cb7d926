"""Learning from the inspector, measured: a detector fitted in the lab meets the line, an inspector oracle overrules
its false alarms, and ``Detector.update`` takes them in round after round.

Setup per product (PatchCore on TAEF2, real weights, 256 px, coreset 10%, conformal alpha = 0.1):

- **lab**: 10 good training images (sorted names), leave-one-out conformal calibration.
- **the line** sees every part through a slightly different camera: 12% brighter and a 0.8 px blur (the lab's
  references are not the line's normals). Its parts are the remaining good training images, shuffled (seed 0).
- **audit sample**: a random half of the line's good parts each round (plus a burn-in before round 1) are
  inspected and confirmed normal: they recalibrate the threshold (never taken into the memory).
- **each round**: the round's other good parts are scored; those flagged are false alarms that the oracle
  overrules; they are taken in by ``detector.update(false_alarms, audit_sample_so_far)``.
- **evaluation** after rounds 0 (the lab detector), 1, 2 and 5, on parts no round ever used: the remaining good
  training images and the test set (good and defective, through the line's camera): false-alarm rate of unseen
  normals and defect recall at the threshold, image AUROC and pixel AUROC (maps and masks at 256 px).
- **full refit** for comparison at each round: PatchCore fitted on the lab references plus every part taken in so
  far (the same coreset ratio, no threshold): its time and memory size against the update's memory growth
  (encoding the new parts and growing the memory; the recalibration, scoring the audit sample, is timed apart:
  a refit would need it too).

    python3 benchmarks/feedback_loop.py [--shared ../shared] [--out benchmarks/results/feedback-loop.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

import anomalens
from anomalens.evaluation.metrics import auroc
from anomalens.evaluation.profiling import write_benchmark_json
from anomalens.io.images import load_mask

ALPHA = 0.1
EVALUATED = (0, 1, 2, 5)
PRODUCTS = {  # name: (dataset folder, good parts per round, audit burn-in)
    "bottle": ("datasets/mvtec/bottle", 20, 10),
    "metal_plate": ("datasets/mpdd/metal_plate", 6, 10),
}


def line_view(path: Path) -> np.ndarray:
    """A part as the line's camera sees it: 12% brighter, 0.8 px Gaussian blur."""
    image = Image.open(path).convert("RGB")
    image = ImageEnhance.Brightness(image).enhance(1.12).filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(image)


def lab_view(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _pixel_auroc(results, masks: list[np.ndarray]) -> float:
    maps = []
    for result in results:
        tensor = torch.from_numpy(result.anomaly_map)[None, None]
        maps.append(F.interpolate(tensor, size=(256, 256), mode="bilinear", align_corners=False)[0, 0].numpy())
    return float(auroc(np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])))


def _evaluate(detector, normals: list[np.ndarray], defects: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    normal_results, defect_results = detector.predict(normals), detector.predict(defects)
    normal_scores = np.asarray([r.score for r in normal_results])
    defect_scores = np.asarray([r.score for r in defect_results])
    threshold = detector.threshold
    labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(defect_scores))]
    normal_masks = [np.zeros((256, 256), np.uint8)] * len(normals)
    return {"threshold": threshold, "false_alarm_rate": float((normal_scores > threshold).mean()),
            "false_alarms": int((normal_scores > threshold).sum()), "unseen_normals": len(normal_scores),
            "defect_recall": float((defect_scores > threshold).mean()), "defects": len(defect_scores),
            "image_auroc": round(float(auroc(np.r_[normal_scores, defect_scores], labels)), 4),
            "pixel_auroc": round(_pixel_auroc(normal_results + defect_results, normal_masks + masks), 4)}  # fmt: skip


def run_product(name: str, shared: Path, per_round: int, burn_in: int) -> list[dict]:
    root = shared / PRODUCTS[name][0]
    goods = sorted((root / "train/good").glob("*.png"))
    lab, rest = goods[:10], list(np.random.default_rng(0).permutation(np.array(goods[10:], dtype=object)))
    audit = [line_view(path) for path in rest[:burn_in]]
    rounds = [rest[burn_in + index * per_round : burn_in + (index + 1) * per_round] for index in range(5)]
    unseen = rest[burn_in + 5 * per_round :] + sorted((root / "test/good").glob("*.png"))
    defect_paths = sorted(path for path in (root / "test").rglob("*.png") if path.parent.name != "good")
    normals, defects = [line_view(path) for path in unseen], [line_view(path) for path in defect_paths]
    masks = []
    for path in defect_paths:
        mask_path = root / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = load_mask(mask_path, Image.open(path).size[::-1])
        masks.append(np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((256, 256), Image.NEAREST)) > 0)
    references = [lab_view(path) for path in lab]

    detector = anomalens.create("patchcore", backbone="taef2")
    began = time.perf_counter()
    detector.fit(references, false_alarm_rate=ALPHA)
    rows = [{"product": name, "round": 0, "fit_seconds": round(time.perf_counter() - began, 2),
             "memory_size": len(detector.memory), "coverage_radius": detector.memory.coverage_radius,
             "taken_in": 0, "calibration_images": len(detector.held_out_scores),
             **_evaluate(detector, normals, defects, masks)}]  # fmt: skip
    print(rows[-1], flush=True)
    taken: list[np.ndarray] = []
    for number, paths in enumerate(rounds, start=1):
        parts = [line_view(path) for path in paths]
        half = len(parts) // 2
        audit.extend(parts[:half])  # the audit sample: confirmed normal, for the threshold only
        production = parts[half:]
        false_alarms = [part for part, result in zip(production, detector.predict(production)) if result.label]
        row = {"product": name, "round": number, "line_parts": len(production), "taken_in": len(false_alarms),
               "calibration_images": len(audit)}  # fmt: skip
        if false_alarms:
            report = detector.update(false_alarms, audit, calibration_from="the line's audit sample (oracle)")
            taken.extend(false_alarms)
            row.update(update_seconds=round(report.memory_seconds, 2), memory_size=report.memory_size_after,
                       recalibration_seconds=round(report.seconds - report.memory_seconds, 2),
                       coverage_radius=report.memories["memory"].radius_after,
                       threshold_before=report.threshold_before)  # fmt: skip
        else:  # nothing to take in: recalibrate on the grown audit sample only
            detector.calibration = detector.calibration.recalibrated(detector.predict(audit), "the line's audit sample")
            row.update(update_seconds=0.0, memory_size=len(detector.memory),
                       coverage_radius=detector.memory.coverage_radius)  # fmt: skip
        refit = anomalens.create("patchcore", backbone="taef2")
        began = time.perf_counter()
        refit.fit(references + taken, threshold=None)
        row.update(refit_seconds=round(time.perf_counter() - began, 2), refit_memory_size=len(refit.memory),
                   refit_coverage_radius=refit.memory.coverage_radius)  # fmt: skip
        if number in EVALUATED:
            row.update(_evaluate(detector, normals, defects, masks))
        else:
            row["threshold"] = detector.threshold
        rows.append(row)
        print(row, flush=True)
    return rows


def render(result: dict) -> str:
    lines = ["# Feedback loop: reviewed false alarms taken in round by round", "", f"`{result['command']}`", "",
             f"PatchCore-TAEF2, conformal alpha = {ALPHA}; the line's camera differs from the lab's (see the "
             "script's docstring). Rates on parts no round used.", "",
             "| product | round | taken in | audit (calibration) | threshold | false-alarm rate (unseen normals) | "
             "defect recall | image AUROC | pixel AUROC | memory | coverage radius | update: memory (s) | "
             "recalibration (s) | full refit (s) | refit memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["rows"]:
        if "false_alarm_rate" not in row:
            continue
        far = f"{row['false_alarm_rate']:.3f} ({row['false_alarms']}/{row['unseen_normals']})"
        lines.append(f"| {row['product']} | {row['round']} | {row['taken_in']} | {row['calibration_images']} | "
                     f"{row['threshold']:.4f} | {far} | {row['defect_recall']:.3f} | {row['image_auroc']} | "
                     f"{row['pixel_auroc']} | {row['memory_size']} | {row['coverage_radius']:.4f} | "
                     f"{row.get('update_seconds', '-')} | {row.get('recalibration_seconds', '-')} | "
                     f"{row.get('refit_seconds', row.get('fit_seconds'))} | "
                     f"{row.get('refit_memory_size', '-')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--out", default="benchmarks/results/feedback-loop.json")
    parser.add_argument("--products", nargs="*", default=list(PRODUCTS))
    args = parser.parse_args()
    os.environ.setdefault("ANOMALENS_WEIGHTS_DIR", str(Path(args.shared) / "weights"))
    rows = []
    for name in args.products:
        _, per_round, burn_in = PRODUCTS[name]
        rows.extend(run_product(name, Path(args.shared), per_round, burn_in))
    result = write_benchmark_json(args.out, {"alpha": ALPHA, "rows": rows})
    text = render(result)
    Path(args.out).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
