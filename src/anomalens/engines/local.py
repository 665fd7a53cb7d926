"""The local engine behind ``anomalens predict``: score a :class:`~anomalens.engines.request.PredictRequest` on
this machine into a run folder (:mod:`anomalens.engines.run_folder`, shared with the other engines).

Example:
    >>> from anomalens.engines.local import run_predict
    >>> from anomalens.engines.request import OutputSettings, PredictRequest
    >>> request = PredictRequest.prepare(["incoming/"], OutputSettings(out="runs/today"))  # doctest: +SKIP
    >>> print(run_predict(detector, request.calibrated(detector)).line())  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from anomalens.engines.request import PredictRequest
from anomalens.engines.run_folder import (
    PredictSummary,
    RunWriter,
    prepare_out_dir,
    score_batch,
    terminate_as_interrupt,
    write_result,
)
from anomalens.io.images import load_image, readable_images
from anomalens.results import pool_order


def run_predict(detector: Any, request: PredictRequest, progress: Callable[[int], Any] | None = None,
                on_record: Callable[[dict, Any], Any] | None = None) -> PredictSummary:
    """Score every image of ``request`` with a fitted ``detector`` and write the run folder.

    Unreadable inputs are reported in ``errors.jsonl`` and skipped; the run never aborts because of one image.
    Memory does not grow with the number of images: records stream to ``scores.jsonl``. The request's calibration
    is the run's: the detector scores with it.

    Args:
        detector: A fitted detector (torch, or exported: :class:`anomalens.runtime.ExportedDetector`).
        request: What to score and write, calibrated (:meth:`PredictRequest.calibrated`).
        progress: Called with the number of images finished after each batch.
        on_record: Called with each image's score record and result after it is written (``predict --record``
            writes it to a station's history); an exception it raises stops the run.

    Returns:
        A :class:`~anomalens.engines.run_folder.PredictSummary`.
    """
    detector.calibration = request.checked_calibration()
    started = time.time()
    out = prepare_out_dir(request.out, request.settings.overwrite)
    images = list(request.images)
    if detector.pooled:  # pools are chunks: of a seeded shuffle, not of the sorted listing (see pool_order)
        images = [images[index] for index in pool_order(len(images), detector.config.seed)]
    names = {Path(path): name for path, name in images}
    size = request.batch_size or detector.config.batch_size
    load = partial(load_image, limits=request.settings.limits)
    identity = (detector.method_name, detector.config_hash)
    settings = request.settings
    with terminate_as_interrupt(), RunWriter(out, request.manifest(detector.describe())) as writer:
        for start in range(0, len(images), size):
            batch = [Path(path) for path, _ in images[start : start + size]]
            loaded = list(readable_images(batch, on_error=writer.error, load=load))
            paths, arrays = [path for path, _ in loaded], [array for _, array in loaded]
            for path, name, array, result in score_batch(detector, paths, [names[path] for path in paths], arrays,
                                                         writer.error):  # fmt: skip
                record = write_result(out, path, name, array, result, identity, settings.raw_format,
                                      settings.overlays, request.map_scale)  # fmt: skip
                writer.record(record)
                if on_record is not None:
                    on_record(record, result)
            if progress is not None:
                progress(min(start + size, len(images)))
        return writer.finish(time.time() - started)
