"""The run folder every engine (local, Ray) writes, its writer, and one image's record and files.

Run folder layout::

    OUT/run.json          method, config, config hash, threshold and its source, counts, status
    OUT/scores.jsonl      one record per scored image, appended as it is scored
    OUT/scores.csv        the same records as CSV, written when the run ends
    OUT/errors.jsonl      one record per skipped input, with the reason
    OUT/overlays/NAME.png heatmap over the image
    OUT/maps/NAME.npy     the raw float32 map (or NAME.png, 16-bit, with raw_format="png16")

NAME mirrors the image's path below the input folder it was found in (a file given directly uses its own name),
with a numeric suffix where two inputs would collide.

``run.json`` carries the run's calibration (:class:`anomalens.thresholds.Calibration`): the threshold and its
source (``given``, ``none`` or the rule that chose it), the pixel threshold and the overlays' colour scale.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalens.io.datasets import NORMAL_FOLDER_NAMES
from anomalens.io.images import find_images
from anomalens.io.outputs import (
    atomic_write_bytes,
    atomic_write_json,
    defect_regions,
    heatmap_overlay,
    png_bytes,
    raw_map_bytes,
)

logger = logging.getLogger(__name__)

RUN_ARTIFACTS = ("run.json", "scores.jsonl", "scores.csv", "scores.parquet", ".scores.csv.partial", "errors.jsonl",
                 "overlays", "maps", "masks")  # fmt: skip
CSV_FIELDS = ("path", "score", "label", "threshold", "true_label", "defect_type", "pixel_threshold", "defect_area",
              "method", "config_hash", "overlay", "map", "mask", "width", "height")  # fmt: skip
RECORD_COLUMNS = (*CSV_FIELDS, "map_scale_max", "regions")  # every field a score record can have
RAW_FORMATS = ("npy", "png16")
TEST_FOLDER_NAMES = ("test", "test_public", "test_private", "validation", "val")


# ---------------------------------------------------------------------------------------------------- records
def label_text(label: bool | None) -> str | None:
    """The label string of records and API answers: ``"anomalous"``, ``"normal"``, or ``None`` (no threshold)."""
    return None if label is None else ("anomalous" if label else "normal")


# ---------------------------------------------------------------------------------------------------- inputs
def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path | None]]:
    """Expand inputs to image files and remember the folder each came from (``None`` for direct files)."""
    paths, roots, seen = [], [], set()
    for entry in inputs:
        entry_path = Path(entry)
        for path in find_images([entry_path]):
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            paths.append(path)
            roots.append(entry_path if entry_path.is_dir() else None)
    return paths, roots


def output_names(paths: Sequence[Path], roots: Sequence[Path | None]) -> list[str]:
    """Collision-free relative names (without extension) for each input image: the path below its input folder,
    with that folder's name in front where two would otherwise collide (defect folders given one by one)."""
    short = [(path.relative_to(root) if root is not None else Path(path.name)).with_suffix("").as_posix()
             for path, root in zip(paths, roots)]  # fmt: skip
    folders = [(root if root is not None else path.parent).resolve() for path, root in zip(paths, roots)]
    groups: dict[str, set[Path]] = {}
    for name, folder in zip(short, folders):
        groups.setdefault(name, set()).add(folder)
    names, used = [], set()
    for stem, folder in zip(short, folders):
        if len(groups[stem]) > 1 and folder.name:  # the same name from different folders: keep the folder's name
            stem = f"{folder.name}/{stem}"
        name, counter = stem, 1
        while name in used:
            counter += 1
            name = f"{stem}-{counter}"
        used.add(name)
        names.append(name)
    return names


def true_label(path: Any) -> tuple[str | None, str | None]:
    """``(true label, defect type)`` from a dataset layout: ``("normal", "good")`` for an image in a ``good`` /
    ``ok`` / ``normal`` folder; ``("anomalous", folder)`` for one in another folder that sits directly under
    ``test`` (or ``test_public``, ``validation``...) or beside a ``good`` / ``ok`` / ``normal`` folder; else
    ``(None, None)``."""
    parts = Path(str(path)).parts
    if len(parts) < 2 or "://" in str(path):
        return None, None
    folder = parts[-2]
    if folder.lower() in NORMAL_FOLDER_NAMES:
        return "normal", folder
    if len(parts) >= 3 and (parts[-3].lower() in TEST_FOLDER_NAMES or _has_normal_folder(str(Path(*parts[:-2])))):
        return "anomalous", folder
    return None, None


@functools.lru_cache(maxsize=256)
def _has_normal_folder(parent: str) -> bool:
    return any((Path(parent) / name).is_dir() for name in NORMAL_FOLDER_NAMES)


