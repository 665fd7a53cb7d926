"""Approximate memory search (issue 34, item 1): inverted lists against the exact search on full-shot PatchCore.

PatchCore-TAEF2 (real weights) fitted once on all 209 MVTec AD bottle train/good images (85,607 memory entries);
each of the 83 test images is then scored with the exact search and with each approximate setting, alternately
(image by image, so that the machine's load falls on all alike). Recorded per setting: the recall (share of patches
whose neighbour is the exact search's), the largest relative patch-distance error, the memory search's seconds
per image (median), and the seven metrics against the exact search's (within 0.001 is the target).

    python3 benchmarks/approximate_search.py --shared ../shared
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import anomalens
from anomalens.evaluation.metrics import compute_all
from anomalens.evaluation.profiling import write_benchmark_json
from anomalens.io.datasets import open_dataset
from anomalens.io.outputs import atomic_write_text
from anomalens.nn.memory import InvertedLists


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--probes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--max-images", type=int, default=None, help="first N train and test images (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/approximate-search-bottle.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shared = Path(args.shared)
    data = open_dataset("mvtec", shared / "datasets" / "mvtec")
    train = [sample.image_path for sample in data.train_samples("bottle")][: args.max_images]
    test = data.test_samples("bottle")[: args.max_images]
    detector = anomalens.create("patchcore", backbone="taef2", weights_dir=shared / "weights" / "taef2")
    started = time.perf_counter()
    detector.fit(train, class_name="bottle", threshold=None)
    fit_seconds = time.perf_counter() - started
    memory = detector.memory
    settings = {"exact": None, **{f"probes={probes}": InvertedLists(probes=probes) for probes in args.probes}}
    build_started = time.perf_counter()
    for setting in settings.values():
        if setting is not None:
            memory.search(memory.bank[:1], approximate=setting)  # builds the index once (the same for all probes)
    build_seconds = time.perf_counter() - build_started
    seconds = {name: [] for name in settings}
    scores = {name: [] for name in settings}
    maps = {name: [] for name in settings}
    agree = {name: [0, 0] for name in settings}
    worst_error = dict.fromkeys(settings, 0.0)
    labels, masks = [], []
    for sample in test:
        image = anomalens.load_image(sample.image_path)
        labels.append(sample.label)
        masks.append(sample.mask(image.shape[:2]))
        with torch.inference_mode():
            features = detector._embed_arrays([image])
        queries = features.reshape(-1, features.shape[-1])
        exact_neighbours = exact_distances = None
        for name, setting in settings.items():
            detector.config.search = "exact" if setting is None else "approximate"
            if setting is not None:
                detector.config.search_probes = setting.probes
            began = time.perf_counter()
            with torch.inference_mode():
                distances, neighbours = memory.search(queries, approximate=setting)
            seconds[name].append(time.perf_counter() - began)
            if setting is None:
                exact_neighbours, exact_distances = neighbours, distances
            agree[name][0] += int((neighbours == exact_neighbours).sum())
            agree[name][1] += neighbours.numel()
            error = float(((distances - exact_distances) / exact_distances.clamp_min(1e-12)).max())
            worst_error[name] = max(worst_error[name], error)
            with torch.inference_mode():
                score, anomaly_map = detector._score_features(features)
            scores[name].append(float(score[0]))
            maps[name].append(detector._map_to_image(anomaly_map[0].float(), image.shape[:2]).cpu().numpy())
    metrics = {name: compute_all(scores[name], labels, maps[name], masks) for name in settings}
    rows = {}
    for name in settings:
        rows[name] = {
            "recall": agree[name][0] / agree[name][1],
            "largest_relative_distance_error": worst_error[name],
            "memory_search_seconds_per_image": statistics.median(seconds[name]),
            "speedup": statistics.median(seconds["exact"]) / statistics.median(seconds[name]),
            "metrics": metrics[name],
            "largest_metric_difference": max(abs(metrics[name][key] - metrics["exact"][key]) for key in metrics[name]),
        }
    result = {
        "benchmark": "approximate memory search (inverted lists), PatchCore-TAEF2 full-shot MVTec AD bottle",
        "memory_entries": len(memory), "lists": round(np.sqrt(len(memory))), "fit_seconds": round(fit_seconds, 1),
        "index_build_seconds": round(build_seconds, 2), "test_images": len(test), "settings": rows,
    }  # fmt: skip
    result = write_benchmark_json(args.out, result)
    lines = [f"# {result['benchmark']}", "", f"`{result['command']}`", "",
             f"{len(memory)} memory entries in {result['lists']} lists (k-means built in "
             f"{result['index_build_seconds']} s); {len(test)} test images, searched alternately.", "",
             "| search | recall@1 | largest distance error | memory search s/img | speed-up | I-AUROC | P-AUROC | "
             "AUPRO | largest metric difference |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in rows.items():
        m = row["metrics"]
        lines.append(f"| {name} | {row['recall']:.4f} | {row['largest_relative_distance_error']:.3%} | "
                     f"{row['memory_search_seconds_per_image']:.3f} | {row['speedup']:.2f}x | {m['image_auroc']:.4f} | "
                     f"{m['pixel_auroc']:.4f} | {m['pixel_aupro']:.4f} | {row['largest_metric_difference']:.4f} |")
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
