"""Distributed batch scoring on Ray: ``anomalens predict --engine ray`` and :func:`score`.

- The driver lists the inputs (local files and folders, or any URI pyarrow can open: ``s3://``, ``gs://``,
  ``abfs://``, ``hdfs://``, ``file://``) and gives every image the same output name the local engine would.
- Ray Data carries the path list; ``map_batches`` runs an actor pool. Each actor loads the fitted detector
  once, from a saved detector folder or an object-store reference, and requests a (fractional) GPU when the
  cluster has one.
- Actors read, score and write each image's overlay and raw map; the driver streams the records into
  ``scores.jsonl`` / ``errors.jsonl`` and, at the end, writes ``scores.parquet`` and ``scores.csv``. The layout
  is every engine's (see :mod:`anomalens.engines.run_folder`, whose writer it uses), plus the Parquet file.
- Resume: a re-run into the same folder with the same detector skips the images already in ``scores.jsonl``
  and scores the rest. A different method or config, other references (the fitted state's fingerprint), another
  threshold or raw map format is refused, naming what differs. A half-written last record (a killed run) is
  removed first. Ctrl+C or SIGTERM ends the run with ``run.json`` marked "interrupted". Unreadable images are
  recorded with their error and retried on the next run; they never fail the job.
- Each actor that Ray gives a GPU moves its detector onto it.
- The output folder must be reachable by every node (a shared file system on a real cluster).

Ray is optional: ``pip install 'anomalens[ray]'``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from anomalens.detector import Detector
from anomalens.engines.request import PredictRequest
from anomalens.engines.run_folder import (
    RECORD_COLUMNS,
    PredictSummary,
    RunWriter,
    collect_inputs,
    iter_scores,
    output_names,
    prepare_out_dir,
    repair_scores,
    score_batch,
    terminate_as_interrupt,
    write_result,
)
from anomalens.io.images import (
    DEFAULT_LIMITS,
    IMAGE_EXTENSIONS,
    MAX_FILE_BYTES,
    ImageLimits,
    ImageLoadError,
    load_image,
    load_image_bytes,
    readable_images,
)
from anomalens.io.outputs import honour_umask, sha256_file
from anomalens.persistence import TENSORS_FILE, config_from_saved
from anomalens.registry import get_method
from anomalens.thresholds import Calibration

logger = logging.getLogger(__name__)

INSTALL_HINT = "the Ray engine needs Ray: pip install 'anomalens[ray]' (or pip install 'ray[data]>=2.30')"


def require_ray():
    """Import Ray, or raise an ``ImportError`` that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return ray


def _is_uri(entry: str) -> bool:
    return "://" in entry


def list_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """``(path or URI, output name)`` for every image under ``inputs``, named as the local engine names them."""
    local = [entry for entry in inputs if not _is_uri(str(entry))]
    pairs: list[tuple[str, str]] = []
    if local:
        paths, roots = collect_inputs(local)
        pairs += [(str(path), name) for path, name in zip(paths, output_names(paths, roots))]
    for uri in (str(entry) for entry in inputs if _is_uri(str(entry))):
        import pyarrow.fs as pafs

        filesystem, base = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise ValueError(f"input {uri!r} does not exist")
        if info.type == pafs.FileType.File:
            files = [base]
        else:
            selector = pafs.FileSelector(base, recursive=True)
            files = sorted(
                item.path
                for item in filesystem.get_file_info(selector)
                if item.type == pafs.FileType.File and Path(item.path).suffix.lower() in IMAGE_EXTENSIONS
            )
        prefix = uri[: len(uri) - len(base)] if uri.endswith(base) else uri.split("://", 1)[0] + "://"
        names = output_names(
            [Path(f) for f in files], [Path(base) if info.type != pafs.FileType.File else None] * len(files)
        )
        pairs += [(prefix + file, name) for file, name in zip(files, names)]
    return pairs


