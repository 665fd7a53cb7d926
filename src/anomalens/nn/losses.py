"""Segmentation losses shared by the methods' training and test-time adaptation."""

from __future__ import annotations

import torch


def focal_loss(probabilities: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (Lin et al., 2017) of probabilities against soft targets in [0, 1] (any equal shapes)."""
    probabilities = probabilities.clamp(1e-6, 1 - 1e-6)
    positive = -targets * (1 - probabilities) ** gamma * torch.log(probabilities)
    negative = -(1 - targets) * probabilities**gamma * torch.log(1 - probabilities)
    return (positive + negative).mean()


def dice_loss(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft dice loss of ``(B, N)`` probabilities against ``(B, N)`` targets in [0, 1] (smoothed by 1)."""
    intersection = (probabilities * targets).sum(1)
    return (1 - (2 * intersection + 1) / (probabilities.sum(1) + targets.sum(1) + 1)).mean()
