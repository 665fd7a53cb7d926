"""anomalens: visual anomaly detection and localisation with foundation models.

Quick start::

    import anomalens

    detector = anomalens.create("patchcore", backbone="taef2")
    detector.fit(reference_images=["good_1.png", "good_2.png"])
    for result in detector.predict(["part_17.png"]):
        print(result.score, result.anomaly_map.shape)
"""

from anomalens.backbones.weights import WeightsNotFoundError
from anomalens.config import DetectorConfig
from anomalens.detector import AnomalyResult, Detector
from anomalens.io.images import ImageLimits, ImageLoadError, load_image
from anomalens.registry import create, get_method, list_methods, register_method

load = Detector.load  # anomalens.load(path[, map_location]): any saved detector

__version__ = "0.1.0"

__all__ = [
    "AnomalyResult",
    "Detector",
    "DetectorConfig",
    "ImageLimits",
    "ImageLoadError",
    "WeightsNotFoundError",
    "__version__",
    "create",
    "get_method",
    "list_methods",
    "load",
    "load_image",
    "register_method",
]
