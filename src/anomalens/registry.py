"""The method registry: ``create``, ``list_methods``, ``get_method`` and ``register_method``.

Built-in methods are listed by import path and imported on first use, so ``import anomalens``
stays light. Third-party methods register their class with :func:`register_method`. Loading a saved
detector is :meth:`anomalens.detector.Detector.load` (the registry imports no detector code).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from anomalens.config import DetectorConfig, build_config

if TYPE_CHECKING:
    from anomalens.detector import Detector

_BUILTIN_METHODS: dict[str, str] = {
    "patchcore": "anomalens.methods.patchcore:PatchCore",
    "winclip": "anomalens.methods.winclip:WinCLIP",
    "dual_image_clip": "anomalens.methods.dual_image_clip:DualImageCLIP",
    "clipfusion": "anomalens.methods.clipfusion.model:CLIPFusion",
    "vlmdiff": "anomalens.methods.vlmdiff.detector:VLMDiff",
    "ensemble": "anomalens.methods.ensemble:Ensemble",
}
_REGISTERED: dict[str, type[Detector]] = {}


def register_method(cls: type[Detector]) -> type[Detector]:
    """Register a :class:`Detector` subclass under its ``method_name`` (usable as a class decorator)."""
    from torch import nn

    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "_predict_batch")):
        raise ValueError(f"{cls!r} must be a Detector subclass (anomalens.Detector)")
    if not cls.method_name:
        raise ValueError(f"{cls.__name__} needs a method_name (the name create() and the CLI use)")
    if not (isinstance(cls.config_class, type) and issubclass(cls.config_class, DetectorConfig)):
        raise ValueError(
            f"{cls.__name__}.config_class must be a dataclass subclassing anomalens.config.DetectorConfig, "
            f"got {cls.config_class!r}"
        )
    _REGISTERED[cls.method_name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of all available methods, sorted."""
    return sorted(set(_BUILTIN_METHODS) | set(_REGISTERED))


def get_method(name: str) -> type[Detector]:
    """The detector class registered as ``name``.

    Raises:
        ValueError: Unknown name; the message lists the valid ones.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN_METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}")
    module_name, class_name = _BUILTIN_METHODS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    _REGISTERED[name] = cls
    return cls


def create(method: str, *, weights_dir: str | os.PathLike | None = None, **config: Any) -> Detector:
    """Build a detector.

    Args:
        method: A name from :func:`list_methods`.
        weights_dir: Folder searched first for pretrained weights (else ``ANOMALENS_WEIGHTS_DIR``, the cache,
            then a download on connected machines).
        **config: Fields of the method's config dataclass; unknown names raise an error listing valid ones.

    Returns:
        An unfitted :class:`Detector`; call ``fit`` next.
    """
    cls = get_method(method)
    detector = cls(build_config(cls.config_class, config, method=method), weights_dir=weights_dir)
    return detector.to(detector.config.device)
