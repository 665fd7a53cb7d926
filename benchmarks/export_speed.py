"""Exported detectors against torch, side by side in one run: seconds per image, peak RSS, and (with a dataset) the
benchmark metrics of both, which must be equal.

Each backend runs in its own process (its peak RSS is its own): ``torch`` loads the saved detector;
``onnx`` and ``openvino`` load the export through :mod:`anomalens.runtime` in a process where ``import torch``
fails. All use the same images and ``--threads`` threads.

    python3 benchmarks/export_speed.py --saved runs/patchcore-taef2-bottle-1shot --name patchcore-taef2-bottle-1shot \
        --root ../shared/datasets/mvtec --category bottle --out benchmarks/results/export-patchcore-taef2-bottle.json
    python3 benchmarks/export_speed.py --winclip-full-size --name winclip-vitb16plus-random --root ... --max-images 8
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
args = json.loads(sys.argv[1])
if args["backend"] != "torch":
    sys.modules["torch"] = None  # the runtime needs no torch: prove it
from anomalens.evaluation.profiling import PeakMemory
with PeakMemory() as memory:
    began = time.perf_counter()
    if args["backend"] == "torch":
        import torch
        torch.set_num_threads(args["threads"])
        import anomalens
        detector = anomalens.load(args["model"])
    else:
        from anomalens.runtime import ExportedDetector
        detector = ExportedDetector.load(args["model"], backend=args["backend"], threads=args["threads"])
    load_seconds = time.perf_counter() - began
    from anomalens.io.images import load_image
    arrays = [load_image(path) for path in args["images"]]
    detector.predict_arrays(arrays[:1])  # warm-up
    began = time.perf_counter()
    results = []
    for start in range(0, len(arrays), args["batch"]):
        results.extend(detector.predict_arrays(arrays[start : start + args["batch"]]))
    seconds = time.perf_counter() - began
metrics = None
if args["masks"] is not None:
    import numpy as np
    from anomalens.evaluation.metrics import compute_all
    from anomalens.io.images import load_mask
    from anomalens.io.outputs import atomic_write_json
    def resize(array, size=256):  # the benchmark's eval size, bilinear, in numpy (no torch here)
        from anomalens.runtime import restore_map
        return restore_map(array, (size, size), "resize")
    maps = [resize(result.anomaly_map) for result in results]
    masks = []
    for mask_path, array in zip(args["masks"], arrays):
        mask = np.zeros(array.shape[:2], bool) if mask_path is None else load_mask(mask_path, array.shape[:2])
        masks.append(resize(mask.astype(np.float32)) > 0.5)
    metrics = compute_all([r.score for r in results], args["labels"], maps, masks)
print(json.dumps({"backend": args["backend"], "seconds_per_image": seconds / len(arrays), "load_seconds": load_seconds,
                  "peak_rss_mb": memory.peak_mb, "scores": [r.score for r in results], "metrics": metrics,
                  "torch_imported": "torch" in sys.modules and sys.modules["torch"] is not None}))
"""


