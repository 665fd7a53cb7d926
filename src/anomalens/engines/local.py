"""The local engine behind ``anomalens predict``: score image files on this machine into a run folder.

The folder layout, the threshold rules and the writer are shared with the other engines: see
:mod:`anomalens.engines.core`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from anomalens.engines.core import (
    RAW_FORMATS,
    OverlayStyle,
    PredictSummary,
    RunWriter,
    collect_inputs,
    output_names,
    prepare_out_dir,
    resolve_threshold_source,
    run_manifest,
    score_batch,
    terminate_as_interrupt,
    write_result,
)
from anomalens.io.images import DEFAULT_LIMITS, ImageLimits, load_image, readable_images
from anomalens.io.outputs import overlay_scale
from anomalens.results import pool_order

if TYPE_CHECKING:
    from anomalens.detector import Detector


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
    limits: ImageLimits = DEFAULT_LIMITS,
    map_range: tuple[float, float] | None = None,
) -> PredictSummary:
    """Score every image under ``inputs`` with a fitted ``detector`` and write results to ``out_dir``.

    Unreadable inputs are reported in ``errors.jsonl`` and skipped; the run never aborts because of one
    image. Memory does not grow with the number of images: records stream to ``scores.jsonl``.

    Args:
        detector: A fitted detector.
        inputs: Image files and folders (searched recursively).
        out_dir: Output folder (see :mod:`anomalens.engines.core` for its layout).
        threshold: Score above which an image is labelled anomalous; ``None`` uses the detector's own
            threshold (e.g. from :func:`~anomalens.engines.core.leave_one_out_threshold`), if any.
        threshold_source: How the threshold was chosen, recorded in ``run.json``.
        batch_size: Images per forward pass (default: the method's).
        raw_format: ``"npy"`` (exact float32) or ``"png16"``.
        overwrite: Replace an earlier run in ``out_dir`` instead of refusing.
        write_overlays: Write the heatmap overlay PNGs.
        run_info: Extra fields for ``run.json`` (e.g. the command line).
        progress: Called with the number of images finished after each batch.
        limits: Size limits each image's header is checked against before decoding.
        map_range: The overlays' colour scale ``(low, high)``; default from the references
            (:func:`~anomalens.io.outputs.overlay_scale`), recorded in ``run.json``.

    Returns:
        A :class:`~anomalens.engines.core.PredictSummary`.
    """
    if raw_format not in RAW_FORMATS:
        raise ValueError(f"unknown raw map format {raw_format!r}; valid formats: {', '.join(RAW_FORMATS)}")
    started = time.time()
    out = prepare_out_dir(out_dir, overwrite)
    if threshold is not None:
        detector.threshold = float(threshold)
    source = resolve_threshold_source(threshold, threshold_source, detector.threshold)
    paths, roots = collect_inputs(inputs)
    names = dict(zip(paths, output_names(paths, roots)))
    if detector.pooled:  # pools are chunks: of a seeded shuffle, not of the sorted listing (see pool_order)
        paths = [paths[index] for index in pool_order(len(paths), detector.config.seed)]
    size = batch_size or detector.config.batch_size
    load = partial(load_image, limits=limits)
    style = OverlayStyle(*overlay_scale(detector, map_range))
    run_info = {**(run_info or {}), "map_scale": style.scale, "map_scale_source": style.source}
    manifest = run_manifest(detector.describe(), source, inputs, raw_format, run_info)
    with terminate_as_interrupt(), RunWriter(out, manifest) as writer:
        for start in range(0, len(paths), size):
            loaded = list(readable_images(paths[start : start + size], on_error=writer.error, load=load))
            batch_paths = [path for path, _ in loaded]
            arrays = [array for _, array in loaded]
            batch_names = [names[path] for path in batch_paths]
            for path, name, array, result in score_batch(detector, batch_paths, batch_names, arrays, writer.error):
                writer.record(write_result(out, path, name, array, result, detector, raw_format, write_overlays,
                                           style))  # fmt: skip
            if progress is not None:
                progress(min(start + size, len(paths)))
        return writer.finish(time.time() - started)
