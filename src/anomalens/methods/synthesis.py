"""Pseudo-anomalies for test-time adaptation: Perlin-noise masks filled with foreign texture.

A mask is a thresholded 2-D Perlin noise field (smooth, blob-shaped regions, as in DRAEM); the pasted
texture comes from another image (shuffled in tiles, so its structure no longer fits) or from procedural
noise, blended with a random opacity. Everything is driven by a ``torch.Generator``, so a seed fixes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], resolution: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """2-D gradient (Perlin) noise of ``shape`` with ``resolution`` lattice cells per axis, values in about [-1, 1]."""
    height, width = shape
    cells_y, cells_x = resolution
    padded = (math.ceil(height / cells_y) * cells_y, math.ceil(width / cells_x) * cells_x)
    angles = 2 * math.pi * torch.rand(cells_y + 1, cells_x + 1, generator=generator)
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (cy + 1, cx + 1, 2)
    ys = torch.arange(padded[0], dtype=torch.float32) * cells_y / padded[0]
    xs = torch.arange(padded[1], dtype=torch.float32) * cells_x / padded[1]
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    cell_y, cell_x = grid_y.long(), grid_x.long()
    local_y, local_x = grid_y - cell_y, grid_x - cell_x

    def corner(dy: int, dx: int) -> torch.Tensor:
        gradient = gradients[cell_y + dy, cell_x + dx]
        return gradient[..., 0] * (local_y - dy) + gradient[..., 1] * (local_x - dx)

    fade_y, fade_x = _fade(local_y), _fade(local_x)
    top = torch.lerp(corner(0, 0), corner(0, 1), fade_x)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), fade_x)
    return (math.sqrt(2) * torch.lerp(top, bottom, fade_y))[:height, :width]


def perlin_mask(
    shape: tuple[int, int], generator: torch.Generator, threshold: float = 0.5, max_scale_exponent: int = 4
) -> torch.Tensor:
    """A non-empty ``(H, W)`` mask in {0, 1} from thresholded Perlin noise at a random lattice scale.

    If the threshold leaves no pixel (rare), it is lowered to the noise's 95th percentile.
    """
    scale_y = 2 ** int(torch.randint(0, max_scale_exponent + 1, (1,), generator=generator))
    scale_x = 2 ** int(torch.randint(0, max_scale_exponent + 1, (1,), generator=generator))
    noise = perlin_noise(shape, (scale_y, scale_x), generator)
    mask = (noise > threshold).float()
    if mask.sum() == 0:
        mask = (noise >= torch.quantile(noise.flatten(), 0.95)).float()
    return mask


def procedural_texture(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``(3, H, W)`` colourful noise texture in [0, 1] built from Perlin octaves."""
    channels = []
    for _ in range(3):
        octaves = [perlin_noise(shape, (2**level, 2**level), generator) / 2**level for level in range(1, 5)]
        channels.append(torch.stack(octaves).sum(0))
    texture = torch.stack(channels)
    low = texture.amin(dim=(1, 2), keepdim=True)
    high = texture.amax(dim=(1, 2), keepdim=True)
    return (texture - low) / (high - low).clamp_min(1e-6)


def shuffled_texture(image: torch.Tensor, generator: torch.Generator, tiles: int = 4) -> torch.Tensor:
    """``(3, H, W)`` texture from ``image`` with its ``tiles x tiles`` blocks shuffled, so its structure breaks."""
    _, height, width = image.shape
    tile_h, tile_w = max(1, height // tiles), max(1, width // tiles)
    cropped = image[:, : tile_h * tiles, : tile_w * tiles]
    blocks = (
        cropped.reshape(3, tiles, tile_h, tiles, tile_w)
        .permute(1, 3, 0, 2, 4)
        .reshape(tiles * tiles, 3, tile_h, tile_w)
    )
    blocks = blocks[torch.randperm(tiles * tiles, generator=generator)]
    shuffled = (
        blocks.reshape(tiles, tiles, 3, tile_h, tile_w)
        .permute(2, 0, 3, 1, 4)
        .reshape(3, tiles * tile_h, tiles * tile_w)
    )
    return F.interpolate(shuffled[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def synthesize_anomaly(
    image: torch.Tensor,
    generator: torch.Generator,
    texture_source: torch.Tensor | None = None,
    opacity: tuple[float, float] = (0.5, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste texture into a Perlin-shaped region of ``image``.

    Args:
        image: ``(3, H, W)`` in [0, 1].
        generator: Seeds the mask, texture and opacity.
        texture_source: ``(3, H', W')`` image whose shuffled tiles give the texture; ``None`` uses procedural noise.
        opacity: Range of the blend factor of the texture inside the mask.

    Returns:
        The pseudo-anomalous image ``(3, H, W)`` in [0, 1] and its mask ``(H, W)`` in {0, 1}, never empty.
    """
    _, height, width = image.shape
    mask = perlin_mask((height, width), generator)
    if texture_source is None:
        texture = procedural_texture((height, width), generator)
    else:
        source = F.interpolate(texture_source[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        texture = shuffled_texture(source, generator)
    beta = opacity[0] + (opacity[1] - opacity[0]) * float(torch.rand(1, generator=generator))
    blended = image * (1 - beta * mask) + texture * beta * mask
    return blended.clamp(0, 1), mask
