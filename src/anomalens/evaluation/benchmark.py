"""Paper-style benchmark tables: the engine behind ``anomalens benchmark``.

For each category and seed: draw ``shots`` references from the normal training pool with that seed
(``"all"`` takes the whole pool, ``0`` none), fit, score the test split, and compute the seven metrics
of :mod:`anomalens.evaluation.metrics`. Pixel metrics are computed on maps and masks resized to ``eval_size``
(bilinear maps, nearest-neighbour masks), as is common in the literature; ``eval_size=None`` keeps each
image's own resolution.

References come from the training pool (``train/good``); a set without one (``references_from="auto"``, or
``"test"``) draws them from the test split's normal images with the seed, and leaves them out of the scoring.
The references each seed drew are recorded.

With ``false_alarm_rates``, the detector is fitted with a conformal threshold (:mod:`anomalens.thresholds`) at the
smallest rate, and the threshold of every rate is taken from the same held-out reference scores; the share of the
test split's normal images above it is the measured false-alarm rate, reported beside the rate asked.

Writes ``OUT/results.json`` (metrics as fractions, ``_std`` entries with several seeds, the sample
standard deviation; per defect type too), ``OUT/results.md`` (the tables in %, one row per category plus the
mean, then one row per defect type) and ``OUT/scores.csv`` (every image's score, label and defect type per seed).
"""

from __future__ import annotations

import csv
import io
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.config import config_to_dict
from anomalens.detector import Detector
from anomalens.evaluation.metrics import ALL_METRICS, UndefinedMetricWarning, compute_all
from anomalens.evaluation.profiling import PeakMemory, machine_info, process_peak_mb
from anomalens.io.datasets import Dataset, Sample, open_dataset
from anomalens.io.images import load_image, readable_images
from anomalens.io.outputs import atomic_write_json, atomic_write_text
from anomalens.thresholds import ThresholdOptions, conformal_threshold, required_references

logger = logging.getLogger(__name__)

RECORD_FIELDS = ALL_METRICS + ("n_images", "seconds_per_image", "fit_seconds", "peak_memory_mb")
REFERENCE_SOURCES = ("auto", "train", "test")
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
    references_from: str = "auto",
    false_alarm_rates: Sequence[float] = (),
    calibration: str = "auto",
) -> dict[str, Any]:
    """Fit on ``shots`` references of ``category`` and score its test split; returns one result record."""
    references, test, source = choose_references(dataset, category, shots, seed, references_from)
    test = subset_test(test, max_images)
    if not test:
        raise ValueError(f"category {category!r} of {dataset.name} has no test images")
    size = len(test) if detector.pooled else batch_size or detector.config.batch_size  # a pool: the whole split
    scored = _Scored(eval_size)
    options = threshold_options(len(references), false_alarm_rates, calibration, detector.config.seed, category)
    bar = progress_factory(total=len(test), desc=f"{category} seed {seed}") if progress_factory else None
    with PeakMemory() as memory:
        fit_began = time.perf_counter()
        detector.fit([load_image(sample.image_path) for sample in references], class_name=category, options=options)
        fit_seconds = time.perf_counter() - fit_began
        detector.stage_seconds.clear()
        _score_test(detector, test, size, scored, bar)
    if bar is not None:
        bar.close()
    if not scored.scores:
        raise ValueError(f"no test image of category {category!r} could be read")
    count = len(scored.scores)
    record = {
        **scored.metrics(category),
        "n_images": count,
        "seconds_per_image": scored.seconds / count,
        "fit_seconds": fit_seconds,  # reading the references, encoding them, the memory / coreset, calibration
        "peak_memory_mb": memory.peak_mb,
        "process_peak_memory_mb": process_peak_mb(),
        "n_references": len(references),
        "references_from": source,
        "references": [str(sample.image_path) for sample in references],
        "stage_seconds_per_image": {stage: seconds / count for stage, seconds in detector.stage_seconds.items()},
        "defect_types": scored.per_defect_type(category),
        "images": scored.images(seed),
        "skipped": scored.skipped,
    }
    if false_alarm_rates:
        record["false_alarm"] = measured_false_alarms(detector, scored, sorted(false_alarm_rates))
    return record


def threshold_options(references: int, false_alarm_rates: Sequence[float], calibration: str, seed: int,
                      category: str) -> ThresholdOptions:  # fmt: skip
    """How a benchmark fit holds references out: for the smallest false-alarm rate the references allow (larger
    rates reuse its held-out scores), else no threshold (the metrics need none)."""
    for rate in sorted(false_alarm_rates):
        options = ThresholdOptions(false_alarm_rate=rate, calibration=calibration)
        try:
            options.plan(references, seed)
        except ValueError as error:
            logger.warning("%s seed %d: %s", category, seed, error)
            continue
        return options
    return ThresholdOptions(threshold=None)


