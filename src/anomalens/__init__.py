"""anomalens: visual anomaly detection and localisation with foundation models.

Quick start::

    import anomalens

    detector = anomalens.create("patchcore", backbone="taef2")
    detector.fit(reference_images=["good_1.png", "good_2.png"])
    for result in detector.predict(["part_17.png"]):
        print(result.score, result.anomaly_map.shape)

The names below are imported on first use, so ``import anomalens`` is light and the torch-free runtime
(:mod:`anomalens.runtime`, for exported detectors) works where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {  # public name -> (module, attribute)
    "AnomalyResult": ("anomalens.results", "AnomalyResult"),
    "Calibration": ("anomalens.thresholds", "Calibration"),
    "Detector": ("anomalens.detector", "Detector"),
    "DetectorConfig": ("anomalens.config", "DetectorConfig"),
    "DriftMonitor": ("anomalens.drift", "DriftMonitor"),
    "ImageLimits": ("anomalens.io.images", "ImageLimits"),
    "ImageLoadError": ("anomalens.io.images", "ImageLoadError"),
    "TileConfig": ("anomalens.tiling", "TileConfig"),
    "WeightsNotFoundError": ("anomalens.backbones.weights", "WeightsNotFoundError"),
    "create": ("anomalens.registry", "create"),
    "get_method": ("anomalens.registry", "get_method"),
    "list_methods": ("anomalens.registry", "list_methods"),
    "load_image": ("anomalens.io.images", "load_image"),
    "register_dataset": ("anomalens.io.datasets", "register_dataset"),
    "register_method": ("anomalens.registry", "register_method"),
    "ThresholdOptions": ("anomalens.thresholds", "ThresholdOptions"),
}

# The parts of the package, lowest first: each imports only from the rows before it (tests/test_architecture.py
# checks every import, function-level ones included). ``anomalens/__init__.py`` itself only names things lazily.
LAYERS = (
    ("checks", "results"),  # the validation helper; what every method returns
    ("io",),  # images, datasets, output files
    ("tiling",),  # tiles and stitching
    ("config", "thresholds", "drift"),  # method configs; threshold rules, options and the Calibration; drift tests
    ("runtime",),  # exported detectors without torch
    ("nn", "distributed"),  # torch building blocks; data-parallel training (torch.distributed under torchrun)
    ("backbones",),  # pretrained networks, their registry and weight sources
    ("registry",),  # method names to classes (imported by path on first use)
    ("persistence", "export"),  # saving and loading; ONNX / OpenVINO export
    ("detector", "updates"),  # the Detector base class; taking new normal images in (Detector.update)
    ("methods",),  # the methods
    ("engines",),  # predict requests, run folders, the local and Ray engines, the server
    ("station",),  # many products: versioned models, the history, hot folders, webhooks, the review server
    ("evaluation",),  # benchmarks, metrics, speed
    ("cli",),  # the command lines
)

__all__ = [*_LAZY, "LAYERS", "__version__", "load"]

def load(path: Any, map_location: Any = "cpu") -> Any:
    """Load any saved detector (``Detector.load``); an exported one (``anomalens export``) loads through the
    torch-free runtime (:class:`anomalens.runtime.ExportedDetector`)."""
    from anomalens.runtime import is_exported

    if is_exported(path):
        from anomalens.runtime import ExportedDetector

        return ExportedDetector.load(path)
    from anomalens.detector import Detector

    return Detector.load(path, map_location=map_location)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'anomalens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
