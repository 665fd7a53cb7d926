"""Run an exported detector without torch: numpy, Pillow and onnxruntime (or OpenVINO) only.

``anomalens export`` (:mod:`anomalens.export`) writes a folder::

    model.onnx       the graph: a (B, 3, S, S) normalised image batch -> the (B, S, S) anomaly map at the model's
                     resolution and the (B,) image score (memory banks and text embeddings baked in as constants)
    metadata.json    method, config and its hash, input size, resize and normalisation, thresholds and their
                     source, colour scale, anomalens version, and the SHA-256 of the model file

This module does the rest, as the torch path does it: each image is resized to ``S x S`` with the same
antialiased filter (:func:`resize_axis`, torch's separable kernel re-implemented), normalised, scored in batches,
and its map resized back to the image (half-pixel bilinear, as ``torch.nn.functional.interpolate``). A model whose
SHA-256 differs from the metadata's is refused.

    from anomalens.runtime import ExportedDetector
    detector = ExportedDetector.load("bottle-onnx")
    results = detector.predict(["part.png"])  # anomalens.AnomalyResult, as from a torch detector

Command line (torch-free, :mod:`anomalens.cli.runtime`): ``anomalens-runtime predict bottle-onnx incoming/ --out
runs/today`` writes the same run folder as ``anomalens predict`` (which itself uses this runtime for an exported
folder).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from anomalens.io.images import ImageLike, image_source, load_image
from anomalens.io.outputs import read_format_file, sha256_file
from anomalens.results import AnomalyResult, pool_order
from anomalens.thresholds import Calibrated, Calibration

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "anomalens-exported"
EXPORT_VERSION = 1
METADATA_FILE = "metadata.json"
BACKENDS = ("onnx", "openvino")


def is_exported(path: Any) -> bool:
    """Whether ``path`` is a folder written by ``anomalens export``."""
    try:
        meta = Path(path) / METADATA_FILE
        return meta.is_file() and json.loads(meta.read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------------- resizing
def _filter(kind: str):
    if kind == "bilinear":
        return lambda x: np.clip(1.0 - np.abs(x), 0.0, None), 2
    if kind == "bicubic":
        a = -0.5  # torch's antialiased bicubic (and PIL's) use a = -0.5

        def cubic(x):
            x = np.abs(x)
            near = ((a + 2) * x - (a + 3)) * x * x + 1
            far = (((x - 5) * x + 8) * x - 4) * a
            return np.where(x < 1, near, np.where(x < 2, far, 0.0))

        return cubic, 4
    raise ValueError(f"unknown resize filter {kind!r}; valid: bilinear, bicubic")


def antialias_weights(size_in: int, size_out: int, kind: str) -> np.ndarray:
    """``(size_out, size_in)`` weights of torch's antialiased ``interpolate`` along one axis (``align_corners``
    False): a ``kind`` filter stretched by the scale when shrinking, each row normalised."""
    function, taps = _filter(kind)
    scale = size_in / size_out
    support = taps / 2 * scale if scale >= 1.0 else taps / 2
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((size_out, size_in), dtype=np.float64)
    for index in range(size_out):
        center = scale * (index + 0.5)
        start = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), size_in)
        positions = np.arange(start, stop)
        row = function((positions - center + 0.5) * inverse)
        total = row.sum()
        weights[index, start:stop] = row / total if total != 0 else row
    return weights


def bilinear_weights(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` weights of plain bilinear ``interpolate`` (half-pixel centres, no antialiasing)."""
    scale = np.float32(size_in / size_out)  # float32 arithmetic, as torch's CPU kernel for float maps
    weights = np.zeros((size_out, size_in), dtype=np.float64)
    for index in range(size_out):
        source = max(np.float32(scale * np.float32(index + 0.5) - np.float32(0.5)), np.float32(0.0))
        low = min(int(math.floor(source)), size_in - 1)
        high = min(low + 1, size_in - 1)
        fraction = np.float32(source - np.float32(low))
        weights[index, low] += 1.0 - fraction
        weights[index, high] += fraction
    return weights