def _score_test(detector: Detector, test: list[Sample], size: int, scored: _Scored, bar: Any) -> None:
    """Score the test samples in batches of ``size`` into ``scored``, timing the scoring alone."""
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


def choose_references(dataset: Dataset, category: str, shots: int | None, seed: int,
                      references_from: str) -> tuple[list[Sample], list[Sample], str]:  # fmt: skip
    """``(references, test samples, where the references came from)``.

    ``"train"``: the training pool. ``"test"``: the test split's normal images, drawn with ``seed`` and removed
    from the test samples. ``"auto"``: the training pool if it has images, else the test split's normal ones.
    """
    if references_from not in REFERENCE_SOURCES:
        raise ValueError(f"references_from={references_from!r} must be one of {', '.join(REFERENCE_SOURCES)}")
    test = list(dataset.test_samples(category))
    if shots == 0:
        return [], test, "none"
    pool = dataset.train_samples(category) if references_from != "test" else []
    if references_from == "train" or pool:
        return draw_references(pool, shots, seed), test, "train"
    normal = [sample for sample in test if sample.label == 0]
    if shots is None:
        raise ValueError(
            f"category {category!r} has no training images: with references from test/good, give a number of "
            f"shots (--shots N, at most {len(normal) - 1}) so some normal test images are left to score"
        )
    if shots >= len(normal):
        raise ValueError(
            f"category {category!r} has no training images and only {len(normal)} normal test images: "
            f"--shots {shots} would leave none to score"
        )
    references = draw_references(normal, shots, seed)
    chosen = {sample.image_path for sample in references}
    return references, [sample for sample in test if sample.image_path not in chosen], "test"


def measured_false_alarms(detector: Detector, scored: _Scored, rates: Sequence[float]) -> list[dict[str, Any]]:
    """For each rate asked: its conformal threshold on the detector's held-out reference scores and the share of
    the scored normal images above it (``None`` where there are too few held-out references for the rate)."""
    normal = np.array([score for score, label in zip(scored.scores, scored.labels) if label == 0], dtype=np.float64)
    held_out = detector.calibration.held_out_scores
    rows = []
    for rate in rates:
        row: dict[str, Any] = {"alpha": rate, "n_held_out": len(held_out), "n_normal_test": int(normal.size),
                               "calibration": detector.calibration.record.get("calibration")}  # fmt: skip
        if len(held_out) < required_references(rate):
            row.update(threshold=None, measured=None,
                       note=f"needs {required_references(rate)} held-out references, has {len(held_out)}")  # fmt: skip
        else:
            threshold = conformal_threshold(held_out, rate)
            flagged = int((normal > threshold).sum())
            row.update(threshold=threshold, flagged=flagged,
                       measured=flagged / normal.size if normal.size else float("nan"))  # fmt: skip
        rows.append(row)
    return rows


