"""One table from several VLMDiff benchmark folders: per category and mean, side by side.

Usage (from the repository root):
    python3 benchmarks/vlmdiff_compare.py --out benchmarks/results/vlmdiff-.../comparison \
        --row "multi-class=benchmarks/results/.../multiclass-bottle" --row "multi-class=.../multiclass-metal_plate" \
        --row "per-category=.../bottle" --row "per-category=.../metal_plate"

Each ``--row LABEL=FOLDER`` names a folder written by ``anomalens benchmark`` (its ``results.json``); rows with
the same label are one model, whose categories are gathered and averaged (the mean of the per-category figures,
as the papers' tables). Writes ``comparison.json`` and ``comparison.md`` (with this command and the machine).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from anomalens.evaluation.profiling import machine_info
from anomalens.io.outputs import atomic_write_bytes

METRICS = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "pixel_aupro": "AUPRO", "seconds_per_image": "s/img"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", required=True, help="LABEL=FOLDER of an `anomalens benchmark`")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--title", default="VLMDiff", help="table title")
    args = parser.parse_args()
    models: dict[str, dict[str, dict]] = {}
    sources: dict[str, list[str]] = {}
    for row in args.row:
        label, _, folder = row.partition("=")
        if not folder:
            parser.error(f"--row {row!r} must be LABEL=FOLDER")
        results = json.loads((Path(folder) / "results.json").read_text())
        models.setdefault(label, {}).update(results["categories"])
        sources.setdefault(label, []).append(folder)
    categories = sorted({category for model in models.values() for category in model})
    table: dict[str, dict] = {}
    for label, model in models.items():
        rows = {name: {key: model[name][key] for key in METRICS} for name in categories if name in model}
        rows["mean"] = {key: sum(row[key] for row in rows.values()) / len(rows) for key in METRICS}
        table[label] = rows
    lines = [f"# {args.title}", "", "| model | category | " + " | ".join(METRICS.values()) + " |",
             "|---|---|" + "---|" * len(METRICS)]  # fmt: skip
    for label, rows in table.items():
        for category, row in rows.items():
            cells = [f"{row[key]:.3f}" if key == "seconds_per_image" else f"{100 * row[key]:.1f}" for key in METRICS]
            name = f"**{category}**" if category == "mean" else category
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    command = "python3 " + " ".join(shlex.quote(part) for part in sys.argv)
    lines += ["", f"Command: `{command}`", "", f"Machine: {machine_info()}", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "machine": machine_info(), "sources": sources, "models": table}
    atomic_write_bytes(out / "comparison.json", (json.dumps(record, indent=2) + "\n").encode())
    atomic_write_bytes(out / "comparison.md", "\n".join(lines).encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
