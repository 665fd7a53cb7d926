"""Before/after table of two or more ``speed.py`` results: seconds per image, stages and peak memory per setting.

Usage (from the repository root):
    python3 benchmarks/speed_compare.py BEFORE.json [BEFORE2.json ...] --after AFTER.json [--out FILE]

Rows are matched on (method, shots, variant, precision, batch size); for each, the JSON gets both runs'
figures and the after/before ratio. Absolute seconds from different runs on a shared machine are noisy, so
the table also gives each run's ratio to WinCLIP zero-shot measured within that run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _rows(result: dict) -> dict[tuple, dict]:
    rows = {}
    for record in result["records"]:
        precision = record.get("precision", result.get("dtype", "float32"))
        for batch, figures in record.get("batches", {}).items():
            if "seconds_per_image" not in figures:
                continue
            key = (record["method"], record["shots"], record.get("variant", ""), precision, int(batch))
            rows[key] = {**figures, "peak_rss_mb": record["peak_rss_mb"]}
    return rows


def compare(befores: list[dict], after: dict) -> list[dict]:
    """One entry per setting measured in ``after`` and in any of ``befores`` (the latest before wins)."""
    previous: dict[tuple, dict] = {}
    for before in befores:
        previous.update(_rows(before))
    entries = []
    for key, now in _rows(after).items():
        if key not in previous:
            continue
        then = previous[key]
        method, shots, variant, precision, batch = key
        entries.append(
            {
                "method": method,
                "shots": shots,
                "variant": variant,
                "precision": precision,
                "batch": batch,
                "seconds_per_image": {"before": then["seconds_per_image"], "after": now["seconds_per_image"]},
                "speedup": round(then["seconds_per_image"] / now["seconds_per_image"], 2),
                "ratio_to_winclip_zero_shot": {
                    "before": then.get("ratio_to_winclip_zero_shot"),
                    "after": now.get("ratio_to_winclip_zero_shot"),
                },
                "peak_rss_mb": {"before": then["peak_rss_mb"], "after": now["peak_rss_mb"]},
                "stages_seconds_per_image": {
                    "before": then["stages_seconds_per_image"],
                    "after": now["stages_seconds_per_image"],
                },
            }
        )
    return entries


def markdown(entries: list[dict], sources: list[str], after: str, peaks: dict | None = None) -> str:
    lines = [
        "# Speed and memory before / after the optimisations",
        "",
        f"Before: {', '.join(sources)}. After: {after}.",
        "",
    ]
    if peaks:  # the shared machine's speed differs between runs: the ratios to WinCLIP are the fair comparison
        float32 = {path: peak.get("float32", 0) if isinstance(peak, dict) else peak for path, peak in peaks.items()}
        measured = "; ".join(f"{path} {peak:.0f}" for path, peak in float32.items())
        lines += [f"Each run's float32 matmul peak (GFLOP/s): {measured}.", ""]
    lines += [
        "| method | shots | batch | s/img before → after | speed-up | × WinCLIP 0-shot before → after "
        "| peak RSS MB before → after | stages before → after (s/img) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        label = entry["method"] + (f" ({entry['variant']})" if entry["variant"] else "")
        seconds, ratio, memory = entry["seconds_per_image"], entry["ratio_to_winclip_zero_shot"], entry["peak_rss_mb"]
        stages = entry["stages_seconds_per_image"]
        changed = [
            f"{name} {stages['before'].get(name, 0):.2f} → {stages['after'].get(name, 0):.2f}"
            for name in dict.fromkeys([*stages["before"], *stages["after"]])
            if name != "other"
        ]
        lines.append(
            f"| {label} | {entry['shots']} | {entry['batch']} | {seconds['before']:.2f} → {seconds['after']:.2f} "
            f"| {entry['speedup']:.2f}× | {ratio['before'] or 0:.2f} → {ratio['after'] or 0:.2f} "
            f"| {memory['before']:.0f} → {memory['after']:.0f} | {', '.join(changed)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", nargs="+", help="earlier speed.py JSON files (later ones win on overlap)")
    parser.add_argument("--after", required=True, help="the speed.py JSON after the change")
    parser.add_argument("--out", default="benchmarks/results/speed-before-after.json")
    args = parser.parse_args()

    from anomalens.evaluation.profiling import write_benchmark_json
    from anomalens.io.outputs import atomic_write_bytes

    befores = [json.loads(Path(path).read_text()) for path in args.before]
    after = json.loads(Path(args.after).read_text())
    entries = compare(befores, after)
    peaks = {path: result["matmul_peak_gflops"] for path, result in zip([*args.before, args.after], [*befores, after])}
    write_benchmark_json(args.out, {"before": args.before, "after": args.after, "matmul_peak_gflops": peaks,
                                    "settings": entries})  # fmt: skip
    atomic_write_bytes(Path(args.out).with_suffix(".md"), markdown(entries, args.before, args.after, peaks).encode())
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