class _Scored:
    """What a category's scoring collects: scores, labels, maps and masks at ``eval_size``, skipped files, time."""

    def __init__(self, eval_size: int | None):
        self.eval_size = eval_size
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.defect_types: list[str] = []
        self.paths: list[str] = []
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
        self.defect_types.append(sample.defect_type)
        self.paths.append(str(sample.image_path))
        self.maps.append(_resize(result.anomaly_map, self.eval_size, "bilinear"))
        mask = sample.mask(array.shape[:2])
        if mask is None:
            self.masks_known = False
        else:
            self.masks.append(_resize(mask.astype(np.float32), self.eval_size, "nearest") > 0.5)

    def metrics(self, category: str, keep: Sequence[int] | None = None) -> dict[str, float]:
        """The seven metrics over the images at indices ``keep`` (all by default); undefined metrics are ``nan``
        and reported in one message, not one warning per metric."""
        keep = range(len(self.scores)) if keep is None else keep
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UndefinedMetricWarning)
            metrics = compute_all([self.scores[i] for i in keep], [self.labels[i] for i in keep],
                                  [self.maps[i] for i in keep],
                                  [self.masks[i] for i in keep] if self.masks_known else None)  # fmt: skip
        undefined = sorted({str(item.message).split(" is undefined")[0] for item in caught
                            if issubclass(item.category, UndefinedMetricWarning)})  # fmt: skip
        if undefined:
            labels = {self.labels[i] for i in keep}
            present = "only normal" if labels == {0} else "only anomalous" if labels == {1} else "no pixel labels"
            logger.warning("%s: %s undefined (%s images): reported as n/a", category, ", ".join(undefined), present)
        return metrics

    def per_defect_type(self, category: str) -> dict[str, dict[str, float]]:
        """Metrics of each defect type against the normal images (good + that type)."""
        types = sorted({kind for kind, label in zip(self.defect_types, self.labels) if label == 1})
        normal = [index for index, label in enumerate(self.labels) if label == 0]
        result = {}
        for kind in types:
            chosen = normal + [index for index, name in enumerate(self.defect_types) if name == kind]
            result[kind] = {**self.metrics(f"{category}/{kind}", sorted(chosen)),
                            "n_images": len(chosen) - len(normal)}  # fmt: skip
        return result

    def images(self, seed: int) -> list[dict[str, Any]]:
        rows = zip(self.paths, self.defect_types, self.labels, self.scores)
        return [{"path": path, "defect_type": kind, "label": label, "score": score, "seed": seed}
                for path, kind, label, score in rows]  # fmt: skip


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of each field, with ``<field>_std`` (sample std) when there are several seeds."""
    summary: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        values = np.array([record[name] for record in records], dtype=np.float64)
        summary[name] = float(np.mean(values)) if not np.isnan(values).all() else float("nan")
        if len(records) > 1 and name in ALL_METRICS:
            summary[f"{name}_std"] = float(np.std(values, ddof=1))
    summary["n_images"] = int(round(summary["n_images"]))
    kinds = sorted({kind for record in records for kind in record.get("defect_types", {})})
    if kinds:
        summary["defect_types"] = {}
        for kind in kinds:
            present = [record["defect_types"][kind] for record in records if kind in record.get("defect_types", {})]
            entry = {name: float(np.mean([item[name] for item in present])) for name in ALL_METRICS}
            if len(present) > 1:
                entry.update({f"{name}_std": float(np.std([item[name] for item in present], ddof=1))
                              for name in ALL_METRICS})  # fmt: skip
            entry["n_images"] = present[0]["n_images"]
            summary["defect_types"][kind] = entry
    if any("false_alarm" in record for record in records):
        summary["false_alarm"] = _mean_false_alarms([record["false_alarm"] for record in records])
    stages = sorted({stage for record in records for stage in record.get("stage_seconds_per_image", {})})
    if stages:
        summary["stage_seconds_per_image"] = {
            stage: float(np.mean([record["stage_seconds_per_image"].get(stage, 0.0) for record in records]))
            for stage in stages
        }
    return summary


def _mean_false_alarms(per_seed: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rate: the measured false-alarm rate averaged over seeds (pooled over all normal test images)."""
    rows = []
    for rate_rows in zip(*per_seed):
        usable = [row for row in rate_rows if row.get("measured") is not None]
        row: dict[str, Any] = {"alpha": rate_rows[0]["alpha"], "n_held_out": rate_rows[0]["n_held_out"],
                               "calibration": rate_rows[0]["calibration"], "seeds": len(rate_rows)}  # fmt: skip
        if usable:
            flagged = sum(item["flagged"] for item in usable)
            normal = sum(item["n_normal_test"] for item in usable)
            row.update(measured=flagged / normal if normal else float("nan"), flagged=flagged, n_normal_test=normal,
                       threshold=float(np.mean([item["threshold"] for item in usable])))  # fmt: skip
        else:
            row.update(measured=None, note=rate_rows[0].get("note"))
        rows.append(row)
    return rows


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
    references_from: str = "auto",
    false_alarm_rates: Sequence[float] = (),
    calibration: str = "auto",
) -> dict[str, Any]:
    """Benchmark ``detector`` on a dataset and (if ``out_dir``) write ``results.json``, ``results.md`` and
    ``scores.csv`` (see the module docstring for ``references_from`` and ``false_alarm_rates``).

    An ``out_dir`` that already holds results is refused (before any work) unless ``overwrite``.
    """
    if out_dir is not None:
        existing = [name for name in ("results.json", "results.md", "scores.csv") if (Path(out_dir) / name).exists()]
        if existing and not overwrite:
            raise ValueError(
                f"output folder {out_dir} already holds benchmark results ({', '.join(existing)}); "
                "choose another --out or pass --overwrite to replace them"
            )
    dataset = open_dataset(dataset_name, root)
    chosen = _check_benchmark(detector, dataset, dataset_name, root, categories, shots)
    options = {"batch_size": batch_size, "eval_size": eval_size, "max_images": max_images,
               "progress_factory": progress_factory, "references_from": references_from,
               "false_alarm_rates": tuple(false_alarm_rates), "calibration": calibration}  # fmt: skip
    per_category: dict[str, Any] = {}
    images: list[dict[str, Any]] = []
    for category in chosen:
        records = [evaluate_category(detector, dataset, category, shots=shots, seed=seed, **options) for seed in seeds]
        per_category[category] = _category_summary(detector, records, seeds)
        images.extend({"category": category, **image} for record in records for image in record["images"])
        logger.info("%s: %s", category, {k: round(v, 4) for k, v in per_category[category].items() if k in ALL_METRICS})
    mean = {name: _nanmean([per_category[c][name] for c in chosen]) for name in RECORD_FIELDS if name != "n_images"}
    mean["n_images"] = int(sum(per_category[c]["n_images"] for c in chosen))
    results = {
        "method": detector.method_name, "dataset": dataset_name, "config": config_to_dict(detector.config),
        "shots": "all" if shots is None else shots, "seeds": list(seeds), "categories": per_category, "mean": mean,
        "eval_size": eval_size, "max_images": max_images, "false_alarm_rates": list(false_alarm_rates),
        "command": command or " ".join(sys.argv), "machine": machine_info(),
    }  # fmt: skip
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", results_table(results))
        atomic_write_text(out / "scores.csv", _scores_csv(images))
    return results


