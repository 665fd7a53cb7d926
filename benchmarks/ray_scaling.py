"""Throughput of the local engine and the Ray engine (1 and 2 workers), measured in one run.

MVTec AD bottle's 83 test images, PatchCore on TAEF2 (real weights), fitted on 4 train/good references.
Each engine writes the full output (overlays, raw maps, scores) to a fresh folder. Ray's cluster start-up
is timed separately and excluded from throughput; each Ray run includes starting its actors and loading the
detector in them.

    python3 benchmarks/ray_scaling.py [--shared ../shared] [--out benchmarks/results/ray-scaling-bottle.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

import anomalens
from anomalens.engines.local import run_predict
from anomalens.engines.ray import list_inputs, score
from anomalens.engines.request import OutputSettings, PredictRequest
from anomalens.evaluation.profiling import write_benchmark_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--out", default="benchmarks/results/ray-scaling-bottle.json")
    args = parser.parse_args()
    bottle = Path(args.shared) / "datasets" / "mvtec" / "bottle"
    test = bottle / "test"
    references = sorted((bottle / "train" / "good").glob("*.png"))[:4]
    detector = anomalens.create("patchcore", backbone="taef2", weights_dir=Path(args.shared) / "weights")
    detector.fit(references, class_name="bottle")
    work = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    saved = detector.save(work / "detector")
    runs = {}
    began = time.perf_counter()
    request = PredictRequest.prepare([test], OutputSettings(out=str(work / "local")))
    summary = run_predict(detector, request.calibrated(detector))
    runs["local"] = {"seconds": time.perf_counter() - began, "images": summary.scored}
    began = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - began
    for workers in (1, 2):
        began = time.perf_counter()
        request = PredictRequest.prepare([test], OutputSettings(out=str(work / f"ray-{workers}")), batch_size=8,
                                         lister=list_inputs, resumable=True)  # fmt: skip
        summary = score(saved, request, num_workers=workers)
        runs[f"ray_{workers}_workers"] = {"seconds": time.perf_counter() - began, "images": summary.scored}
    ray.shutdown()
    for run in runs.values():
        run["images_per_second"] = run["images"] / run["seconds"]
    result = {
        "benchmark": "local vs Ray engine throughput, PatchCore-TAEF2, MVTec AD bottle test (83 images)",
        "runs": runs,
        "ray_cluster_start_seconds": ray_start,
        "scaling_ratio_2_vs_1_workers": runs["ray_2_workers"]["images_per_second"]
        / runs["ray_1_workers"]["images_per_second"],
        "ray_2_workers_vs_local": runs["ray_2_workers"]["images_per_second"] / runs["local"]["images_per_second"],
    }
    write_benchmark_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
