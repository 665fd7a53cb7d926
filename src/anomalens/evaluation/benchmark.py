"""Paper-style benchmark tables: the engine behind ``anomalens benchmark``.

For each category and seed: draw ``shots`` references from the normal training pool with that seed
(``"all"`` takes the whole pool, ``0`` none), fit, score the test split, and compute the seven metrics
of :mod:`anomalens.evaluation.metrics`. Pixel metrics are computed on maps and masks resized to ``eval_size``
(bilinear maps, nearest-neighbour masks), as is common in the literature; ``eval_size=None`` keeps each
image's own resolution.

Writes ``OUT/results.json`` (metrics as fractions, ``_std`` entries with several seeds, the sample
standard deviation) and ``OUT/results.md`` (the table in %, one row per category plus the mean).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.config import config_to_dict
from anomalens.detector import Detector
from anomalens.evaluation.metrics import ALL_METRICS, compute_all
from anomalens.evaluation.profiling import PeakMemory, machine_info
from anomalens.io.datasets import Dataset, Sample, open_dataset
from anomalens.io.images import load_image, readable_images
from anomalens.io.outputs import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

RECORD_FIELDS = ALL_METRICS + ("n_images", "seconds_per_image", "peak_memory_mb")
TABLE_HEADERS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")


def parse_shots(value: str | int) -> int | None:
    """``"all"`` -> ``None`` (every training image); otherwise a non-negative int."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    try:
        shots = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"shots must be a non-negative integer or 'all', got {value!r}") from None
    if shots < 0:
        raise ValueError(f"shots must be a non-negative integer or 'all', got {value!r}")
    return shots


def draw_references(pool: Sequence[Sample], shots: int | None, seed: int) -> list[Sample]:
    """``shots`` distinct samples from ``pool``, chosen with ``seed`` (all of them for ``None``)."""
    if shots is None:
        return list(pool)
    if shots > len(pool):
        raise ValueError(f"asked for {shots} reference shots but the training pool has only {len(pool)} images")
    chosen = np.random.default_rng(seed).choice(len(pool), size=shots, replace=False)
    return [pool[index] for index in sorted(chosen)]


def subset_test(samples: Sequence[Sample], max_images: int | None) -> list[Sample]:
    """At most ``max_images`` samples, normal and anomalous in their original proportions.

    The choice is fixed (seed 0, independent of the run's seeds), so every seed and every method of a speed
    comparison scores the same images; the order of the split is kept.
    """
    if max_images is None or len(samples) <= max_images:
        return list(samples)
    if max_images < 2:
        raise ValueError(f"max_images must be at least 2 (one normal, one anomalous), got {max_images}")
    rng = np.random.default_rng(0)
    normal = [index for index, sample in enumerate(samples) if sample.label == 0]
    anomalous = [index for index, sample in enumerate(samples) if sample.label == 1]
    take_normal = min(len(normal), max(1, round(max_images * len(normal) / len(samples))))
    take_anomalous = min(len(anomalous), max_images - take_normal)
    chosen = list(rng.choice(normal, take_normal, replace=False)) + list(
        rng.choice(anomalous, take_anomalous, replace=False)
    )
    return [samples[index] for index in sorted(chosen)]


def _resize(array: np.ndarray, size: int | None, mode: str) -> np.ndarray:
    if size is None or array.shape == (size, size):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(tensor, size=(size, size), mode=mode, **kwargs)[0, 0].numpy()


