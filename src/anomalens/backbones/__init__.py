"""The feature-backbone registry for memory-bank and feature-difference methods (PatchCore, VLMDiff).

One file per backbone family: ``cnn`` (torchvision and timm extractors), ``taef2``, ``clip`` (open_clip),
``diffusion`` (Stable Diffusion parts), ``text`` (caption encoders); ``weights`` resolves and checks checkpoints.

Each backbone is described by a :class:`BackboneSpec`: how to build it, which layers it exposes and
at which stride, its input normalisation, and the registered weights it loads. Nothing about a
backbone is hard-coded in the methods that use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from anomalens.backbones.cnn import (
    TimmViTFeatures,
    TorchvisionFeatures,
    load_taef2,
    load_timm,
    load_torchvision,
    load_vgg16_bn,
)
from anomalens.backbones.taef2 import TAEF2_STRIDES, TAEF2Features
from anomalens.backbones.weights import read_checkpoint, resolve

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a feature backbone and read its pretrained weights."""

    name: str  # registry key
    build: Callable[[tuple[str, ...]], nn.Module]  # layers -> random-init module returning one map per layer
    strides: dict[str, int]  # every extractable layer and its stride relative to the input
    default_layers: tuple[str, ...]  # the layers used by default (PatchCore: two mid-level stages)
    weights: str  # registered component (a kind='file' entry of anomalens.backbones.sources.SOURCES)
    mean: tuple[float, float, float]  # input normalisation (images arrive in [0, 1])
    std: tuple[float, float, float]
    load_weights: Callable[[nn.Module, dict[str, torch.Tensor], str], None]  # (module, state dict, source)


_RESNET_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def _resnet(architecture: str) -> BackboneSpec:
    return BackboneSpec(
        name=architecture,
        build=partial(TorchvisionFeatures, architecture),  # picklable, unlike a lambda
        strides=_RESNET_STRIDES,
        default_layers=("layer2", "layer3"),
        weights=architecture,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        load_weights=load_torchvision,
    )


BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": _resnet("wide_resnet50_2"),
    "resnet18": _resnet("resnet18"),
    "taef2": BackboneSpec(
        name="taef2",
        build=TAEF2Features,
        strides=TAEF2_STRIDES,
        default_layers=("block9", "block13"),
        weights="taef2_encoder",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        load_weights=load_taef2,
    ),
    "vgg16_bn": BackboneSpec(
        name="vgg16_bn",
        build=partial(TorchvisionFeatures, "vgg16_bn"),
        strides={"features.5": 1, "features.12": 2, "features.22": 4, "features.32": 8, "features.42": 16},
        default_layers=("features.22", "features.32"),
        weights="vgg16_bn",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        load_weights=load_vgg16_bn,
    ),
    "dino_vits8": BackboneSpec(
        name="dino_vits8",
        build=partial(TimmViTFeatures, "vit_small_patch8_224.dino"),
        strides={**{f"block{index}": 8 for index in range(12)}, "norm": 8},  # norm: block11 + final LayerNorm
        default_layers=("block11",),
        weights="dino_vits8",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        load_weights=load_timm,
    ),
}


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


class FeatureBackbone(nn.Module):
    """A frozen backbone that normalises ``[0, 1]`` images and returns the requested layers' maps.

    Args:
        name: A name from :func:`list_backbones`.
        layers: Layer names (see the spec's ``strides``); ``None`` uses the spec's defaults.
        pretrained: ``"default"`` loads the registered weights, a path loads that checkpoint,
            ``None`` keeps the random initialisation (tests, speed measurements).
        weights_dir: Folder searched first for the registered weights.
        method_hint: The method asking, named in a missing-weights error.
        init_seed: Seeds the random initialisation (used when ``pretrained`` is ``None``), without touching
            the global random state.
    """

    def __init__(
        self,
        name: str,
        layers: tuple[str, ...] | None = None,
        pretrained: str | None = "default",
        weights_dir: str | os.PathLike | None = None,
        method_hint: str | None = None,
        init_seed: int = 0,
    ):
        super().__init__()
        self.spec = get_backbone_spec(name)
        self.layers = check_layers(name, layers) if layers else self.spec.default_layers
        self.strides = [self.spec.strides[layer] for layer in self.layers]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.model = self.spec.build(self.layers)
        if pretrained is not None:
            reference = self.spec.weights if pretrained == "default" else pretrained
            path = resolve(reference, weights_dir=weights_dir, method_hint=method_hint)
            self.spec.load_weights(self.model, read_checkpoint(path), str(path))
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)
        # oneDNN's channels-last convolutions are 10-30% faster on CPU for these CNNs, more so at batch 8
        # (tests/test_optimisations.py: the features equal the NCHW ones to float rounding).
        self.model.to(memory_format=torch.channels_last)
        self.model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureBackbone:
        """The backbone stays in eval mode (frozen batch-norm statistics)."""
        super().train(mode)
        self.model.eval()
        return self

    def __setstate__(self, state: dict) -> None:
        # Copies and unpickled backbones stay in eval mode too: torch.fx's GraphModule (torchvision's feature
        # extractors) comes back from deepcopy with every sub-module in training mode, so batch norm would use
        # and overwrite batch statistics.
        super().__setstate__(state)
        self.model.eval()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` in [0, 1] to ``[(B, C_l, H/s_l, W/s_l) for each layer l]`` (channels-last strides)."""
        return self.model(((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last))
