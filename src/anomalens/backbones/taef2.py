"""TAEF2: the tiny autoencoder for the FLUX.2 latent space (madebyollin/taesd, MIT licence).

Written from the architecture's description: 3x3 convolutions, residual blocks (some with a
pooled 1x1 branch), three stride-2 downsamplings in the encoder and three nearest-neighbour
upsamplings in the decoder. Module indices equal the upstream state-dict prefixes, so the real
``taef2_encoder.pth`` / ``taef2_decoder.pth`` load with every key checked.

Inputs are RGB in ``[0, 1]``, ``(B, 3, H, W)``; the latent is ``(B, 32, H/8, W/8)``.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_channels: int, out_channels: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class TAEBlock(nn.Module):
    """``relu(convs(h) + h)`` with ``h = x + pool(x)`` when the block has a pooled branch, else ``h = x``."""

    def __init__(self, channels: int = 64, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(), _conv(channels, channels)
        )
        self.pool = (
            nn.Sequential(
                nn.Conv2d(channels, 4 * channels, 1, bias=False),
                nn.GroupNorm(4, 4 * channels),
                nn.ReLU(),
                nn.Conv2d(4 * channels, channels, 1, bias=False),
            )
            if pool
            else None
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = features + self.pool(features) if self.pool is not None else features
        return torch.relu(self.conv(hidden) + hidden)


class _SoftClamp(nn.Module):
    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return 3.0 * torch.tanh(latent / 3.0)


def taef2_encoder(channels: int = 64, latent_channels: int = 32) -> nn.Sequential:
    """The encoder; ``channels`` below 64 gives a smaller random-init variant for tests."""
    c = channels
    return nn.Sequential(
        _conv(3, c),  # 0
        TAEBlock(c),  # 1: full resolution
        _conv(c, c, stride=2, bias=False),  # 2
        TAEBlock(c), TAEBlock(c), TAEBlock(c),  # 3-5: 1/2
        _conv(c, c, stride=2, bias=False),  # 6
        TAEBlock(c), TAEBlock(c), TAEBlock(c),  # 7-9: 1/4
        _conv(c, c, stride=2, bias=False),  # 10
        TAEBlock(c, pool=True), TAEBlock(c, pool=True), TAEBlock(c, pool=True),  # 11-13: 1/8
        _conv(c, latent_channels),  # 14: latent
    )  # fmt: skip


def taef2_decoder(channels: int = 64, latent_channels: int = 32) -> nn.Sequential:
    """The decoder: ``(B, 32, h, w)`` latent to ``(B, 3, 8h, 8w)`` RGB in about ``[0, 1]``."""
    c = channels
    return nn.Sequential(
        _SoftClamp(),  # 0
        _conv(latent_channels, c),  # 1
        nn.ReLU(),  # 2
        TAEBlock(c, pool=True), TAEBlock(c, pool=True), TAEBlock(c, pool=True),  # 3-5
        nn.Upsample(scale_factor=2),  # 6
        _conv(c, c, bias=False),  # 7
        TAEBlock(c), TAEBlock(c), TAEBlock(c),  # 8-10
        nn.Upsample(scale_factor=2),  # 11
        _conv(c, c, bias=False),  # 12
        TAEBlock(c), TAEBlock(c), TAEBlock(c),  # 13-15
        nn.Upsample(scale_factor=2),  # 16
        _conv(c, c, bias=False),  # 17
        TAEBlock(c),  # 18
        _conv(c, 3),  # 19
    )  # fmt: skip


TAEF2_LAYERS = {"block1": 1, "block5": 5, "block9": 9, "block13": 13, "latent": 14}
"""Named encoder outputs: 64 channels at strides 1, 2, 4, 8, and the 32-channel latent at stride 8."""


class TAEF2Features(nn.Module):
    """Runs the TAEF2 encoder only as far as the deepest requested layer and returns those outputs."""

    def __init__(self, layers: tuple[str, ...], channels: int = 64):
        super().__init__()
        self.layer_indices = [TAEF2_LAYERS[name] for name in layers]
        self.encoder = taef2_encoder(channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` in [0, 1] to one ``(B, C, H/s, W/s)`` map per requested layer."""
        outputs: dict[int, torch.Tensor] = {}
        features = images
        last = max(self.layer_indices)
        for index, module in enumerate(self.encoder):
            features = module(features)
            if index in self.layer_indices:
                outputs[index] = features
            if index == last:
                break
        return [outputs[index] for index in self.layer_indices]
