"""Side-by-side speed and memory of every registered method at full size, in one run.

Usage (from the repository root):
    python3 benchmarks/speed.py [--count 16] [--repeats 3] [--batch-sizes 1 8] [--threads 2] \
        [--methods ...] [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--out FILE]

- Every method is built at its real full size with random weights (no downloads) from ``SETTINGS``, and
  scores the same fixed stratified subset of ``--count`` MVTec AD bottle test images
  (``$ANOMALENS_SHARED``, default ``../shared``), with the same torch thread count.
- Each (method, shots) setting runs in a fresh subprocess, so its peak resident memory is its own. In it,
  for each batch size: one warm-up batch, then ``--repeats`` timed batches; seconds per image is the
  median of (batch seconds / batch size). Stage times (image encoder, VAE, UNet, text encoder, memory
  search, TTA, post-processing) come from the detector's own ``stage_seconds`` over the timed batches.
- FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one batch; achieved
  GFLOP/s = FLOPs per image / seconds per image, next to the machine's matmul peak measured in the same
  run (a large square matmul in the run's dtype), so their ratio says how close a method is to the limit.
- Output: ``benchmarks/results/speed-<machine>.json`` and a markdown table beside it; each method's
  seconds per image is also given as a ratio to WinCLIP zero-shot's at the same batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("ANOMALENS_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))

# Full-size architectures with random weights: the same FLOPs and memory as the real models.
SETTINGS: dict[str, dict] = {
    "patchcore": {"shots": [1], "options": {"backbone": "wide_resnet50_2", "pretrained": None}},
    "winclip": {"shots": [0, 1], "options": {"backbone": "ViT-B-16-plus-240", "pretrained": None}},
    "dual_image_clip": {"shots": [0], "options": {"backbone": "ViT-L-14-336", "pretrained": None}},
    "clipfusion": {
        "shots": [0, 1],
        "options": {"backbone": "ViT-L-14-336", "pretrained": None, "diffusion": None},
    },
    "vlmdiff": {
        "shots": [0],
        "options": {
            "architecture": {
                "unet": "sd-1-5",
                "autoencoder": "sd",
                "autoencoder_weights": None,
                "text_encoder": "sd",
                "text_encoder_weights": None,
                "image_size": 256,
            },
            "feature_weights": None,
        },
    },
}
STAGE_GROUPS = {  # detector stage names -> the table's columns
    "image encoder": ("clip", "image_encoder", "features"),
    "vae": ("vae",),
    "unet": ("unet",),
    "text encoder": ("text_encoder",),
    "memory search": ("memory_search",),
    "tta": ("tta",),
    "post-processing": ("post_processing",),
}
DOMINANT = {  # the network whose speed decides each method's cost
    "patchcore": "image encoder",
    "winclip": "image encoder",
    "dual_image_clip": "image encoder",
    "clipfusion": "vae",
    "vlmdiff": "unet",
}


def test_images(count: int) -> list[Path]:
    from anomalens.benchmark import subset_test
    from anomalens.datasets import open_dataset

    dataset = open_dataset("mvtec", SHARED / "datasets" / "mvtec")
    return [sample.image_path for sample in subset_test(dataset.test_samples("bottle"), count)]


def matmul_peak(device: str, dtype: str, side: int = 2048, repeats: int = 20) -> float:
    """GFLOP/s of a square ``side`` matmul in ``dtype``: the best of ``repeats`` (a peak, not a typical value)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    left = torch.randn(side, side, device=device, dtype=torch_dtype)
    right = torch.randn(side, side, device=device, dtype=torch_dtype)
    timings = []
    for index in range(repeats + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        left @ right
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if index >= 2:
            timings.append(time.perf_counter() - start)
    return 2 * side**3 / min(timings) / 1e9


def _grouped(stage_seconds: dict[str, float], images: int) -> dict[str, float]:
    grouped = {group: 0.0 for group in STAGE_GROUPS}
    for name, seconds in stage_seconds.items():
        key = name.lower().replace(" ", "_")
        group = next((g for g, names in STAGE_GROUPS.items() if key in names), "other")
        grouped[group] = grouped.get(group, 0.0) + seconds / images
    return {group: round(value, 4) for group, value in grouped.items() if value > 0}


def run_worker(args: argparse.Namespace) -> None:
    """One (method, shots) setting in this process; prints one JSON line."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import anomalens
    from anomalens.images import load_image

    torch.set_num_threads(args.threads)
    setting = SETTINGS[args.worker_method]
    started = time.perf_counter()
    detector = anomalens.create(args.worker_method, **setting["options"]).to(args.device)
    if args.dtype != "float32":
        detector = detector.to(getattr(torch, args.dtype))
    references = [load_image(SHARED / "datasets/mvtec/bottle/train/good/000.png")] if args.worker_shots else None
    detector.fit(references, class_name="bottle")
    build_seconds = time.perf_counter() - started
    images = [load_image(path) for path in test_images(args.count)]
    record: dict = {"method": args.worker_method, "shots": args.worker_shots, "build_and_fit_seconds": build_seconds}
    record["batches"] = {}
    for batch_size in args.batch_sizes:
        if detector.pooled and batch_size < 2 and not references:
            record["batches"][str(batch_size)] = {"skipped": "a pooled zero-shot method scores at least 2 images"}
            continue
        batches = [[images[(start + offset) % len(images)] for offset in range(batch_size)]
                   for start in range(0, batch_size * (args.repeats + 1), batch_size)]  # fmt: skip
        detector.predict_arrays(batches[0])  # warm-up (first-use costs: prompt encoding, allocations)
        detector.stage_seconds.clear()
        per_image = []
        for batch in batches[1:]:
            start = time.perf_counter()
            detector.predict_arrays(batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            per_image.append((time.perf_counter() - start) / batch_size)
        stages = _grouped(detector.stage_seconds, batch_size * args.repeats)
        with FlopCounterMode(display=False) as counter:
            detector.predict_arrays(batches[1])
        flops_per_image = counter.get_total_flops() / batch_size
        seconds = statistics.median(per_image)
        stages["other"] = round(max(statistics.mean(per_image) - sum(stages.values()), 0.0), 4)
        record["batches"][str(batch_size)] = {
            "seconds_per_image": round(seconds, 4),
            "images_per_second": round(1 / seconds, 3),
            "timed_seconds_per_image": [round(value, 4) for value in per_image],
            "gflops_per_image": round(flops_per_image / 1e9, 2),
            "achieved_gflops_per_second": round(flops_per_image / seconds / 1e9, 2),
            "stages_seconds_per_image": stages,
        }
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("SPEED_RECORD " + json.dumps(record), flush=True)


def markdown(result: dict) -> str:
    peak = result["matmul_peak_gflops"]
    lines = [
        f"# Speed and memory, {result['machine']['cpu']} ({result['threads']} threads, {result['dtype']})",
        "",
        f"Matmul peak measured in the same run: {peak:.1f} GFLOP/s. {result['count']} bottle test images, "
        f"{result['repeats']} timed batches after a warm-up; full-size architectures with random weights.",
        "",
        "| method | shots | batch | s/img | img/s | × WinCLIP 0-shot | GFLOP/img | GFLOP/s | % of peak | peak RSS MB "
        "| stages (s/img) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in result["records"]:
        if "error" in record:
            lines.append(f"| {record['method']} | {record['shots']} | – | error: {record['error'][:80]} |")
            continue
        for batch, figures in record["batches"].items():
            if "skipped" in figures:
                lines.append(f"| {record['method']} | {record['shots']} | {batch} | skipped: {figures['skipped']} |")
                continue
            stages = ", ".join(f"{name} {value:.3f}" for name, value in figures["stages_seconds_per_image"].items())
            ratio = figures.get("ratio_to_winclip_zero_shot")
            lines.append(
                f"| {record['method']} | {record['shots']} | {batch} | {figures['seconds_per_image']:.3f} "
                f"| {figures['images_per_second']:.2f} | {'–' if ratio is None else f'{ratio:.2f}'} "
                f"| {figures['gflops_per_image']:.1f} | {figures['achieved_gflops_per_second']:.1f} "
                f"| {100 * figures['achieved_gflops_per_second'] / peak:.0f} | {record['peak_rss_mb']:.0f} | {stages} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), help=f"subset of {list(SETTINGS)}")
    parser.add_argument("--count", type=int, default=16, help="test images (fixed stratified subset)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the same for every method)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per setting")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/speed-<machine>.json)")
    parser.add_argument("--worker-method", help=argparse.SUPPRESS)
    parser.add_argument("--worker-shots", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_method:
        run_worker(args)
        return
    unknown = sorted(set(args.methods) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(SETTINGS)}")

    import torch

    from anomalens.profiling import machine_info, write_benchmark_json

    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.device, args.dtype)
    records = []
    for method in args.methods:
        for shots in SETTINGS[method]["shots"]:
            command = [sys.executable, __file__, "--worker-method", method, "--worker-shots", str(shots),
                       "--count", str(args.count), "--repeats", str(args.repeats), "--threads", str(args.threads),
                       "--device", args.device, "--dtype", args.dtype, "--batch-sizes",
                       *map(str, args.batch_sizes)]  # fmt: skip
            print(f"[speed] {method} {shots}-shot ...", flush=True)
            try:
                completed = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                line = next((row for row in completed.stdout.splitlines() if row.startswith("SPEED_RECORD ")), None)
                if line is None:
                    raise RuntimeError(completed.stderr.strip().splitlines()[-1] if completed.stderr else "no output")
                record = json.loads(line.removeprefix("SPEED_RECORD "))
            except subprocess.TimeoutExpired:
                record = {"method": method, "shots": shots, "error": f"timed out after {args.timeout} s"}
            except RuntimeError as error:
                record = {"method": method, "shots": shots, "error": str(error)}
            print(f"[speed] {json.dumps(record)}", flush=True)
            records.append(record)
    reference = next((r for r in records if r["method"] == "winclip" and r["shots"] == 0 and "batches" in r), None)
    for record in records:
        for batch, figures in record.get("batches", {}).items():
            base = (reference or {}).get("batches", {}).get(batch, {}).get("seconds_per_image")
            if base and "seconds_per_image" in figures:
                figures["ratio_to_winclip_zero_shot"] = round(figures["seconds_per_image"] / base, 3)
            if "stages_seconds_per_image" in figures:
                dominant = DOMINANT.get(record["method"])
                figures["dominant_network"] = dominant
    machine = machine_info()
    name = re.sub(r"[^a-z0-9]+", "-", (machine["accelerator"] or "cpu").lower()).strip("-")
    out = Path(args.out or Path(__file__).parent / "results" / f"speed-{name}-{args.threads}threads.json")
    result = {"matmul_peak_gflops": round(peak, 2), "count": args.count, "repeats": args.repeats,
              "threads": args.threads, "device": args.device, "dtype": args.dtype, "records": records}  # fmt: skip
    result = write_benchmark_json(str(out), result)
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