def _read(path: str, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    if not _is_uri(path):
        return load_image(path, limits)
    import pyarrow.fs as pafs

    try:
        filesystem, inner = pafs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            data = stream.read(MAX_FILE_BYTES + 1)  # bounded, as for local files
    except OSError as error:
        raise ImageLoadError(path, f"cannot read ({error})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageLoadError(path, f"file exceeds the limit of {MAX_FILE_BYTES} bytes", "size")
    return load_image_bytes(data, path, limits)


class _Scorer:
    """A Ray Data actor: loads the detector once, then scores batches of ``{"path", "name"}`` rows as the
    request says (the request's calibration is the run's)."""

    def __init__(self, detector: Any, request: PredictRequest, out_dir: str, threads: int):
        import ray
        import torch

        import anomalens

        torch.set_num_threads(max(1, threads))
        if isinstance(detector, ray.ObjectRef):
            detector = ray.get(detector)  # once per actor, from the object store
        self.detector = anomalens.load(detector) if isinstance(detector, str) else detector
        if ray.get_gpu_ids() and torch.cuda.is_available():  # the GPU Ray gave this actor (CUDA_VISIBLE_DEVICES)
            self.detector.to("cuda")
            self.detector.config.device = "cuda"
        self.detector.calibration = request.checked_calibration()
        self.request = request
        self.out = Path(out_dir)

    def __call__(self, batch):
        import pandas as pd

        rows: list[dict[str, Any]] = []
        failed = lambda path, reason: rows.append({"path": str(path), "error": reason})  # noqa: E731
        names_of = dict(zip(batch["path"], batch["name"]))
        limits, settings = self.request.settings.limits, self.request.settings
        loaded = list(readable_images(batch["path"], on_error=failed, load=lambda path: _read(path, limits)))
        paths, arrays = [path for path, _ in loaded], [array for _, array in loaded]
        names = [names_of[path] for path in paths]
        identity = (self.detector.method_name, self.detector.config_hash)
        for path, name, array, result in score_batch(self.detector, paths, names, arrays, failed):
            record = write_result(self.out, path, name, array, result, identity, settings.raw_format,
                                  settings.overlays, self.request.map_scale)  # fmt: skip
            if "regions" in record:  # a list of dicts: JSON text through the frame, parsed back by _collect
                record["regions"] = json.dumps(record["regions"])
            rows.append({**record, "error": None})
        return pd.DataFrame([{column: row.get(column) for column in (*RECORD_COLUMNS, "error")} for row in rows])


RESUME_KEYS = {  # run.json fields a resumed run must share with the earlier one, and what they mean
    "config_hash": "method and config",
    "detector_fingerprint": "fitted state (references) or class name",
    "threshold": "threshold",
    "raw_format": "raw map format",
}


def _done_paths(out: Path, manifest: dict[str, Any], overwrite: bool) -> set[str]:
    """Paths already scored by an earlier run of the same detector in ``out`` (resume)."""
    run_file = out / "run.json"
    if overwrite or not run_file.exists():
        prepare_out_dir(out, overwrite)
        return set()
    try:
        earlier = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot resume {out}: {run_file} is unreadable ({error}); pass --overwrite") from None
    differences = [
        f"{meaning} ({earlier.get(key)!r} then, {manifest.get(key)!r} now)"
        for key, meaning in RESUME_KEYS.items()
        if earlier.get(key) != manifest.get(key)
    ]
    if differences:
        raise ValueError(
            f"output folder {out} holds a run of a different detector: {'; '.join(differences)}. Resuming would "
            "mix two detectors' scores; choose another --out or pass --overwrite"
        )
    repair_scores(out)
    done = {record["path"] for record in iter_scores(out)}
    for name in ("scores.parquet", "scores.csv", "errors.jsonl"):  # rebuilt at the end of this run
        (out / name).unlink(missing_ok=True)
    return done


def score(
    detector_or_path: Detector | str | os.PathLike,
    request: PredictRequest,
    *,
    num_workers: int = 1,
    ray_address: str | None = None,
    gpu_fraction: float | None = None,
    progress: Callable[[int], Any] | None = None,
) -> PredictSummary:
    """Score a request on a Ray cluster; writes every engine's layout plus ``scores.parquet``.

    Args:
        detector_or_path: A fitted :class:`Detector` (shipped to the actors through the object store) or the
            folder of a saved one (each actor loads it).
        request: What to score (local files and folders, and URIs pyarrow can read: prepare it with
            ``lister=list_inputs, resumable=True``) and write; its calibration is the run's (a request not yet
            calibrated takes the detector's own). Its folder, shared by all nodes, resumes an earlier run of the
            same detector there.
        num_workers: Actors in the pool.
        ray_address: Cluster to join (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); ``None`` joins the
            running one or starts a local one.
        gpu_fraction: GPUs per actor; ``None`` requests 1 when the cluster has GPUs, else 0.
        progress: Called with the number of images finished so far.

    Returns:
        A :class:`~anomalens.engines.run_folder.PredictSummary` over all images of the folder (earlier runs
        included).
    """
    ray = require_ray()
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers} must be >= 1")
    started = time.time()
    describe = _describe(detector_or_path)
    if request.calibration is None:
        view = SimpleNamespace(calibration=Calibration.from_dict(describe),
                               zero_shot=get_method(describe["method"]).zero_shot)  # fmt: skip
        request = request.calibrated(detector_or_path if isinstance(detector_or_path, Detector) else view)
    out = request.out
    manifest = request.manifest(describe)
    manifest.update(engine="ray", num_workers=num_workers, ray_address=ray_address)
    done = _done_paths(out, manifest, request.settings.overwrite)
    todo = [{"path": path, "name": name} for path, name in request.images if path not in done]
    if not ray.is_initialized():
        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    with terminate_as_interrupt(), RunWriter(out, manifest, append=True) as writer:
        if todo:
            batch_size = request.batch_size or describe["config"]["batch_size"]
            results = _scoring_dataset(ray, detector_or_path, todo, request, num_workers, batch_size, gpu_fraction)
            _collect(results, writer, progress)
        summary = writer.finish(time.time() - started, resumed_from=len(done))
    _write_parquet(out)
    return summary


def _describe(detector_or_path: Detector | str | os.PathLike) -> dict[str, Any]:
    """The detector's description and fingerprint (from the object, or a saved or exported folder's files)."""
    from anomalens.runtime import ExportedDetector, is_exported

    if not isinstance(detector_or_path, Detector) and is_exported(detector_or_path):
        exported = ExportedDetector.load(detector_or_path)
        return {**exported.describe(), "detector_fingerprint": exported.metadata["fingerprint"]}
    if isinstance(detector_or_path, Detector):
        return {**detector_or_path.describe(), "detector_fingerprint": detector_or_path.fingerprint()}
    saved = config_from_saved(detector_or_path)
    describe = {key: value for key, value in saved.items() if key not in ("format", "fingerprint", "files_sha256")}
    # A detector saved by an older version carries no fingerprint: its tensors file stands in.
    tensors = Path(detector_or_path) / TENSORS_FILE
    describe["detector_fingerprint"] = saved.get("fingerprint") or sha256_file(tensors)[:16]
    return describe


def _scoring_dataset(ray, detector_or_path, todo, request: PredictRequest, num_workers: int, batch_size: int,
                     gpu_fraction: float | None):  # fmt: skip
    """The lazy Ray dataset of score rows: the path list mapped through a pool of :class:`_Scorer` actors."""
    resources = ray.cluster_resources()
    if gpu_fraction is None:
        gpu_fraction = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    cpus = max(1, int(resources.get("CPU", 1) // num_workers))
    if isinstance(detector_or_path, Detector):
        handle: Any = ray.put(detector_or_path)
    else:
        handle = str(Path(detector_or_path).resolve())
    return ray.data.from_items(todo).map_batches(
        _Scorer,
        fn_constructor_kwargs={"detector": handle, "request": request, "out_dir": str(request.out.resolve()),
                               "threads": cpus},  # fmt: skip
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        batch_size=batch_size,
        num_cpus=cpus,
        num_gpus=gpu_fraction,
        batch_format="pandas",
    )


def _collect(results, writer: RunWriter, progress: Callable[[int], Any] | None) -> None:
    """Stream the actors' rows into the run writer: records to ``scores.jsonl``, failures to ``errors.jsonl``."""
    finished = 0
    for frame in results.iter_batches(batch_format="pandas", batch_size=None):
        for row in frame.to_dict("records"):
            row = {key: (None if _missing(value) else value) for key, value in row.items()}
            if row["error"] is not None:
                writer.error(row["path"], row["error"])
            else:
                record = {key: value for key, value in row.items() if key != "error" and value is not None}
                if isinstance(record.get("regions"), str):
                    record["regions"] = json.loads(record["regions"])
                writer.record(_plain(record))
            finished += 1
        if progress is not None:
            progress(finished)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars to Python ones, for JSON."""
    return {key: value.item() if isinstance(value, np.generic) else value for key, value in record.items()}


def _write_parquet(out: Path) -> None:
    """``scores.parquet`` from every record of the run folder, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = list(iter_scores(out))
    columns = {name: [record.get(name) for record in records] for name in RECORD_COLUMNS}
    columns["regions"] = [None if value is None else json.dumps(value) for value in columns["regions"]]  # JSON text
    handle, temporary = tempfile.mkstemp(prefix=".scores.", suffix=".parquet", dir=out)
    os.close(handle)
    pq.write_table(pa.table(columns), temporary)
    honour_umask(temporary)
    os.replace(temporary, out / "scores.parquet")
