"""The method registry: ``create``, ``list_methods``, ``load`` and ``register_method``.

Built-in methods are listed by import path and imported on first use, so ``import anomalens``
stays light. Third-party methods register their class with :func:`register_method`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from anomalens.config import build_config
from anomalens.detector import TENSORS_FILE, Detector, config_from_saved

_BUILTIN_METHODS: dict[str, str] = {
    "patchcore": "anomalens.methods.patchcore:PatchCore",
    "winclip": "anomalens.methods.winclip:WinCLIP",
    "dual_image_clip": "anomalens.methods.dual_image_clip:DualImageCLIP",
    "clipfusion": "anomalens.methods.clipfusion:CLIPFusion",
    "vlmdiff": "anomalens.methods.vlmdiff:VLMDiff",
}
_REGISTERED: dict[str, type[Detector]] = {}


def register_method(cls: type[Detector]) -> type[Detector]:
    """Register a :class:`Detector` subclass under its ``method_name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Detector)) or not cls.method_name:
        raise ValueError(f"{cls!r} must be a Detector subclass with a method_name")
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
    return cls(build_config(cls.config_class, config, method=method), weights_dir=weights_dir)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Detector:
    """Load a detector saved with :meth:`Detector.save`, checking every tensor's name and shape."""
    from safetensors.torch import load_file

    from anomalens.weights import load_state_dict_checked

    meta = config_from_saved(path)
    cls = get_method(meta["method"])
    config = build_config(cls.config_class, meta["config"], method=meta["method"])
    detector = cls(config, load_pretrained=False)
    state = load_file(str(Path(path) / TENSORS_FILE), device="cpu")
    load_state_dict_checked(detector, state, source=str(path))
    detector.class_name = meta.get("class_name")
    detector.threshold = meta.get("threshold")
    return detector.to(map_location)
