"""Batch scoring of image files: the engine behind ``anomalens predict``.

Output folder layout::

    OUT/run.json          method, config, config hash, threshold and its rule, counts, status
    OUT/scores.jsonl      one record per scored image, appended as it is scored
    OUT/scores.csv        the same records as CSV, written when the run ends
    OUT/errors.jsonl      one record per skipped input, with the reason
    OUT/overlays/NAME.png heatmap over the image
    OUT/maps/NAME.npy     the raw float32 map (or NAME.png, 16-bit, with --raw-format png16)

NAME mirrors the image's path below the input folder it was found in (a file given directly uses its
own name), with a numeric suffix where two inputs would collide.

Default threshold (references given, no ``--threshold``): leave-one-out. Each reference is scored by the
detector fitted on the other references; the threshold is the largest of those scores, i.e. the lowest
threshold at which no held-out reference is flagged. It needs at least two references.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalens.detector import Detector
from anomalens.images import ImageLoadError, load_image
from anomalens.outputs import atomic_write_bytes, atomic_write_json, heatmap_overlay, png_bytes, raw_map_bytes

logger = logging.getLogger(__name__)

RUN_ARTIFACTS = (
    "run.json",
    "scores.jsonl",
    "scores.csv",
    "scores.parquet",
    ".scores.csv.partial",
    "errors.jsonl",
    "overlays",
    "maps",
)
CSV_FIELDS = ("path", "score", "label", "threshold", "method", "config_hash", "overlay", "map", "width", "height")
THRESHOLD_RULE = "leave-one-out: max over references of the score of each reference against the others"


@dataclass
class PredictSummary:
    """What a run did."""

    scored: int = 0
    flagged: int = 0
    skipped: int = 0
    threshold: float | None = None
    threshold_source: str = "none"
    out_dir: Path | None = None
    seconds: float = 0.0
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)

    def line(self) -> str:
        flagged = f"{self.flagged} flagged" if self.threshold is not None else "none flagged (no threshold)"
        return f"scored {self.scored} image(s), {flagged}, skipped {self.skipped}; results in {self.out_dir}"


def leave_one_out_threshold(
    detector: Detector, reference_images: Sequence[Any], class_name: str | None = None
) -> float | None:
    """The default threshold from the references themselves (see the module docstring).

    Refits ``detector`` once per reference and finally on all of them, so it ends fitted on every reference.
    Returns ``None`` (and logs why) with fewer than two references.
    """
    references = [load_image(image) for image in reference_images]
    if len(references) < 2:
        logger.warning("a default threshold needs at least 2 reference images (got %d); no labels", len(references))
        detector.fit(references, class_name=class_name)
        return None
    held_out_scores = []
    for index in range(len(references)):
        others = references[:index] + references[index + 1 :]
        detector.fit(others, class_name=class_name)
        held_out_scores.append(detector.predict_arrays([references[index]])[0].score)
    detector.fit(references, class_name=class_name)
    return float(max(held_out_scores))


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Create ``out_dir``; refuse to mix runs: earlier run outputs are an error unless ``overwrite``.

    With ``overwrite`` only anomalens' own artifacts (``RUN_ARTIFACTS``) are removed; other files stay.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    existing = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"output folder {out} already holds a run ({', '.join(existing)}); "
            "choose another --out or pass --overwrite to replace it"
        )
    for name in existing:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def output_names(paths: Sequence[Path], roots: Sequence[Path | None]) -> list[str]:
    """Collision-free relative names (without extension) for each input image."""
    names, used = [], set()
    for path, root in zip(paths, roots):
        relative = path.relative_to(root) if root is not None else Path(path.name)
        stem = relative.with_suffix("").as_posix()
        name, counter = stem, 1
        while name in used:
            counter += 1
            name = f"{stem}-{counter}"
        used.add(name)
        names.append(name)
    return names


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path | None]]:
    """Expand inputs to image files and remember the folder each came from (``None`` for direct files)."""
    from anomalens.images import find_images

    paths, roots = [], []
    seen = set()
    for entry in inputs:
        entry_path = Path(entry)
        found = find_images([entry_path])
        for path in found:
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            paths.append(path)
            roots.append(entry_path if entry_path.is_dir() else None)
    return paths, roots


def run_predict(
    detector: Detector,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    threshold: float | None = None,
    threshold_source: str | None = None,
    batch_size: int | None = None,
    raw_format: str = "npy",
    overwrite: bool = False,
    write_overlays: bool = True,
    run_info: dict[str, Any] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> PredictSummary:
    """Score every image under ``inputs`` with a fitted ``detector`` and write results to ``out_dir``.

    Unreadable inputs are reported in ``errors.jsonl`` and skipped; the run never aborts because of one
    image. Memory does not grow with the number of images: records stream to ``scores.jsonl``.

    Args:
        detector: A fitted detector.
        inputs: Image files and folders (searched recursively).
        out_dir: Output folder (see the module docstring for its layout).
        threshold: Score above which an image is labelled anomalous; ``None`` uses the detector's own
            threshold (e.g. from :func:`leave_one_out_threshold`), if any.
        threshold_source: How the threshold was chosen, recorded in ``run.json``.
        batch_size: Images per forward pass (default: the method's).
        raw_format: ``"npy"`` (exact float32) or ``"png16"``.
        overwrite: Replace an earlier run in ``out_dir`` instead of refusing.
        write_overlays: Write the heatmap overlay PNGs.
        run_info: Extra fields for ``run.json`` (e.g. the command line).
        progress: Called with the number of images finished after each batch.

    Returns:
        A :class:`PredictSummary`.
    """
    if raw_format not in ("npy", "png16"):
        raise ValueError(f"unknown raw map format {raw_format!r}; valid formats: npy, png16")
    started = time.time()
    out = prepare_out_dir(out_dir, overwrite)
    if threshold is not None:
        detector.threshold = float(threshold)
        threshold_source = threshold_source or "given"
    summary = PredictSummary(threshold=detector.threshold, out_dir=out)
    summary.threshold_source = threshold_source or ("detector" if detector.threshold is not None else "none")
    paths, roots = collect_inputs(inputs)
    names = output_names(paths, roots)
    manifest = {
        **detector.describe(),
        "threshold_source": summary.threshold_source,
        "threshold_rule": THRESHOLD_RULE if summary.threshold_source == "leave-one-out" else None,
        "inputs": [str(entry) for entry in inputs],
        "raw_format": raw_format,
        "status": "running",
        **(run_info or {}),
    }
    atomic_write_json(out / "run.json", manifest)
    size = batch_size or getattr(detector.config, "batch_size", 8)
    partial_csv = out / ".scores.csv.partial"
    with (
        open(out / "scores.jsonl", "w") as scores_file,
        open(out / "errors.jsonl", "w") as errors_file,
        open(partial_csv, "w", newline="") as csv_file,
    ):
        csv_writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS, lineterminator="\n")
        csv_writer.writeheader()

        def skip(path: Path, reason: str) -> None:
            entry = {"path": str(path), "error": reason}
            summary.skipped += 1
            summary.skipped_inputs.append(entry)
            errors_file.write(json.dumps(entry) + "\n")
            errors_file.flush()
            logger.warning("skipped %s: %s", path, reason)

        for start in range(0, len(paths), size):
            batch_paths, batch_names, arrays = [], [], []
            for path, name in zip(paths[start : start + size], names[start : start + size]):
                try:
                    arrays.append(load_image(path))
                except ImageLoadError as error:
                    skip(path, error.reason)
                    continue
                batch_paths.append(path)
                batch_names.append(name)
            for path, name, array, result in score_batch(detector, batch_paths, batch_names, arrays, skip):
                record = write_result(out, path, name, array, result, detector, raw_format, write_overlays)
                scores_file.write(json.dumps(record) + "\n")
                scores_file.flush()
                csv_writer.writerow({key: "" if record.get(key) is None else record[key] for key in CSV_FIELDS})
                summary.scored += 1
                summary.flagged += int(bool(result.label))
            if progress is not None:
                progress(min(start + size, len(paths)))
    os.replace(partial_csv, out / "scores.csv")
    summary.seconds = time.time() - started
    manifest.update(
        status="complete",
        scored=summary.scored,
        flagged=summary.flagged,
        skipped=summary.skipped,
        seconds=round(summary.seconds, 3),
    )
    atomic_write_json(out / "run.json", manifest)
    return summary


def score_batch(detector, paths, names, arrays, skip):
    """Score a batch; if the batch fails, retry image by image so one bad input cannot sink the others.

    Returns ``(path, name, array, result)`` for each scored image; ``skip(path, reason)`` gets the failures.
    """
    if not arrays:
        return []
    try:
        results = detector.predict_arrays(arrays, [str(path) for path in paths])
        return list(zip(paths, names, arrays, results))
    except (RuntimeError, ValueError) as error:
        if len(arrays) == 1:
            skip(paths[0], f"scoring failed: {error}")
            return []
        logger.warning("batch failed (%s); scoring its %d images one by one", error, len(arrays))
    scored = []
    for path, name, array in zip(paths, names, arrays):
        scored.extend(score_batch(detector, [path], [name], [array], skip))
    return scored


def write_result(out, path, name, array, result, detector, raw_format, write_overlays) -> dict[str, Any]:
    """Write one image's overlay and raw map under ``out``; returns its score record."""
    record: dict[str, Any] = {
        "path": str(path),
        "score": result.score,
        "label": None if result.label is None else ("anomalous" if result.label else "normal"),
        "threshold": result.threshold,
        "method": detector.method_name,
        "config_hash": detector.config_hash,
        "width": int(array.shape[1]),
        "height": int(array.shape[0]),
    }
    if write_overlays:
        overlay = heatmap_overlay(array, result.anomaly_map, result.threshold)
        record["overlay"] = (
            atomic_write_bytes(out / "overlays" / f"{name}.png", png_bytes(overlay)).relative_to(out).as_posix()
        )
    data, extra = raw_map_bytes(result.anomaly_map, raw_format)
    suffix = ".npy" if raw_format == "npy" else ".png"
    record["map"] = atomic_write_bytes(out / "maps" / f"{name}{suffix}", data).relative_to(out).as_posix()
    record.update(extra)
    return record


def load_scores(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the records of a finished (or interrupted) run's ``scores.jsonl``."""
    path = Path(out_dir) / "scores.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
