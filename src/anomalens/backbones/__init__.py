"""Backbones: the feature-backbone registry and every pretrained component the methods load.

One file per backbone family: ``cnn`` (torchvision and timm extractors), ``taef2``, ``clip`` (open_clip),
``diffusion`` (Stable Diffusion parts), ``text`` (caption encoders); ``specs`` is the registry of feature backbones
(torch-free), ``features`` the :class:`FeatureBackbone` module, ``sources`` the table of default weight sources and
``weights`` the resolver and checked loader.

Nothing about a backbone is hard-coded in the methods that use it. Importing this package imports no network code;
:class:`FeatureBackbone` (torch) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from anomalens.backbones.specs import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    check_layers,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)

__all__ = ["BACKBONES", "IMAGENET_MEAN", "IMAGENET_STD", "BackboneSpec", "FeatureBackbone", "check_layers",
           "get_backbone_spec", "list_backbones", "register_backbone"]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name == "FeatureBackbone":
        from anomalens.backbones.features import FeatureBackbone

        return FeatureBackbone
    raise AttributeError(f"module 'anomalens.backbones' has no attribute {name!r}")
