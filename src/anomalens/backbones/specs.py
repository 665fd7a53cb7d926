"""The feature-backbone registry (PatchCore's and VLMDiff's backbones), readable without torch.

Each backbone is a :class:`BackboneSpec`: how to build it, which layers it exposes and at which stride, its input
normalisation, and the registered weights it loads. Builders and weight loaders are named by import path
(``"module:attribute"``), so listing and validating backbones imports no network code; a third party adds a
backbone with :func:`register_backbone` (callables are accepted as well as paths).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TAEF2_STRIDES = {"block1": 1, "block5": 2, "block9": 4, "block13": 8, "latent": 8}


def resolve_object(target: str | Callable) -> Callable:
    """``"module:attribute"`` imported (a callable is returned as it is)."""
    if callable(target):
        return target
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a feature backbone and read its pretrained weights."""

    name: str  # registry key
    builder: str | Callable  # "module:attribute" (or a callable) making the random-init module: builder(*args, layers)
    strides: dict[str, int]  # every extractable layer and its stride relative to the input
    default_layers: tuple[str, ...]  # the layers used by default (PatchCore: two mid-level stages)
    weights: str  # registered component (a kind="file" entry of anomalens.backbones.sources.SOURCES)
    mean: tuple[float, float, float]  # input normalisation (images arrive in [0, 1])
    std: tuple[float, float, float]
    loader: str | Callable  # "module:attribute" (or a callable) loading a state dict: loader(module, state, source)
    builder_args: tuple[Any, ...] = ()  # leading arguments of the builder (an architecture name)

    def build(self, layers: tuple[str, ...]) -> Any:
        """The random-init module returning one map per layer."""
        return resolve_object(self.builder)(*self.builder_args, layers)

    def load_weights(self, module: Any, state: dict, source: str) -> None:
        """Load ``state`` into a module :meth:`build` made, checking every key and shape."""
        resolve_object(self.loader)(module, state, source)


_RESNET_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
_TORCHVISION = "anomalens.backbones.cnn:TorchvisionFeatures"


def _resnet(architecture: str) -> BackboneSpec:
    return BackboneSpec(architecture, _TORCHVISION, _RESNET_STRIDES, ("layer2", "layer3"), architecture,
                        IMAGENET_MEAN, IMAGENET_STD, "anomalens.backbones.cnn:load_torchvision", (architecture,))


BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": _resnet("wide_resnet50_2"),
    "resnet18": _resnet("resnet18"),
    "taef2": BackboneSpec("taef2", "anomalens.backbones.taef2:TAEF2Features", TAEF2_STRIDES, ("block9", "block13"),
                          "taef2_encoder", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "anomalens.backbones.cnn:load_taef2"),
    "vgg16_bn": BackboneSpec(
        "vgg16_bn", _TORCHVISION, {"features.5": 1, "features.12": 2, "features.22": 4, "features.32": 8,
                                   "features.42": 16}, ("features.22", "features.32"), "vgg16_bn", IMAGENET_MEAN,
        IMAGENET_STD, "anomalens.backbones.cnn:load_vgg16_bn", ("vgg16_bn",),
    ),
    "dino_vits8": BackboneSpec(
        "dino_vits8", "anomalens.backbones.cnn:TimmViTFeatures",
        {**{f"block{index}": 8 for index in range(12)}, "norm": 8},  # norm: block11 + final LayerNorm
        ("block11",), "dino_vits8", IMAGENET_MEAN, IMAGENET_STD, "anomalens.backbones.cnn:load_timm",
        ("vit_small_patch8_224.dino",),
    ),
}  # fmt: skip


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (``--backbone NAME`` and ``FeatureBackbone(NAME)`` accept it from then on)."""
    BACKBONES[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of the available feature backbones."""
    return sorted(BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of backbone ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(list_backbones())}")
    return BACKBONES[name]


def check_layers(backbone: str, layers: Sequence[str] | None, option: str = "layers") -> tuple[str, ...] | None:
    """Validate a config's layer names for ``backbone``; returns them as a tuple (``None`` stays ``None``).

    Raises:
        ValueError: Unknown backbone, or an empty / unknown layer list; the message lists the valid layers.
    """
    spec = get_backbone_spec(backbone)
    if layers is None:
        return None
    layers = tuple(layers)
    unknown = [layer for layer in layers if layer not in spec.strides]
    if not layers or unknown:
        raise ValueError(
            f"{option} {list(layers)} invalid for backbone {backbone!r}; valid layers: {', '.join(spec.strides)}"
        )
    return layers