def evaluate_category(
    detector: Detector,
    dataset: Dataset,
    category: str,
    *,
    shots: int | None,
    seed: int,
    batch_size: int | None = None,
    eval_size: int | None = 256,
    max_images: int | None = None,
    progress_factory: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Fit on ``shots`` references of ``category`` and score its test split; returns one result record."""
    references = draw_references(dataset.train_samples(category), shots, seed) if shots != 0 else []
    test = subset_test(dataset.test_samples(category), max_images)
    if not test:
        raise ValueError(f"category {category!r} of {dataset.name} has no test images")
    size = batch_size or detector.config.batch_size
    if detector.pooled:
        size = len(test)  # the whole test split is the pool its images are scored against
    scored = _Scored(eval_size)
    bar = progress_factory(total=len(test), desc=f"{category} seed {seed}") if progress_factory else None
    with PeakMemory() as memory:
        detector.fit([load_image(sample.image_path) for sample in references], class_name=category, threshold=None)
        detector.stage_seconds.clear()
        for start in range(0, len(test), size):
            chunk = test[start : start + size]
            batch = list(readable_images([sample.image_path for sample in chunk], on_error=scored.skip))
            samples = {sample.image_path: sample for sample in chunk}
            if batch:
                began = time.perf_counter()
                results = detector.predict_arrays([array for _, array in batch], [str(path) for path, _ in batch])
                scored.seconds += time.perf_counter() - began
                for (path, array), result in zip(batch, results):
                    scored.add(samples[path], array, result)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if not scored.scores:
        raise ValueError(f"no test image of category {category!r} could be read")
    metrics = compute_all(scored.scores, scored.labels, scored.maps, scored.masks if scored.masks_known else None)
    count = len(scored.scores)
    return {
        **metrics,
        "n_images": count,
        "seconds_per_image": scored.seconds / count,
        "peak_memory_mb": memory.peak_mb,
        "n_references": len(references),
        "stage_seconds_per_image": {stage: seconds / count for stage, seconds in detector.stage_seconds.items()},
        "skipped": scored.skipped,
    }


class _Scored:
    """What a category's scoring collects: scores, labels, maps and masks at ``eval_size``, skipped files, time."""

    def __init__(self, eval_size: int | None):
        self.eval_size = eval_size
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.maps: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.masks_known = True
        self.skipped: list[dict[str, str]] = []
        self.seconds = 0.0

    def skip(self, path: Any, reason: str) -> None:
        self.skipped.append({"path": str(path), "error": reason})
        logger.warning("skipped %s: %s", path, reason)

    def add(self, sample: Any, array: np.ndarray, result: Any) -> None:
        self.scores.append(result.score)
        self.labels.append(sample.label)
        self.maps.append(_resize(result.anomaly_map, self.eval_size, "bilinear"))
        mask = sample.mask(array.shape[:2])
        if mask is None:
            self.masks_known = False
        else:
            self.masks.append(_resize(mask.astype(np.float32), self.eval_size, "nearest") > 0.5)


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of each field, with ``<field>_std`` (sample std) when there are several seeds."""
    summary: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        values = np.array([record[name] for record in records], dtype=np.float64)
        summary[name] = float(np.mean(values)) if not np.isnan(values).all() else float("nan")
        if len(records) > 1 and name in ALL_METRICS:
            summary[f"{name}_std"] = float(np.std(values, ddof=1))
    summary["n_images"] = int(round(summary["n_images"]))
    stages = sorted({stage for record in records for stage in record.get("stage_seconds_per_image", {})})
    if stages:
        summary["stage_seconds_per_image"] = {
            stage: float(np.mean([record["stage_seconds_per_image"].get(stage, 0.0) for record in records]))
            for stage in stages
        }
    return summary


def run_benchmark(
    detector: Detector,
    dataset_name: str,
    root: str,
    *,
    categories: Sequence[str] | None = None,
    shots: int | None = 1,
    seeds: Sequence[int] = (0,),
    out_dir: str | None = None,
    batch_size: int | None = None,
    eval_size: int | None = 256,
    max_images: int | None = None,
    command: str | None = None,
    progress_factory: Callable[..., Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Benchmark ``detector`` on a dataset and (if ``out_dir``) write ``results.json`` and ``results.md``.

    An ``out_dir`` that already holds results is refused (before any work) unless ``overwrite``.
    """
    if out_dir is not None:
        existing = [name for name in ("results.json", "results.md") if (Path(out_dir) / name).exists()]
        if existing and not overwrite:
            raise ValueError(
                f"output folder {out_dir} already holds benchmark results ({', '.join(existing)}); "
                "choose another --out or pass --overwrite to replace them"
            )
    dataset = open_dataset(dataset_name, root)
    chosen = _check_benchmark(detector, dataset, dataset_name, root, categories, shots)
    options = {"batch_size": batch_size, "eval_size": eval_size, "max_images": max_images,
               "progress_factory": progress_factory}  # fmt: skip
    per_category: dict[str, Any] = {}
    for category in chosen:
        records = [evaluate_category(detector, dataset, category, shots=shots, seed=seed, **options) for seed in seeds]
        per_category[category] = aggregate(records)
        skipped = [item for record in records for item in record["skipped"]]
        if skipped:
            per_category[category]["skipped"] = skipped
        logger.info("%s: %s", category, {k: round(v, 4) for k, v in per_category[category].items() if k in ALL_METRICS})
    mean = {name: _nanmean([per_category[c][name] for c in chosen]) for name in RECORD_FIELDS if name != "n_images"}
    mean["n_images"] = int(sum(per_category[c]["n_images"] for c in chosen))
    results = {
        "method": detector.method_name,
        "dataset": dataset_name,
        "config": config_to_dict(detector.config),
        "shots": "all" if shots is None else shots,
        "seeds": list(seeds),
        "categories": per_category,
        "mean": mean,
        "eval_size": eval_size,
        "max_images": max_images,
        "command": command or " ".join(sys.argv),
        "machine": machine_info(),
    }
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", results_table(results))
    return results


def _check_benchmark(detector, dataset, dataset_name: str, root: str, categories, shots) -> list[str]:
    """The categories to run, after checking them and the shots against the dataset and the method."""
    available = dataset.categories()
    if not available:
        raise ValueError(f"no categories found for dataset {dataset_name!r} at {root}")
    chosen = list(categories) if categories else available
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"unknown categories {unknown} for {dataset_name} at {root}; valid: {', '.join(available)}")
    if shots == 0 and not detector.zero_shot:
        raise ValueError(f"method {detector.method_name!r} is not zero-shot: use --shots 1 or more (or 'all')")
    if shots != 0 and not detector.few_shot:
        raise ValueError(f"method {detector.method_name!r} is zero-shot only: use --shots 0")
    return chosen


