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

# Full-size architectures with random weights: the same FLOPs and memory as the real models. Each setting is one
# row group of the table (batch sizes 1 and 8); "variant" rows show an option's effect in the same run.
_CLIPFUSION = {"backbone": "ViT-L-14-336", "pretrained": None, "diffusion": None}
_VLMDIFF = {
    "architecture": {
        "unet": "sd-1-5",
        "autoencoder": "sd",
        "autoencoder_weights": None,
        "text_encoder": "sd",
        "text_encoder_weights": None,
        "image_size": 256,
    },
    "feature_weights": None,
}
SETTINGS: list[dict] = [
    {"method": "patchcore", "shots": 1, "options": {"backbone": "wide_resnet50_2", "pretrained": None}},
    {"method": "winclip", "shots": 0, "options": {"backbone": "ViT-B-16-plus-240", "pretrained": None}},
    {"method": "winclip", "shots": 1, "options": {"backbone": "ViT-B-16-plus-240", "pretrained": None}},
    {"method": "dual_image_clip", "shots": 0, "options": {"backbone": "ViT-L-14-336", "pretrained": None}},
    {"method": "clipfusion", "shots": 0, "options": _CLIPFUSION},
    {"method": "clipfusion", "shots": 1, "options": _CLIPFUSION},
    {"method": "vlmdiff", "shots": 0, "options": _VLMDIFF},
    # the faster CLIPFusion: SD at 256 px, the same UNet layers (their feature sides halve to 8 and 16)
    {"method": "clipfusion", "shots": 0, "variant": "SD 256 px",
     "options": {**_CLIPFUSION, "diffusion_image_size": 256, "attention_resolutions": (8, 16)}},
    # bfloat16 autocast (precision option) where the CPU has native bf16 (AVX512-BF16 / AMX)
    {"method": "winclip", "shots": 0, "variant": "bf16",
     "options": {"backbone": "ViT-B-16-plus-240", "pretrained": None, "precision": "bfloat16"}},
    {"method": "clipfusion", "shots": 0, "variant": "bf16", "options": {**_CLIPFUSION, "precision": "bfloat16"}},
    {"method": "clipfusion", "shots": 0, "variant": "SD 256 px, bf16",
     "options": {**_CLIPFUSION, "diffusion_image_size": 256, "attention_resolutions": (8, 16),
                 "precision": "bfloat16"}},
]  # fmt: skip
METHODS = list(dict.fromkeys(setting["method"] for setting in SETTINGS))
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


def _group_of(stage: str) -> str:
    key = stage.lower().replace(" ", "_")
    return next((group for group, names in STAGE_GROUPS.items() if key in names), "other")


def _grouped(per_stage: dict[str, float], images: int) -> dict[str, float]:
    grouped: dict[str, float] = {}
    for name, value in per_stage.items():
        group = _group_of(name)
        grouped[group] = grouped.get(group, 0.0) + value / images
    return grouped


def count_flops(detector, batch: list) -> tuple:
    """Score ``batch`` under ``FlopCounterMode``; returns the counter and the FLOPs inside each timed stage."""
    from contextlib import contextmanager

    from torch.utils.flop_counter import FlopCounterMode

    stage_flops: dict[str, float] = {}
    timed = detector.timed

    @contextmanager
    def counted(stage: str):
        before = counter.get_total_flops()
        with timed(stage):
            yield
        stage_flops[stage] = stage_flops.get(stage, 0.0) + counter.get_total_flops() - before

    with FlopCounterMode(display=False) as counter:
        detector.timed = counted
        try:
            detector.predict_arrays(batch)
        finally:
            del detector.timed  # back to the class's method
    return counter, stage_flops