def run_backend(backend: str, model: str, images: list[str], threads: int, batch: int, labels, masks) -> dict:
    payload = {"backend": backend, "model": model, "images": images, "threads": threads, "batch": batch,
               "labels": labels, "masks": masks}  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    completed = subprocess.run([sys.executable, "-c", WORKER, json.dumps(payload)], capture_output=True, text=True,
                               check=False, env=environment)  # fmt: skip
    if completed.returncode != 0:
        raise RuntimeError(f"{backend} worker failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saved", help="a saved (fitted) torch detector folder")
    parser.add_argument("--winclip-full-size", action="store_true",
                        help="build full-size random WinCLIP (ViT-B-16-plus-240, zero-shot) instead of --saved")
    parser.add_argument("--name", required=True)
    parser.add_argument("--root", required=True, help="MVTec-layout dataset root")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--max-images", type=int, default=None, help="a fixed stratified subset of the test split")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="images per call (and the export's batch size)")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx", "openvino"])
    parser.add_argument("--exports", default="runs/exports")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import anomalens
    from anomalens.evaluation.benchmark import subset_test
    from anomalens.evaluation.profiling import machine_info
    from anomalens.io.datasets import open_dataset
    from anomalens.io.outputs import atomic_write_json, atomic_write_text

    saved = args.saved
    if args.winclip_full_size:
        saved = str(Path(args.exports) / f"{args.name}-torch")
        anomalens.create("winclip", backbone="ViT-B-16-plus-240", pretrained=None).fit(None, class_name="bottle").save(
            saved)  # fmt: skip
    detector = anomalens.load(saved)
    exports = {}
    for backend in args.backends:
        if backend == "torch":
            continue
        if backend == "openvino":
            try:
                import openvino  # noqa: F401
            except ImportError:
                print("openvino is not installed: its rows are skipped (pip install 'anomalens[openvino]')")
                continue
        began = time.perf_counter()
        folder = detector.export(Path(args.exports) / f"{args.name}-{backend}", format=backend, batch_size=args.batch,
                                 overwrite=True)  # fmt: skip
        metadata = json.loads((folder / "metadata.json").read_text())
        exports[backend] = {"folder": str(folder), "export_seconds": round(time.perf_counter() - began, 1),
                            "model_mb": round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1),
                            "verified_max_abs_difference": metadata["verified_max_abs_difference"]}  # fmt: skip
    samples = subset_test(open_dataset("mvtec", args.root).test_samples(args.category), args.max_images)
    images = [str(sample.image_path) for sample in samples]
    labels = [sample.label for sample in samples]
    masks = [None if sample.mask_path is None else str(sample.mask_path) for sample in samples]
    rows = {}
    for backend in args.backends:
        if backend != "torch" and backend not in exports:
            continue
        model = saved if backend == "torch" else exports[backend]["folder"]
        rows[backend] = run_backend(backend, model, images, args.threads, args.batch, labels, masks)
        print(f"{backend}: {rows[backend]['seconds_per_image']:.3f} s/img, {rows[backend]['peak_rss_mb']:.0f} MB")
    torch_scores = rows["torch"]["scores"]
    for row in rows.values():
        row["max_abs_score_difference"] = max(abs(a - b) for a, b in zip(row["scores"], torch_scores))
        row["same_ranking"] = sorted(range(len(torch_scores)), key=torch_scores.__getitem__) == sorted(
            range(len(torch_scores)), key=row["scores"].__getitem__)  # fmt: skip
        row["speed_vs_torch"] = rows["torch"]["seconds_per_image"] / row["seconds_per_image"]
    result = {"name": args.name, "method": detector.method_name, "config_hash": detector.config_hash,
              "n_images": len(images), "threads": args.threads, "batch": args.batch, "exports": exports,
              "backends": {name: {k: v for k, v in row.items() if k != "scores"} for name, row in rows.items()},
              "scores": {name: row["scores"] for name, row in rows.items()},
              "command": "python3 " + " ".join(shlex.quote(part) for part in sys.argv),
              "machine": machine_info()}  # fmt: skip
    out = Path(args.out)
    atomic_write_json(out, result)
    lines = [f"# {args.name}: torch vs exported, {len(images)} {args.category} test images, {args.threads} thread(s), "
             f"batch {args.batch}", "",
             "| backend | s/img | vs torch | peak RSS MB | max abs score diff | same ranking | I-AUROC | P-AUROC "
             "| AUPRO |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in rows.items():
        metrics = row["metrics"] or {}
        cells = [f"{100 * metrics[key]:.2f}" if metrics.get(key) is not None else "n/a"
                 for key in ("image_auroc", "pixel_auroc", "pixel_aupro")]  # fmt: skip
        lines.append(f"| {name} | {row['seconds_per_image']:.3f} | {row['speed_vs_torch']:.2f}x | "
                     f"{row['peak_rss_mb']:.0f} | {row['max_abs_score_difference']:.1e} | {row['same_ranking']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", f"Command: `{result['command']}`"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
