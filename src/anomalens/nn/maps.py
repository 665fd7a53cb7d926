"""Pure tensor helpers shared by the methods' scoring: smoothing and resizing of anomaly maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (as ``scipy.ndimage``)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    radius = int(truncate * sigma + 0.5)
    positions = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, H, W)`` maps with edge replication.

    Matches ``scipy.ndimage.gaussian_filter(map, sigma, mode="nearest", truncate=truncate)`` per map.
    ``sigma == 0`` returns the maps unchanged.
    """
    if sigma == 0:
        return maps
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    kernel = gaussian_kernel1d(sigma, truncate).to(maps.device, maps.dtype)
    radius = (kernel.numel() - 1) // 2
    smoothed = maps[:, None]
    smoothed = F.conv2d(F.pad(smoothed, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    smoothed = F.conv2d(F.pad(smoothed, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return smoothed[:, 0]


def resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize an ``(h, w)`` map to ``size`` = ``(H, W)``."""
    if tuple(anomaly_map.shape[-2:]) == tuple(size):
        return anomaly_map
    return F.interpolate(anomaly_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