def run_worker(args: argparse.Namespace) -> None:
    """One setting (``SETTINGS[args.worker_index]``) in this process; prints one JSON line."""
    import resource

    import torch

    import anomalens
    from anomalens.images import load_image

    torch.set_num_threads(args.threads)
    setting = SETTINGS[args.worker_index]
    method, shots = setting["method"], setting["shots"]
    options = {"precision": args.dtype, **setting["options"]}
    started = time.perf_counter()
    detector = anomalens.create(method, **options).to(args.device)
    references = [load_image(SHARED / "datasets/mvtec/bottle/train/good/000.png")] if shots else None
    detector.fit(references, class_name="bottle")
    build_seconds = time.perf_counter() - started
    images = [load_image(path) for path in test_images(args.count)]
    record: dict = {"method": method, "shots": shots, "variant": setting.get("variant", ""),
                    "precision": options["precision"], "build_and_fit_seconds": round(build_seconds, 2),
                    "batches": {}}  # fmt: skip
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
        # One more batch under the FLOP counter, which also attributes FLOPs to the detector's stages.
        counter, stage_flops = count_flops(detector, batches[1])
        flops_per_image = counter.get_total_flops() / batch_size
        group_flops = _grouped(stage_flops, batch_size)
        seconds = statistics.median(per_image)
        stages["other"] = max(statistics.mean(per_image) - sum(stages.values()), 0.0)
        dominant = DOMINANT[method]
        dominant_seconds = stages.get(dominant, 0.0)
        record["batches"][str(batch_size)] = {
            "seconds_per_image": round(seconds, 4),
            "images_per_second": round(1 / seconds, 3),
            "timed_seconds_per_image": [round(value, 4) for value in per_image],
            "gflops_per_image": round(flops_per_image / 1e9, 2),
            "achieved_gflops_per_second": round(flops_per_image / seconds / 1e9, 2),
            "stages_seconds_per_image": {group: round(value, 4) for group, value in stages.items() if value > 0},
            "stages_gflops_per_image": {group: round(value / 1e9, 2) for group, value in group_flops.items()},
            "dominant_network": dominant,
            "dominant_gflops_per_second": round(group_flops.get(dominant, 0.0) / dominant_seconds / 1e9, 2)
            if dominant_seconds
            else None,
        }
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("SPEED_RECORD " + json.dumps(record), flush=True)


def _label(record: dict) -> str:
    variant = record.get("variant")
    return f"{record['method']} ({variant})" if variant else record["method"]