def _nanmean(values: Sequence[float]) -> float:
    array = np.array(values, dtype=np.float64)
    return float(np.nanmean(array)) if not np.isnan(array).all() else float("nan")


def results_table(results: dict[str, Any]) -> str:
    """The markdown table of a results dict, metrics in %, ``mean±std`` with several seeds."""
    shots = results["shots"]
    title = (
        f"# {results['method']} on {results['dataset']}, {shots}-shot, seeds {results['seeds']}\n\n"
        if shots != 0
        else f"# {results['method']} on {results['dataset']}, zero-shot\n\n"
    )
    lines = [
        "| Category | " + " | ".join(TABLE_HEADERS) + " | s/img | peak MB |",
        "|---" * (len(TABLE_HEADERS) + 3) + "|",
    ]

    def cell(record: dict[str, Any], name: str) -> str:
        value = record.get(name)
        if value is None or not np.isfinite(value):
            return "n/a"
        std = record.get(f"{name}_std")
        return f"{100 * value:.1f}" + (f"±{100 * std:.1f}" if std is not None and np.isfinite(std) else "")

    rows = list(results["categories"].items()) + [("**mean**", results["mean"])]
    for name, record in rows:
        metrics = " | ".join(cell(record, metric) for metric in ALL_METRICS)
        lines.append(f"| {name} | {metrics} | {record['seconds_per_image']:.3f} | {record['peak_memory_mb']:.0f} |")
    return title + "\n".join(lines) + "\n"