# ---------------------------------------------------------------------------------------------------- one image
def score_batch(detector, paths, names, arrays, skip: Callable[[Any, str], None]) -> list[tuple]:
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


def result_record(path: Any, array, result, method: str, config_hash: str) -> dict[str, Any]:
    """The score record of one image (without its file names)."""
    label, defect_type = true_label(path)
    return {
        "path": str(path),
        "score": result.score,
        "label": label_text(result.label),
        "threshold": result.threshold,
        "true_label": label,
        "defect_type": defect_type,
        "method": method,
        "config_hash": config_hash,
        "width": int(array.shape[1]),
        "height": int(array.shape[0]),
    }


def write_result(out: Path, path, name: str, array, result, identity: tuple[str, str], raw_format: str,
                 overlays: bool, map_scale: tuple[float, float] | None) -> dict:  # fmt: skip
    """Write one image's overlay (on the colour scale ``map_scale``), raw map and defect mask under ``out``;
    returns its full score record. ``identity`` is the detector's ``(method, config hash)``."""
    record = result_record(path, array, result, *identity)
    mask = result.defect_mask()
    if mask is not None:
        regions = defect_regions(mask, result.anomaly_map)
        record.update(pixel_threshold=result.pixel_threshold, defect_area=int(mask.sum()), regions=regions)
        mask_png = png_bytes(mask.astype(np.uint8) * 255)
        record["mask"] = atomic_write_bytes(out / "masks" / f"{name}.png", mask_png).relative_to(out).as_posix()
    if overlays:
        overlay = heatmap_overlay(array, result.anomaly_map, map_scale, mask=mask, caption=overlay_caption(result),
                                  marker=result.pixel_threshold)  # fmt: skip
        record["overlay"] = atomic_write_bytes(out / "overlays" / f"{name}.png", png_bytes(overlay)).relative_to(
            out).as_posix()  # fmt: skip
    data, extra = raw_map_bytes(result.anomaly_map, raw_format)
    suffix = ".npy" if raw_format == "npy" else ".png"
    record["map"] = atomic_write_bytes(out / "maps" / f"{name}{suffix}", data).relative_to(out).as_posix()
    record.update(extra)
    return record


def overlay_caption(result: Any) -> str:
    """``score 0.412 > 0.300 anomalous`` (or ``<=`` / normal; the bare score without a threshold)."""
    if result.threshold is None:
        return f"score {result.score:.4g}"
    relation = ">" if result.label else "<="
    return f"score {result.score:.4g} {relation} {result.threshold:.4g} {label_text(result.label)}"


# ---------------------------------------------------------------------------------------------------- the run
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


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> list[str]:
    """The run artifacts already in ``out_dir``; refuses them unless ``overwrite`` (called before any fitting, so a
    mistake costs nothing), and refuses an artifact that is a symbolic link: a run writes into its own folder only.

    Raises:
        ValueError: ``out_dir`` is a file, holds a run (without ``overwrite``), or an artifact there is a link.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    existing = [name for name in RUN_ARTIFACTS if (out / name).exists() or (out / name).is_symlink()]
    links = [name for name in existing if (out / name).is_symlink()]
    if links:
        raise ValueError(f"output folder {out} has {', '.join(links)} as a symbolic link; a run writes only into its "
                         "own folder: remove the link or choose another --out")  # fmt: skip
    if existing and not overwrite:
        raise ValueError(
            f"output folder {out} already holds a run ({', '.join(existing)}); "
            "choose another --out or pass --overwrite to replace it"
        )
    return existing


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Create ``out_dir``; refuse to mix runs: earlier run outputs are an error unless ``overwrite``.

    With ``overwrite`` only anomalens' own artifacts (``RUN_ARTIFACTS``) are removed; other files stay.
    """
    out = Path(out_dir)
    existing = check_out_dir(out, overwrite)
    for name in existing:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_resume(out_dir: str | os.PathLike, overwrite: bool = False) -> int:
    """Before any fitting: check that ``out_dir`` can be resumed (its ``scores.jsonl`` is readable; a half-written
    last line from a killed run is removed). Returns the records already there (0 for a new or overwritten run).

    Raises:
        ValueError: The folder holds a damaged record file (named, with the line), or an artifact is a link.
    """
    out = Path(out_dir)
    if overwrite or not (out / "run.json").exists():
        check_out_dir(out, overwrite=True)
        return 0
    repair_scores(out)
    return sum(1 for _ in iter_scores(out))