def markdown(result: dict) -> str:
    peaks = result["matmul_peak_gflops"]
    lines = [
        f"# Speed and memory, {result['machine']['cpu']} ({result['threads']} threads, {result['device']})",
        "",
        "Matmul peak measured in the same run: "
        + ", ".join(f"{dtype} {value:.1f} GFLOP/s" for dtype, value in peaks.items())
        + f". {result['count']} bottle test images, {result['repeats']} timed batches after a warm-up; full-size "
        "architectures with random weights. % of peak: the whole method's GFLOP/s, and its dominant network's "
        "(FLOPs counted inside that stage / its time), against the matmul peak of the row's precision.",
        "",
        "| method | shots | precision | batch | s/img | img/s | × WinCLIP 0-shot | GFLOP/img | % of peak "
        "| dominant network, % of peak | peak RSS MB | stages (s/img) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in result["records"]:
        head = f"| {_label(record)} | {record['shots']} | {record.get('precision', '')}"
        if "error" in record:
            lines.append(f"{head} | – | error: {record['error'][:120]} |")
            continue
        peak = peaks.get(record.get("precision", "float32"), next(iter(peaks.values())))
        for batch, figures in record["batches"].items():
            if "skipped" in figures:
                lines.append(f"{head} | {batch} | skipped: {figures['skipped']} |")
                continue
            stages = ", ".join(f"{name} {value:.3f}" for name, value in figures["stages_seconds_per_image"].items())
            ratio = figures.get("ratio_to_winclip_zero_shot")
            dominant = figures.get("dominant_gflops_per_second")
            dominant_text = f"{figures['dominant_network']} {100 * dominant / peak:.0f}" if dominant else "–"
            lines.append(
                f"{head} | {batch} | {figures['seconds_per_image']:.3f} | {figures['images_per_second']:.2f} "
                f"| {'–' if ratio is None else f'{ratio:.2f}'} | {figures['gflops_per_image']:.1f} "
                f"| {100 * figures['achieved_gflops_per_second'] / peak:.0f} | {dominant_text} "
                f"| {record['peak_rss_mb']:.0f} | {stages} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, help=f"subset of {METHODS}")
    parser.add_argument("--no-variants", action="store_true", help="skip the variant rows (SD 256 px, bf16)")
    listing = "; ".join(f"{index}: {_label(s)} {s['shots']}-shot" for index, s in enumerate(SETTINGS))
    parser.add_argument("--settings", type=int, nargs="+", help=f"only these rows of SETTINGS ({listing})")
    parser.add_argument("--count", type=int, default=16, help="test images (fixed stratified subset)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the same for every method)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="precision of the settings that do not set their own (autocast)")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per setting")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/speed-<machine>.json)")
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_index is not None:
        run_worker(args)
        return
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")

    import torch

    torch.set_num_threads(args.threads)
    chosen = [index for index, setting in enumerate(SETTINGS)
              if setting["method"] in args.methods and not (args.no_variants and setting.get("variant"))
              and (args.settings is None or index in args.settings)]  # fmt: skip
    precisions = {SETTINGS[index]["options"].get("precision", args.dtype) for index in chosen}
    peaks = {dtype: round(matmul_peak(args.device, dtype), 2) for dtype in sorted(precisions)}
    records = []
    for index in chosen:
        setting = SETTINGS[index]
        command = [sys.executable, __file__, "--worker-index", str(index), "--count", str(args.count),
                   "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device,
                   "--dtype", args.dtype, "--batch-sizes", *map(str, args.batch_sizes)]  # fmt: skip
        print(f"[speed] {_label(setting)} {setting['shots']}-shot ...", flush=True)
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            line = next((row for row in completed.stdout.splitlines() if row.startswith("SPEED_RECORD ")), None)
            if line is None:
                raise RuntimeError(completed.stderr.strip().splitlines()[-1] if completed.stderr else "no output")
            record = json.loads(line.removeprefix("SPEED_RECORD "))
        except subprocess.TimeoutExpired:
            record = {"error": f"timed out after {args.timeout} s"}
        except RuntimeError as error:
            record = {"error": str(error)}
        record = {"method": setting["method"], "shots": setting["shots"], "variant": setting.get("variant", ""),
                  "precision": setting["options"].get("precision", args.dtype), **record}  # fmt: skip
        print(f"[speed] {json.dumps(record)}", flush=True)
        records.append(record)
        write_results(args, peaks, records)  # after every setting: an interrupted run keeps what it measured


def write_results(args: argparse.Namespace, peaks: dict[str, float], records: list[dict]) -> None:
    """Ratios to WinCLIP zero-shot and % of peak, then the JSON (atomically) and the markdown table."""
    from anomalens.outputs import atomic_write_bytes
    from anomalens.profiling import machine_info, write_benchmark_json

    reference = next((r for r in records if r["method"] == "winclip" and r["shots"] == 0 and not r["variant"]
                      and "batches" in r), None)  # fmt: skip
    for record in records:
        for batch, figures in record.get("batches", {}).items():
            base = (reference or {}).get("batches", {}).get(batch, {}).get("seconds_per_image")
            if base and "seconds_per_image" in figures:
                figures["ratio_to_winclip_zero_shot"] = round(figures["seconds_per_image"] / base, 3)
            if figures.get("dominant_gflops_per_second"):
                peak = peaks[record["precision"]]
                figures["dominant_percent_of_peak"] = round(100 * figures["dominant_gflops_per_second"] / peak, 1)
    machine = machine_info()
    name = re.sub(r"[^a-z0-9]+", "-", (machine["accelerator"] or "cpu").lower()).strip("-")
    out = Path(args.out or Path(__file__).parent / "results" / f"speed-{name}-{args.threads}threads.json")
    result = {"matmul_peak_gflops": peaks, "count": args.count, "repeats": args.repeats, "threads": args.threads,
              "device": args.device, "dtype": args.dtype, "records": records}  # fmt: skip
    result = write_benchmark_json(str(out), result)
    atomic_write_bytes(out.with_suffix(".md"), markdown(result).encode())
    print(f"wrote {out} and {out.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    main()
