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


BLUR_BORDERS = ("nearest", "reflect", "mirror")  # scipy.ndimage's names for the border modes


def _border_indices(length: int, radius: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source index of each of ``length + 2 * radius`` padded positions, for a scipy.ndimage border ``mode``."""
    positions = torch.arange(-radius, length + radius, device=device)
    if mode == "nearest":  # a a a | a b c d | d d d
        return positions.clamp(0, length - 1)
    if length == 1:
        return torch.zeros_like(positions)
    if mode == "reflect":  # b a | a b c d | d c: the edge is repeated (scipy's default, half-sample symmetric)
        period = 2 * length
        folded = positions % period
        return torch.where(folded < length, folded, period - 1 - folded)
    period = 2 * (length - 1)  # mirror: c b | a b c d | c b, the edge is not repeated (torch's "reflect")
    folded = positions % period
    return torch.where(folded < length, folded, period - folded)


def gaussian_blur(
    maps: torch.Tensor, sigma: float, truncate: float = 4.0, border: str = "nearest", separable: bool = True
) -> torch.Tensor:
    """Gaussian smoothing of ``(B, H, W)`` maps.

    Matches ``scipy.ndimage.gaussian_filter(map, sigma, mode=border, truncate=truncate)`` per map. ``border``:
    "nearest" (edge values repeated), "reflect" (scipy's default: mirrored with the edge repeated) or "mirror"
    (mirrored about the edge, which is torch's and kornia's "reflect"). ``sigma == 0`` returns the maps unchanged.
    ``separable=False`` convolves once with the 2-D kernel (the outer product, normalised) as anomalib's
    ``GaussianBlur2d`` does: the same result up to float32 rounding, and that rounding too; slower for large sigma.
    """
    if sigma == 0:
        return maps
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    if border not in BLUR_BORDERS:
        raise ValueError(f"unknown blur border {border!r}; valid: {', '.join(BLUR_BORDERS)}")
    kernel = gaussian_kernel1d(sigma, truncate).to(maps.device, maps.dtype)
    radius = (kernel.numel() - 1) // 2
    smoothed = maps[:, None]
    if not separable:
        # float32 throughout, in kornia's order (anomalib's GaussianBlur2d): exp(-x^2 / (2 sigma^2)) normalised,
        # the outer product normalised again, so the kernel matches theirs to the last bit
        offsets = torch.arange(2 * radius + 1, dtype=torch.float32, device=maps.device) - radius
        gauss = torch.exp(-offsets.pow(2.0) / (2 * torch.tensor(float(sigma), device=maps.device).pow(2.0)))
        gauss = gauss / gauss.sum()
        kernel2d = gauss[:, None] * gauss.view(1, -1)
        kernel2d = (kernel2d / kernel2d.abs().sum()).to(maps.dtype)[None, None]
        height, width = maps.shape[-2:]
        rows = _border_indices(height, radius, border, maps.device)
        columns = _border_indices(width, radius, border, maps.device)
        return F.conv2d(smoothed.index_select(2, rows).index_select(3, columns), kernel2d)[:, 0]
    if border == "nearest":
        smoothed = F.conv2d(F.pad(smoothed, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
        smoothed = F.conv2d(F.pad(smoothed, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
        return smoothed[:, 0]
    height, width = maps.shape[-2:]
    columns = _border_indices(width, radius, border, maps.device)
    smoothed = F.conv2d(smoothed.index_select(3, columns), kernel.view(1, 1, 1, -1))
    rows = _border_indices(height, radius, border, maps.device)
    smoothed = F.conv2d(smoothed.index_select(2, rows), kernel.view(1, 1, -1, 1))
    return smoothed[:, 0]


def resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize an ``(h, w)`` map to ``size`` = ``(H, W)``."""
    if tuple(anomaly_map.shape[-2:]) == tuple(size):
        return anomaly_map
    return F.interpolate(anomaly_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
