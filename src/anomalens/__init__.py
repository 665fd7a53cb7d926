"""anomalens: visual anomaly detection and localisation with foundation models.

Quick start::

    import anomalens

    detector = anomalens.create("patchcore", backbone="taef2")
    detector.fit(reference_images=["good_1.png", "good_2.png"])
    for result in detector.predict(["part_17.png"]):
        print(result.score, result.anomaly_map.shape)
"""

from anomalens.detector import AnomalyResult, Detector
from anomalens.images import ImageLoadError, load_image
from anomalens.registry import create, get_method, list_methods, load, register_method
from anomalens.weights import WeightsNotFoundError

__version__ = "0.1.0"

__all__ = [
    "AnomalyResult",
    "Detector",
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