def resize_axis(array: np.ndarray, size: int, axis: int, kind: str) -> np.ndarray:
    """Resize ``array`` along ``axis`` to ``size`` with torch's antialiased ``kind`` filter (float32 result)."""
    if array.shape[axis] == size:
        return array
    weights = antialias_weights(array.shape[axis], size, kind).astype(np.float32)
    moved = np.moveaxis(array, axis, 0)
    resized = np.tensordot(weights, moved, axes=(1, 0))
    return np.moveaxis(resized, 0, axis).astype(np.float32, copy=False)


def preprocess(image: np.ndarray, size: int, kind: str, mode: str, mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:  # fmt: skip
    """One ``(H, W, 3)`` uint8 image to the ``(3, size, size)`` float32 model input, as the torch path makes it:
    ``mode="resize"`` squashes it (the longer side first), ``"crop"`` resizes the shorter side and centre-crops;
    then clipped to [0, 1] and normalised with ``mean`` / ``std``."""
    pixels = image.astype(np.float32) / 255.0
    height, width = pixels.shape[:2]
    if mode == "crop":
        scale = size / min(height, width)
        target = (max(size, round(height * scale)), max(size, round(width * scale)))
        pixels = resize_axis(resize_axis(pixels, target[1], 1, kind), target[0], 0, kind)
        top, left = (target[0] - size) // 2, (target[1] - size) // 2
        pixels = pixels[top : top + size, left : left + size]
    elif height >= width:
        pixels = resize_axis(resize_axis(pixels, size, 0, kind), size, 1, kind)
    else:
        pixels = resize_axis(resize_axis(pixels, size, 1, kind), size, 0, kind)
    pixels = np.clip(pixels, 0.0, 1.0)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def restore_map(anomaly_map: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """An ``(S, S)`` map back onto its ``(H, W)`` image: bilinear (``"resize"``), or for ``"crop"`` onto the
    centred square it came from, edges replicated outside."""
    height, width = size
    if mode == "crop":
        side = min(height, width)
        square = restore_map(anomaly_map, (side, side), "resize")
        top, left = (height - side) // 2, (width - side) // 2
        return np.pad(square, ((top, height - side - top), (left, width - side - left)), mode="edge")
    if anomaly_map.shape == (height, width):
        return anomaly_map.astype(np.float32, copy=False)
    rows = bilinear_weights(anomaly_map.shape[0], height)
    columns = bilinear_weights(anomaly_map.shape[1], width)
    return (rows @ anomaly_map.astype(np.float64) @ columns.T).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- the model
class ExportedDetector(Calibrated):
    """A detector exported by ``anomalens export``, run by onnxruntime (or OpenVINO); no torch needed.

    It has the parts of :class:`~anomalens.detector.Detector` the batch commands use: ``predict``,
    ``predict_arrays``, ``calibration`` (and its ``threshold``, ``pixel_threshold``, ...), ``describe()``.
    """

    few_shot = False  # an exported detector cannot be refitted: fit (and threshold) before exporting
    zero_shot = False
    is_fitted = True

    def __init__(self, folder: Path, metadata: dict[str, Any], session: Any, backend: str):
        self.folder = folder
        self.metadata = metadata
        self.session = session
        self.backend = backend
        self.method_name = metadata["method"]
        self.config_hash = metadata["config_hash"]
        self.config = SimpleNamespace(**metadata["config"])
        self.class_name = metadata.get("class_name")
        self.calibration = Calibration.from_dict(metadata)
        self.zero_shot = bool(metadata.get("zero_shot", False))
        self.pooled = False
        self.stage_seconds: dict[str, float] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | None = None, threads: int | None = None) -> ExportedDetector:
        """Open an exported folder, checking its format and the model file's SHA-256.

        ``threads`` caps the inference threads (default: the backend's own choice, all cores).

        Raises:
            ValueError: Not an exported folder, a newer format, or a model file whose hash differs from
                ``metadata.json`` (changed or damaged after export).
            ImportError: onnxruntime (or openvino) is not installed; the message gives the install command.
        """
        folder = Path(path)
        meta_path = folder / METADATA_FILE
        if not meta_path.is_file():
            raise ValueError(f"{folder} is not an exported anomalens detector (no {METADATA_FILE})")
        metadata = read_format_file(meta_path, EXPORT_FORMAT, EXPORT_VERSION)
        backend = backend or metadata.get("backend", "onnx")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
        model_path = folder / metadata["model_file"]
        if not model_path.is_file():
            raise ValueError(f"{folder}: the model file {metadata['model_file']} is missing")
        expected = {**metadata.get("files_sha256", {}), metadata["model_file"]: metadata["sha256"]}
        for name, wanted in expected.items():  # the model and its weights file (OpenVINO's model.bin)
            if name == METADATA_FILE:
                continue
            digest = sha256_file(folder / name) if (folder / name).is_file() else "missing"
            if digest != wanted:
                raise ValueError(
                    f"{folder / name} does not match {METADATA_FILE} (SHA-256 {digest[:16]}..., expected "
                    f"{wanted[:16]}...): the model was changed or damaged after export; export it again"
                )
        return cls(folder, metadata, open_session(model_path, backend, threads), backend)

    def describe(self) -> dict[str, Any]:
        keys = ("method", "config", "config_hash", "class_name")
        return {**{key: self.metadata.get(key) for key in keys}, **self.calibration.to_dict(), "fitted": True,
                "exported": True, "backend": self.backend, "model_sha256": self.metadata["sha256"]}  # fmt: skip

    def fit(self, *args: Any, **kwargs: Any) -> ExportedDetector:
        raise ValueError(
            f"{self.folder} is an exported {self.method_name} detector: it cannot be refitted; fit the torch "
            "detector on the references and export it again"
        )

    def predict(self, images: Sequence[ImageLike] | ImageLike, batch_size: int | None = None) -> list[AnomalyResult]:
        """Score images (paths, PIL images or arrays); one :class:`~anomalens.results.AnomalyResult` each."""
        if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        size = batch_size or self.config.batch_size
        results: list[AnomalyResult] = []
        for start in range(0, len(images), size):
            chunk = images[start : start + size]
            arrays = [load_image(image) for image in chunk]
            results.extend(self.predict_arrays(arrays, [image_source(image) for image in chunk]))
        return results

    def predict_arrays(self, arrays: Sequence[np.ndarray], sources: Sequence[str] | None = None) -> list[AnomalyResult]:
        """Score loaded ``(H, W, 3)`` uint8 arrays as one batch."""
        if not arrays:
            return []
        meta = self.metadata
        batch = np.stack([preprocess(array, meta["input_size"], meta["resize"], meta["resize_mode"],
                                     meta["normalisation"]["mean"], meta["normalisation"]["std"])
                          for array in arrays])  # fmt: skip
        maps, scores = self._run(batch)
        results = []
        for index, array in enumerate(arrays):
            full = restore_map(maps[index], array.shape[:2], meta["resize_mode"])
            score = float(scores[index])
            results.append(AnomalyResult(score=score, anomaly_map=full, label=self.calibration.label(score),
                                         threshold=self.calibration.threshold, source=sources[index] if sources else "",
                                         pixel_threshold=self.calibration.pixel_threshold))  # fmt: skip
        return results

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph on ``batch``, in chunks of its fixed batch size (the last one padded with zeros)."""
        size = int(self.metadata.get("batch_size", 1))
        all_maps, all_scores = [], []
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            count = len(chunk)
            if count < size:
                chunk = np.concatenate([chunk, np.zeros((size - count, *chunk.shape[1:]), dtype=chunk.dtype)])
            if self.backend == "onnx":
                maps, scores = self.session.run(["anomaly_map", "score"], {"pixels": chunk})
            else:
                outputs = self.session(chunk)
                maps, scores = outputs["anomaly_map"], outputs["score"]
            all_maps.append(np.asarray(maps, dtype=np.float32)[:count])
            all_scores.append(np.asarray(scores, dtype=np.float32).reshape(-1)[:count])
        return np.concatenate(all_maps), np.concatenate(all_scores)


def open_session(model_path: Path, backend: str, threads: int | None = None) -> Any:
    """An inference session over an exported model file: OpenVINO's compiled model or onnxruntime's session."""
    if backend == "openvino":
        try:
            import openvino
        except ImportError:
            raise ImportError(
                "running an OpenVINO export needs openvino: pip install 'anomalens[openvino]'"
            ) from None
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU plugin defaults to bf16 where it can
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        return openvino.Core().compile_model(str(model_path), "CPU", config)
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("running an exported detector needs onnxruntime: pip install 'anomalens[runtime]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


__all__ = ["ExportedDetector", "is_exported", "open_session", "pool_order", "preprocess", "restore_map", "resize_axis"]