def _category_summary(detector: Detector, records: list[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """One category's seeds aggregated, with the references of each seed, how thresholds were calibrated and the
    files skipped."""
    summary = aggregate(records)
    summary["references"] = {str(seed): record["references"] for seed, record in zip(seeds, records)}
    summary["references_from"] = records[0]["references_from"]
    if records[0].get("false_alarm") and detector.calibration.record:
        summary["threshold_calibration"] = dict(detector.calibration.record)
    skipped = [item for record in records for item in record["skipped"]]
    if skipped:
        summary["skipped"] = skipped
    return summary


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


def _scores_csv(images: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["category", "seed", "path", "defect_type", "label", "score"],
                            lineterminator="\n")  # fmt: skip
    writer.writeheader()
    writer.writerows(images)
    return buffer.getvalue()


def _cell(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if value is None or not np.isfinite(value):
        return "n/a"
    std = record.get(f"{name}_std")
    return f"{100 * value:.1f}" + (f"±{100 * std:.1f}" if std is not None and np.isfinite(std) else "")


def results_table(results: dict[str, Any]) -> str:
    """The markdown tables of a results dict, metrics in %, ``mean±std`` with several seeds: one row per category
    and the mean, then one row per defect type, then the false-alarm rates when measured."""
    shots = results["shots"]
    title = (
        f"# {results['method']} on {results['dataset']}, {shots}-shot, seeds {results['seeds']}\n\n"
        if shots != 0
        else f"# {results['method']} on {results['dataset']}, zero-shot\n\n"
    )
    lines = [
        "| Category | " + " | ".join(TABLE_HEADERS) + " | s/img | fit s | peak MB |",
        "|---" * (len(TABLE_HEADERS) + 4) + "|",
    ]
    rows = list(results["categories"].items()) + [("**mean**", results["mean"])]
    for name, record in rows:
        metrics = " | ".join(_cell(record, metric) for metric in ALL_METRICS)
        fit = f"{record['fit_seconds']:.1f}" if "fit_seconds" in record else ""
        seconds, peak = f"{record['seconds_per_image']:.3f}", f"{record['peak_memory_mb']:.0f}"
        lines.append(f"| {name} | {metrics} | {seconds} | {fit} | {peak} |")
    kinds = [(category, kind, entry) for category, record in results["categories"].items()
             for kind, entry in record.get("defect_types", {}).items()]  # fmt: skip
    if kinds:
        lines += ["", "Per defect type (each against the category's normal test images):", "",
                  "| Category | Defect type | n | " + " | ".join(TABLE_HEADERS) + " |",
                  "|---" * (len(TABLE_HEADERS) + 3) + "|"]  # fmt: skip
        for category, kind, entry in kinds:
            metrics = " | ".join(_cell(entry, metric) for metric in ALL_METRICS)
            lines.append(f"| {category} | {kind} | {entry['n_images']} | {metrics} |")
    alarms = [(category, row) for category, record in results["categories"].items()
              for row in record.get("false_alarm", [])]  # fmt: skip
    if alarms:
        lines += ["", "False alarms on the normal test images at the conformal threshold:", "",
                  "| Category | alpha asked | held-out refs | calibration | measured | flagged / normal |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for category, row in alarms:
            measured = "n/a (" + row.get("note", "") + ")" if row.get("measured") is None else f"{row['measured']:.3f}"
            counts = f"{row['flagged']} / {row['n_normal_test']}" if row.get("measured") is not None else ""
            lines.append(f"| {category} | {row['alpha']} | {row['n_held_out']} | {row['calibration']} | {measured} "
                         f"| {counts} |")  # fmt: skip
    return title + "\n".join(lines) + "\n"
