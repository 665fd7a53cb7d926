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


def images_to_tensor(images: list, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Stack ``(H, W, 3)`` uint8 arrays into ``(B, 3, size, size)`` float in ``[0, 1]``.

    Each image is resized on its own (antialiased ``mode``: bilinear or bicubic), so sizes and aspect ratios
    may differ; maps computed on the square grid are resized back to each image's geometry by the detector.
    """
    tensors = []
    for image in images:
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0)
        if tensor.shape[-2:] != (size, size):
            tensor = F.interpolate(tensor, size=(size, size), mode=mode, antialias=True, align_corners=False)
        tensors.append(tensor)
    return torch.cat(tensors).clamp_(0.0, 1.0)
