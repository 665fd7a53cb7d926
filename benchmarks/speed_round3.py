"""Speed round three (issue 34), before and after for every item, in one run on one machine.

Runs each item's benchmark in turn (each a process of its own, one after the other, nothing else running), then
writes ``benchmarks/results/speed-before-after-round3.{json,md}`` from their results:

1. memory search: ``memory_search.py`` (exact: the former search vs now, % of the fp32 peak) and
   ``approximate_search.py`` (inverted lists: recall, speed, metrics against exact on full-shot bottle), plus
   ``anomalens benchmark`` full shot on bottle with the approximate search (the exact run of this round:
   ``patchcore-taef2-bottle-fullshot-round3``);
2. bf16: ``bf16_levers.py`` (each lever on the dominant networks, % of the bf16 peak);
3. calibrated fit: ``calibrated_fit.py --refit`` (a coreset per fold vs one shared fit, 209 references; the
   false-alarm check);
4. training: ``training_data_parallel.py`` (1 process vs 2 under torchrun);
5. parity: ``parity_anomalib.py --repeats 5`` on WinCLIP+ and PatchCore, 8 images (alternating, median and range),
   when ``--anomalib-python`` is given;
6. the memory search's % of peak in ``anomalens benchmark-speed`` (``speed-cpu-2threads-round3``, PatchCore rows).

    python3 benchmarks/speed_round3.py --shared ../shared --anomalib-python /tmp/venv-anomalib/bin/python
    python3 benchmarks/speed_round3.py --summary-only   # rewrite the summary from the results already there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from anomalens.evaluation.profiling import write_benchmark_json
from anomalens.io.outputs import atomic_write_text

RESULTS = Path("benchmarks/results")


def _run(command: list[str], log: list[dict]) -> None:
    began = time.perf_counter()
    completed = subprocess.run(command)
    log.append({"command": " ".join(command), "seconds": round(time.perf_counter() - began, 1),
                "returncode": completed.returncode})  # fmt: skip


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--anomalib-python", help="a Python with anomalib 2.x (see parity_anomalib.py)")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--only", nargs="*", help="run only these items (1-6)")
    args = parser.parse_args()
    python, shared = sys.executable, args.shared
    log: list[dict] = []
    items = set(args.only or ["1", "2", "3", "4", "5", "6"])
    if not args.summary_only:
        if "1" in items:
            _run([python, "benchmarks/memory_search.py"], log)
            _run([python, "benchmarks/approximate_search.py", "--shared", shared], log)
            _run(["anomalens", "benchmark", "--overwrite", "--method", "patchcore", "--backbone", "taef2",
                  "--weights-dir", f"{shared}/weights/taef2", "--set", "search=approximate", "--dataset", "mvtec",
                  "--root", f"{shared}/datasets/mvtec", "--category", "bottle", "--shots", "all", "--seeds", "0",
                  "--out", str(RESULTS / "patchcore-taef2-bottle-fullshot-approximate")], log)  # fmt: skip
        if "2" in items or "6" in items:
            _run([python, "benchmarks/bf16_levers.py"], log)
            # PatchCore (memory search % of peak, item 6), WinCLIP fp32 and bf16, CLIPFusion bf16 (item 2)
            _run([python, "benchmarks/speed.py", "--settings", "0", "1", "9", "10", "--out",
                  str(RESULTS / "speed-cpu-2threads-round3.json")], log)  # fmt: skip
        if "3" in items:
            _run([python, "benchmarks/calibrated_fit.py", "--shared", shared, "--refit"], log)
        if "4" in items:
            _run([python, "benchmarks/training_data_parallel.py", "--shared", shared], log)
        if "5" in items and args.anomalib_python:
            _run([python, "benchmarks/parity_anomalib.py", "--anomalib-python", args.anomalib_python, "--root",
                  f"{shared}/datasets/mvtec", "--category", "bottle", "--images", "8", "--repeats", "5", "--cases",
                  "winclip-1shot,patchcore-1shot", "--out", str(RESULTS / "parity-anomalib-round3.json")],
                 log)  # fmt: skip
    summary = _summary()
    previous = _load("speed-before-after-round3.json")
    if args.summary_only and previous:  # keep the record of the runs the results came from
        log = previous.get("runs", [])
    result = write_benchmark_json(str(RESULTS / "speed-before-after-round3.json"), {**summary, "runs": log})
    atomic_write_text(RESULTS / "speed-before-after-round3.md", _markdown(result))


def _summary() -> dict:
    rows = []
    search = _load("memory-search-round3.json")
    if search:
        rows.append({"item": "1. exact memory search (4,096 x 85,607 x 128)", "before": search["rows"]["before"],
                     "after": search["rows"]["after"], "speedup": search["speedup"],
                     "source": "memory-search-round3.json"})  # fmt: skip
    approximate = _load("approximate-search-bottle.json")
    if approximate:
        settings = approximate["settings"]
        rows.append({"item": "1. approximate memory search (inverted lists), full-shot bottle",
                     "before": settings["exact"], "after": settings, "source": "approximate-search-bottle.json"})
    full = {}
    for name in ("patchcore-taef2-bottle-fullshot-round3", "patchcore-taef2-bottle-fullshot-approximate"):
        record = _load(f"{name}/results.json")
        if record:
            full[name] = record.get("mean")
    if full:
        rows.append({"item": "1. full-shot bottle benchmark, exact vs approximate", "before":
                     full.get("patchcore-taef2-bottle-fullshot-round3"), "after":
                     full.get("patchcore-taef2-bottle-fullshot-approximate"), "source": "the two results.json"})
    levers = _load("bf16-levers-round3.json")
    if levers:
        rows.append({"item": "2. bf16 dominant networks", "before": {name: network["levers"].get("eager")
                     for name, network in levers["networks"].items()}, "after": levers["networks"],
                     "peak": levers["matmul_peak_gflop_per_s"], "source": "bf16-levers-round3.json"})  # fmt: skip
    calibrated = _load("calibrated-fit-bottle-round3.json")
    if calibrated:
        timing = calibrated.get("timing", {})
        rows.append({"item": "3. default fit with a threshold, 209 bottle references", "before": timing.get("refit"),
                     "after": timing.get("shared"), "plain": timing.get("plain"),
                     "false_alarms": calibrated.get("false_alarms", {}).get("pooled"),
                     "source": "calibrated-fit-bottle-round3.json"})  # fmt: skip
    training = _load("training-data-parallel.json")
    if training:
        rows.append({"item": "4. VLMDiff training, 1 vs 2 processes", "before": training["runs"]["1"],
                     "after": training["runs"]["2"], "speedup": training["speedup"],
                     "largest_weight_difference": training["largest_weight_difference"],
                     "source": "training-data-parallel.json"})  # fmt: skip
    speed = _load("speed-cpu-2threads-round3.json")
    if speed:
        rows.append({"item": "2 and 6. benchmark-speed rows (dominant network and memory search, % of peak)",
                     "after": [{"method": record["method"] + (f" ({record['variant']})" if record["variant"] else ""),
                                "precision": record["precision"], "batch": batch,
                                "seconds_per_image": figures["seconds_per_image"],
                                "networks_percent_of_peak": figures["networks_percent_of_peak"]}
                               for record in speed["records"] for batch, figures in record["batches"].items()],
                     "source": "speed-cpu-2threads-round3.json"})  # fmt: skip
    parity = _load("parity-anomalib-round3.json")
    if parity:
        rows.append({"item": "5. parity with anomalib, alternating repeats", "after": {
            name: {key: case.get(key) for key in ("anomalens_seconds_per_image", "anomalib_seconds_per_image",
                                                  "anomalens_seconds_per_image_range",
                                                  "anomalib_seconds_per_image_range", "paired_ratio_median",
                                                  "paired_ratio_range", "repeats", "target_met")}
            for name, case in parity["cases"].items()}, "source": "parity-anomalib-round3.json"})  # fmt: skip
    for row in rows:  # where each figure came from: the command and machine its own result file records
        record = _load(row["source"].split(" ")[0]) if row["source"].endswith(".json") else None
        if record:
            row["made_by"] = record.get("command")
            machine = record.get("machine")
            row["when"] = machine.get("timestamp") if isinstance(machine, dict) else record.get("date")
    return {"benchmark": "speed round three, before and after", "items": rows}


def _markdown(result: dict) -> str:
    lines = [f"# {result['benchmark']}", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} threads, torch "
             f"{result['machine']['torch']}.", ""]  # fmt: skip
    lines += ["| item | before | after |", "|---|---|---|", *_glance(result["items"]), ""]
    for row in result["items"]:
        lines += [f"## {row['item']}", "", f"Source: `benchmarks/results/{row['source']}`.", "", "```json",
                  json.dumps({key: value for key, value in row.items() if key not in ("item", "source")}, indent=1,
                             default=str)[:6000], "```", ""]  # fmt: skip
    if result.get("runs"):
        lines += ["## Runs", "", "| command | seconds | exit |", "|---|---|---|"]
        lines += [f"| `{run['command']}` | {run['seconds']} | {run['returncode']} |" for run in result["runs"]]
    return "\n".join(lines) + "\n"


def _glance(items: list[dict]) -> list[str]:
    """One line per item: the figures that answer it."""
    lines = []
    for row in items:
        item, before, after = row["item"], row.get("before"), row.get("after")
        if item.startswith("1. exact"):
            lines.append(f"| {item} | {before['median_s']:.3f} s, {before['percent_of_peak']:.0f}% of the fp32 peak | "
                         f"{after['median_s']:.3f} s, {after['percent_of_peak']:.0f}% ({row['speedup']:.2f}x) |")
        elif item.startswith("1. approximate"):
            best = after.get("probes=8") or next(iter(after.values()))
            lines.append(f"| {item} | exact {before['memory_search_seconds_per_image']:.3f} s/img | probes 8: "
                         f"{best['memory_search_seconds_per_image']:.3f} s/img, recall {best['recall']:.4f}, largest "
                         f"metric difference {best['largest_metric_difference']:.4f} |")
        elif item.startswith("1. full-shot") and before and after:
            lines.append(f"| {item} | {before['seconds_per_image']:.3f} s/img, I-AUROC {before['image_auroc']:.4f} | "
                         f"{after['seconds_per_image']:.3f} s/img, I-AUROC {after['image_auroc']:.4f} |")
        elif item.startswith("2. bf16"):
            cells = [f"{name}: eager {network['levers']['eager']['percent_of_bf16_peak']:.0f}%, best "
                     f"{max(lever['percent_of_bf16_peak'] for lever in network['levers'].values()):.0f}%"
                     for name, network in after.items()]
            lines.append(f"| {item} | (the issue: 31-46% on an AMX Xeon) | {'; '.join(cells)} of the bf16 peak |")
        elif item.startswith("3.") and before and after:
            plain = row["plain"]["seconds"]
            lines.append(f"| {item} | a coreset per fold: {before['seconds']} s ({before['seconds'] / plain:.2f}x the "
                         f"plain fit) | one shared fit: {after['seconds']} s ({after['seconds'] / plain:.2f}x) |")
        elif item.startswith("4."):
            lines.append(f"| {item} | {before['seconds_per_step']} s/step | {after['seconds_per_step']} s/step "
                         f"({row['speedup']}x), weights within {row['largest_weight_difference']:.1e} |")
        elif item.startswith("5."):
            cells = [f"{name}: anomalib / anomalens {case['paired_ratio_median']:.2f} (range "
                     f"{case['paired_ratio_range'][0]:.2f}-{case['paired_ratio_range'][1]:.2f})"
                     for name, case in after.items()]
            repeats = next(iter(after.values()))["repeats"] if after else 0
            lines.append(f"| {item} | one pass each | {'; '.join(cells)} over {repeats} alternating repeats |")
    return lines


if __name__ == "__main__":
    main()