@contextmanager
def terminate_as_interrupt():
    """SIGTERM (a scheduler stopping the job) ends a run like Ctrl+C: ``run.json`` says "interrupted", records kept."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signal, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RunWriter:
    """Writes one run folder for any engine: ``run.json`` at the start and the end, score records streamed to
    ``scores.jsonl``, skipped inputs to ``errors.jsonl``, and ``scores.csv`` built from every record at the end.

    Use as a context manager. ``append=True`` keeps the records of an earlier run (a resumed Ray run).
    """

    def __init__(self, out: Path, manifest: dict[str, Any], *, append: bool = False):
        self.out = out
        self.manifest = manifest
        self.append = append
        self.summary = PredictSummary(threshold=manifest.get("threshold"), out_dir=out,
                                      threshold_source=manifest.get("threshold_source", "none"))  # fmt: skip

    def __enter__(self) -> RunWriter:
        atomic_write_json(self.out / "run.json", self.manifest)
        self._scores = open(self.out / "scores.jsonl", "a" if self.append else "w")
        self._errors = open(self.out / "errors.jsonl", "w")
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._scores.close()
        self._errors.close()
        if kind is not None and self.manifest.get("status") == "running":  # stopped before finish()
            interrupted = issubclass(kind, (KeyboardInterrupt, SystemExit))
            self.manifest["status"] = "interrupted" if interrupted else "failed"
            if not interrupted:
                self.manifest["error"] = f"{kind.__name__}: {error}"
            atomic_write_json(self.out / "run.json", self.manifest)

    def record(self, record: dict[str, Any]) -> None:
        """Append one scored image's record (flushed, so an interrupted run keeps it)."""
        self._scores.write(json.dumps(record) + "\n")
        self._scores.flush()

    def error(self, path: Any, reason: str) -> None:
        """Report one skipped input: ``errors.jsonl``, the summary and a warning."""
        entry = {"path": str(path), "error": reason}
        self.summary.skipped += 1
        self.summary.skipped_inputs.append(entry)
        self._errors.write(json.dumps(entry) + "\n")
        self._errors.flush()
        logger.warning("skipped %s: %s", path, reason)

    def finish(self, seconds: float, **extra: Any) -> PredictSummary:
        """Write ``scores.csv`` from every record and complete ``run.json``; returns the summary of the whole
        folder (records of an earlier, resumed run included)."""
        self._scores.flush()
        scored = flagged = 0
        buffer_path = self.out / ".scores.csv.partial"
        with open(buffer_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, lineterminator="\n")
            writer.writeheader()
            for record in iter_scores(self.out):
                writer.writerow({key: "" if record.get(key) is None else record[key] for key in CSV_FIELDS})
                scored += 1
                flagged += record.get("label") == "anomalous"
        os.replace(buffer_path, self.out / "scores.csv")
        self.summary.scored, self.summary.flagged, self.summary.seconds = scored, flagged, seconds
        self.manifest.update(status="complete", scored=scored, flagged=flagged, skipped=self.summary.skipped,
                             seconds=round(seconds, 3), **extra)  # fmt: skip
        atomic_write_json(self.out / "run.json", self.manifest)
        return self.summary


def iter_scores(out_dir: str | os.PathLike) -> Iterable[dict[str, Any]]:
    """The records of a run's ``scores.jsonl``, one at a time (memory does not grow with the run).

    Raises:
        ValueError: A line is not a JSON record (the message names the file and line).
    """
    path = Path(out_dir) / "scores.jsonl"
    if not path.exists():
        return
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield _record(line, path, number)


def _record(line: str | bytes, path: Path, number: int) -> dict[str, Any]:
    """One line of ``scores.jsonl`` as a record; a damaged one is a ``ValueError`` naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {number} is not a JSON record ({error.msg})") from None


def repair_scores(out_dir: str | os.PathLike) -> int:
    """Make ``scores.jsonl`` safe to append to after a killed run: a half-written last line is removed (a whole
    last record that only lacks its newline gets one). Returns the bytes removed.

    Raises:
        ValueError: A line before the last is damaged: that is no interrupted write, so nothing is changed.
    """
    path = Path(out_dir) / "scores.jsonl"
    if not path.exists():
        return 0
    complete, last = 0, b""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                last = line
                break
            if line.strip():
                _record(line, path, number)
            complete += len(line)
    if not last:
        return 0
    try:
        json.loads(last)
    except json.JSONDecodeError:
        with open(path, "r+b") as handle:
            handle.truncate(complete)
        logger.warning("%s: removed a half-written last record (%d bytes) left by an interrupted run", path, len(last))
        return len(last)
    with open(path, "ab") as handle:
        handle.write(b"\n")
    return 0
