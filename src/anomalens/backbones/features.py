"""The frozen feature backbone every memory-bank and feature-difference method runs (:mod:`anomalens.backbones.specs`
says which exist)."""

from __future__ import annotations

import os

import torch
from torch import nn

from anomalens.backbones.specs import check_layers, get_backbone_spec
from anomalens.backbones.weights import read_checkpoint, resolve


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
