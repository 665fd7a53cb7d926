"""Collect the real-data runs of ``benchmarks/real_data_tables.sh`` into paper-style tables (``summary.md``/``.json``):
one table per method and setting (categories and their mean), the ensemble against its members, and the conformal
threshold's measured false-alarm rates.

    python3 benchmarks/real_data_summary.py --results benchmarks/results/real-data
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from anomalens.io.outputs import atomic_write_json, atomic_write_text

CATEGORIES = ("bottle", "metal_plate")
SETTINGS = (  # (method, setting, folder pattern with {category})
    ("PatchCore-TAEF2", "1-shot", "patchcore-{category}-1shot"),
    ("PatchCore-TAEF2", "1-shot, tiled", "patchcore-tiled-{category}-1shot"),
    ("PatchCore-TAEF2", "4-shot", "patchcore-{category}-4shot"),
    ("PatchCore-TAEF2", "4-shot, tiled", "patchcore-tiled-{category}-4shot"),
    ("PatchCore-TAEF2", "full shot (split: part held out for the threshold)", "patchcore-{category}-fullshot-split"),
    ("PatchCore-TAEF2", "full shot (all references)", "patchcore-{category}-fullshot"),
    ("VLMDiff multi-class", "zero-shot (one model for both)", "vlmdiff-multiclass-{category}"),
    ("Ensemble PatchCore-TAEF2 + VLMDiff", "4-shot", "ensemble-{category}-4shot"),
)
METRICS = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("pixel_aupro", "AUPRO"))


def pct(record: dict, name: str) -> str:
    value = record.get(name)
    if value is None or not np.isfinite(value):
        return "n/a"
    std = record.get(f"{name}_std")
    return f"{100 * value:.1f}" + (f"±{100 * std:.1f}" if std else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default="benchmarks/results/real-data")
    args = parser.parse_args()
    root = Path(args.results)
    runs: dict[tuple[str, str], dict[str, dict]] = {}
    lines = ["# Real data: every shared MVTec-layout category (MVTec AD bottle, MPDD metal_plate)", ""]
    for method, setting, pattern in SETTINGS:
        found = {}
        for category in CATEGORIES:
            path = root / pattern.format(category=category) / "results.json"
            if path.exists():
                found[category] = json.loads(path.read_text())
        if not found:
            continue
        runs[(method, setting)] = found
        first = next(iter(found.values()))
        lines += [f"## {method}, {setting}", "", f"Seeds {first['seeds']}; command of each run in its results.json.",
                  "", "| Category | " + " | ".join(label for _, label in METRICS) + " | s/img | peak MB |",
                  "|---" * (len(METRICS) + 3) + "|"]  # fmt: skip
        for category, result in found.items():
            record = result["categories"][category]
            lines.append(f"| {category} | " + " | ".join(pct(record, name) for name, _ in METRICS)
                         + f" | {record['seconds_per_image']:.2f} | {record['peak_memory_mb']:.0f} |")  # fmt: skip
        means = {name: float(np.mean([r["categories"][c][name] for c, r in found.items()])) for name, _ in METRICS}
        runs[(method, setting)]["__mean__"] = means  # type: ignore[assignment]
        lines.append("| **mean** | " + " | ".join(pct(means, name) for name, _ in METRICS) + " | | |")
        lines.append("")
    # the ensemble against its members
    members = [("PatchCore-TAEF2", "4-shot"), ("VLMDiff multi-class", "zero-shot (one model for both)")]
    ensemble = ("Ensemble PatchCore-TAEF2 + VLMDiff", "4-shot")
    comparison = {}
    if ensemble in runs and all(member in runs for member in members):
        lines += ["## Ensemble against its members (mean over the categories)", "",
                  "| model | I-AUROC | P-AUROC | AUPRO |", "|---|---|---|---|"]  # fmt: skip
        for key in (*members, ensemble):
            means = runs[key]["__mean__"]
            lines.append(f"| {key[0]}, {key[1]} | " + " | ".join(pct(means, name) for name, _ in METRICS) + " |")
        for name, _ in METRICS[:2]:
            best = max(runs[member]["__mean__"][name] for member in members)
            value = runs[ensemble]["__mean__"][name]
            comparison[name] = {"ensemble": value, "best_member": best, "at_least_best": value >= best - 1e-9}
        verdict = ", ".join(f"{label} {100 * comparison[name]['ensemble']:.1f} vs best member "
                            f"{100 * comparison[name]['best_member']:.1f}"
                            f" ({'at least' if comparison[name]['at_least_best'] else 'below'})"
                            for name, label in METRICS[:2])  # fmt: skip
        lines += ["", f"Ensemble: {verdict}.", ""]
    # false alarms
    alarm_rows = []
    for category in CATEGORIES:
        path = root / f"false-alarm-{category}.json"
        if path.exists():
            data = json.loads(path.read_text())
            for row in data["summary"]:
                alarm_rows.append((category, data["fit"], data["calibration"], len(data["seeds"]), row))
    if alarm_rows:
        lines += ["## Conformal threshold: measured false-alarm rate on unseen normal images", "",
                  "| Category | fitted on | held out | seeds | alpha | flagged / normal | measured | 95% interval "
                  "| guarantee (mean) | consistent |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for category, fit, held, seeds, row in alarm_rows:
            low, high = row["ci95"]
            lines.append(f"| {category} | {fit} | {held} | {seeds} | {row['alpha']} | {row['flagged']} / "
                         f"{row['normal']} | {row['measured']:.3f} | [{low:.3f}, {high:.3f}] | "
                         f"({max(row['guarantee'][0], 0):.3f}, {row['guarantee'][1]:.3f}] | {row['consistent']} |")
        lines.append("")
    command = "python3 " + " ".join(shlex.quote(part) for part in sys.argv)
    lines.append(f"Command: `{command}`")
    atomic_write_text(root / "summary.md", "\n".join(lines) + "\n")
    atomic_write_json(root / "summary.json", {
        "means": {f"{method} | {setting}": found["__mean__"] for (method, setting), found in runs.items()},
        "ensemble_vs_best_member": comparison, "command": command,
    })  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
