"""Export a fitted detector to ONNX (or OpenVINO), to run without torch (:mod:`anomalens.runtime`).

``detector.export(out_dir)`` / ``anomalens export --detector DIR --format onnx --out DIR`` traces the method's
graph (:meth:`export_spec`): a ``(B, 3, S, S)`` batch of resized, normalised images to the ``(B, S, S)`` anomaly
map at the model's resolution and the ``(B,)`` image score, with everything fitted (memory banks, the class's text
embeddings) baked in as constants. Pre- and post-processing (resize, normalisation, the map back to the image,
thresholds, masks, overlays) are the runtime's, in numpy. The export is verified before it is written: the
ONNX model and the torch detector score the same random batch, and the largest difference is recorded.

Which methods export:

- ``patchcore`` (every backbone): the nearest-neighbour search is the memory module's own chunked matmul + top-k
  over the bank (memory bounded by the chunk, not the bank), then the exact distance of the chosen neighbour;
  the Gaussian smoothing and Eq. 7's re-weighting are in the graph.
- ``winclip`` / WinCLIP+: the image side (global, window and patch passes, few-shot memories); the text
  embeddings of the fitted class are constants, so an export serves one class.
- ``dual_image_clip``: not exported. Its images are scored against each other (a pool of variable size, test
  images as each other's references) and its test-time adaptation takes gradient steps on every pool.
- ``clipfusion``: not exported. The diffusion branch samples noise, installs attention processors to read the
  UNet's cross-attention, and the SD VAE + UNet (about 3.4 GB in float32) exceed ONNX's 2 GB protobuf limit
  without external data; its CLIP branch alone would be another method (WinCLIP exports that kind).
- ``vlmdiff``: not exported. Scoring runs a DDIM reconstruction loop (VAE encoder, several UNet steps,
  caption-conditioned) per image, with a captioning VLM when test captions are used.
- ``ensemble``: not exported (each member would be its own graph; export the members).
- ``tiling``: not exported in-graph; export the detector without tiling.

A method exports by implementing ``export_spec()`` returning an :class:`ExportSpec` and setting its class
attribute ``cannot_export = None``; one that cannot sets ``cannot_export`` to the reason, which the error quotes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from anomalens.config import config_to_dict
from anomalens.io.outputs import honour_umask, sha256_file
from anomalens.registry import get_method, list_methods
from anomalens.runtime import EXPORT_FORMAT, EXPORT_VERSION, METADATA_FILE, open_session

if TYPE_CHECKING:
    from anomalens.detector import Detector

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
@dataclass
class ExportSpec:
    """What a method exports: its graph and the preprocessing the runtime repeats."""

    graph: nn.Module  # (B, 3, S, S) float32 -> ((B, S, S) anomaly map, (B,) score)
    input_size: int  # S
    resize: str  # antialiased filter the torch path resizes with: "bilinear" or "bicubic"
    resize_mode: str = "resize"  # "resize" (squash to the square) or "crop" (shorter side, centre crop)
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # normalisation before the graph
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


class PixelsGraph(nn.Module):
    """Wraps a method's ``pixels -> (scores, maps)`` function as the exported module ``pixels -> (maps, scores)``."""

    def __init__(self, detector: nn.Module, score_pixels: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.detector = detector
        self.score_pixels = score_pixels

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = self.score_pixels(pixels)
        return maps.float(), scores.float()


def export_detector(
    detector: Detector,
    out_dir: str | os.PathLike,
    *,
    format: str = "onnx",
    batch_size: int = 1,
    opset: int = 17,
    tolerance: float = 1e-4,
    overwrite: bool = False,
) -> Path:
    """Export a fitted detector (see the module docstring); returns the output folder.

    Args:
        detector: A fitted detector of an exportable method, float32.
        out_dir: Folder to write ``model.onnx`` (or ``model.xml`` + ``model.bin``) and ``metadata.json`` to.
        format: ``"onnx"`` or ``"openvino"`` (needs ``pip install 'anomalens[openvino]'``).
        batch_size: The graph's fixed batch size (the runtime pads the last batch).
        opset: ONNX opset.
        tolerance: Largest difference allowed between the exported and the torch maps on the check batch.
        overwrite: Replace an earlier export in ``out_dir``.

    Raises:
        ValueError: Not fitted, a method that cannot be exported (the message says why), tiling, an unknown
            format, an existing export without ``overwrite``, or an export that differs from torch by more than
            ``tolerance``.
        ImportError: onnx / onnxruntime / openvino missing; the message gives the install command.
    """
    target = Path(out_dir)
    _check_exportable(detector, format, batch_size, target, overwrite)
    detector = detector.float().eval()
    spec = detector.export_spec()
    example = torch.rand(batch_size, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0))
    example = (example - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model_file, backend, difference = _write_model(spec, example, staging, format, opset, tolerance)
        for item in staging.iterdir():
            honour_umask(item)
        metadata = _metadata(detector, spec, model_file, backend, batch_size, opset, difference, staging)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        honour_umask(staging / METADATA_FILE)
        honour_umask(staging, directory=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s detector to %s (max |difference| %.2e)", detector.method_name, target, difference)
    return target


def _check_exportable(detector: Detector, format: str, batch_size: int, target: Path, overwrite: bool) -> None:
    """Refuse, before any work, what cannot be exported (each reason in the message)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid formats: {', '.join(FORMATS)}")
    if not detector.is_fitted:
        raise ValueError(f"{detector.method_name} detector is not fitted: fit it (and set its threshold) first")
    if detector.cannot_export is not None:
        exportable = [name for name in list_methods() if get_method(name).cannot_export is None]
        raise ValueError(f"method {detector.method_name!r} cannot be exported: {detector.cannot_export}; "
                         f"exportable: {', '.join(exportable)}")  # fmt: skip
    if detector.config.tiling is not None:
        raise ValueError("a tiled detector cannot be exported yet: export it with tiling=None")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"output folder {target} is not empty; choose another --out or pass --overwrite")
    _require("onnx", "onnx")
    _require("onnxruntime", "onnxruntime")


def _write_model(spec: ExportSpec, example: torch.Tensor, staging: Path, format: str, opset: int,
                 tolerance: float) -> tuple[str, str, float]:  # fmt: skip
    """Trace ``spec.graph`` to ONNX in ``staging`` (then OpenVINO if asked), verified against torch on
    ``example``; returns ``(model file, backend, largest difference)``."""
    onnx_path = staging / "model.onnx"
    with torch.inference_mode(False), torch.no_grad(), _without_mha_fastpath(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on constants (fitted state is constant by design)
        expected_maps, expected_scores = spec.graph(example.clone())
        torch.onnx.export(spec.graph, (example,), str(onnx_path), input_names=["pixels"],
                          output_names=["anomaly_map", "score"], opset_version=opset, dynamo=False,
                          do_constant_folding=True)  # fmt: skip
    expected = (example.numpy(), expected_maps.numpy(), expected_scores.numpy())
    difference = _verify(onnx_path, *expected)
    if difference > tolerance:
        raise ValueError(f"the exported graph differs from the torch detector by {difference:.2e} (> {tolerance})")
    if format != "openvino":
        return "model.onnx", "onnx", difference
    model_file = _to_openvino(onnx_path, staging)
    difference = max(difference, _verify_openvino(staging / model_file, *expected))
    if difference > tolerance:
        raise ValueError(f"the OpenVINO model differs from the torch detector by {difference:.2e}")
    return model_file, "openvino", difference


@contextmanager
def _without_mha_fastpath():
    """nn.MultiheadAttention's inference fast path (``_native_multi_head_attention``, in open_clip's ViTs) has no
    ONNX export; the plain path computes the same. Switched off for the export only, then restored."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _require(module: str, package: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ImportError(f"exporting needs {package}: pip install 'anomalens[export]'") from None


def _verify(onnx_path: Path, pixels: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got_maps, got_scores = session.run(["anomaly_map", "score"], {"pixels": pixels})
    return float(max(np.abs(got_maps - maps).max(), np.abs(got_scores - scores).max()))


def _verify_openvino(model_path: Path, pixels: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> float:
    outputs = open_session(model_path, "openvino")(pixels)
    return float(max(np.abs(outputs["anomaly_map"] - maps).max(), np.abs(outputs["score"] - scores).max()))


def _to_openvino(onnx_path: Path, staging: Path) -> str:
    try:
        import openvino
    except ImportError:
        raise ImportError("exporting to OpenVINO needs openvino: pip install 'anomalens[openvino]'") from None
    model = openvino.convert_model(str(onnx_path))
    openvino.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
    onnx_path.unlink()
    return "model.xml"


def _metadata(detector: Detector, spec: ExportSpec, model_file: str, backend: str, batch_size: int, opset: int,
              difference: float, staging: Path) -> dict[str, Any]:  # fmt: skip
    from anomalens import __version__

    described = detector.describe()
    files = sorted(item.name for item in staging.iterdir())
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "backend": backend,
        "model_file": model_file,
        "sha256": sha256_file(staging / model_file),
        "files_sha256": {name: sha256_file(staging / name) for name in files},
        **{key: described[key] for key in ("method", "config", "config_hash", "class_name")},
        **detector.calibration.to_dict(),
        "config": {**config_to_dict(detector.config), "batch_size": batch_size},
        "fingerprint": detector.fingerprint(),
        "zero_shot": bool(detector.zero_shot and not detector.calibration.held_out_scores),
        "input_size": spec.input_size,
        "batch_size": batch_size,
        "resize": spec.resize,
        "resize_mode": spec.resize_mode,
        "normalisation": {"mean": spec.mean, "std": spec.std},
        "outputs": {"anomaly_map": f"(B, {spec.input_size}, {spec.input_size}) at the model's resolution",
                    "score": "(B,) image score"},  # fmt: skip
        "opset": opset,
        "verified_max_abs_difference": difference,
        "anomalens_version": __version__,
        "torch_version": torch.__version__,
    }
