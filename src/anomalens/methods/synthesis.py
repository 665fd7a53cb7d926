"""Pseudo-anomalies for test-time adaptation: Perlin-noise masks filled with foreign texture.

A mask is a thresholded 2-D Perlin noise field (smooth, blob-shaped regions, as in DRAEM, Zavrtanik et al.,
ICCV 2021); the pasted texture comes from a texture image (a folder such as DTD, as DRAEM uses), from
procedural multi-octave noise, or from another image (shuffled in tiles, so its structure no longer fits),
blended with a random opacity. Texture images and procedural textures pass through DRAEM-style augmentation
(three of gamma, brightness, invert, solarize, posterize, autocontrast and a channel shuffle), which makes them
strong: unlike the product, high-contrast, often in unnatural colours. Everything is driven by a
``torch.Generator``, so a seed fixes it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

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


def procedural_texture(
    shape: tuple[int, int], generator: torch.Generator, octaves: int = 4, contrast: float = 0.0
) -> torch.Tensor:
    """``(3, H, W)`` colourful noise texture in [0, 1] built from ``octaves`` Perlin octaves (2, 4, 8, ... cells).

    ``contrast > 0`` pushes each channel towards 0 and 1 through ``sigmoid(contrast * (t - 0.5))``, rescaled to
    [0, 1]: saturated colours, which differ strongly from most products.
    """
    channels = []
    for _ in range(3):
        layers = [perlin_noise(shape, (2**level, 2**level), generator) / 2**level for level in range(1, octaves + 1)]
        channels.append(torch.stack(layers).sum(0))
    texture = _stretch(torch.stack(channels))
    if contrast > 0:
        texture = _stretch(torch.sigmoid(contrast * (texture - 0.5)))
    return texture


def _stretch(texture: torch.Tensor) -> torch.Tensor:
    """Each channel of a ``(3, H, W)`` texture rescaled to span [0, 1] (autocontrast)."""
    low = texture.amin(dim=(1, 2), keepdim=True)
    high = texture.amax(dim=(1, 2), keepdim=True)
    return (texture - low) / (high - low).clamp_min(1e-6)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


TEXTURE_AUGMENTATIONS = ("gamma", "brightness", "invert", "solarize", "posterize", "autocontrast", "channels")


def augment_texture(texture: torch.Tensor, generator: torch.Generator, count: int = 3) -> torch.Tensor:
    """DRAEM-style augmentation of a ``(3, H, W)`` texture in [0, 1]: ``count`` distinct operations of
    :data:`TEXTURE_AUGMENTATIONS`, drawn and applied in a random order (DRAEM draws 3 of its imgaug list)."""
    chosen = torch.randperm(len(TEXTURE_AUGMENTATIONS), generator=generator)[:count].tolist()
    for index in chosen:
        name = TEXTURE_AUGMENTATIONS[index]
        if name == "gamma":
            texture = texture.clamp(0, 1) ** _uniform(generator, 0.5, 2.0)
        elif name == "brightness":
            texture = texture * _uniform(generator, 0.8, 1.2)
        elif name == "invert":
            texture = 1 - texture
        elif name == "solarize":
            texture = torch.where(texture > 0.5, 1 - texture, texture)
        elif name == "posterize":
            levels = 2 ** int(torch.randint(2, 5, (1,), generator=generator))
            texture = torch.floor(texture.clamp(0, 1) * (levels - 1) + 0.5) / (levels - 1)
        elif name == "autocontrast":
            texture = _stretch(texture)
        else:  # channels: a random permutation of the colour channels
            texture = texture[torch.randperm(3, generator=generator)]
    return texture.clamp(0, 1)


def texture_files(folder: str | os.PathLike) -> list[Path]:
    """The image files below ``folder`` (recursively, sorted), for :func:`synthesize_anomaly`'s textures.

    Raises:
        ValueError: ``folder`` is not a folder, or holds no image.
    """
    from anomalens.io.images import find_images

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"texture folder {str(folder)!r} is not a folder")
    files = find_images([root])
    if not files:
        raise ValueError(f"texture folder {str(folder)!r} holds no image (.png, .jpg, ...)")
    return files


def texture_from_file(path: str | os.PathLike, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A ``(3, H, W)`` texture in [0, 1]: a random square crop (at least half the shorter side) of the image at
    ``path``, resized to ``shape``."""
    from anomalens.io.images import load_image

    image = torch.from_numpy(load_image(path)).permute(2, 0, 1).float() / 255
    _, height, width = image.shape
    side = int(torch.randint(max(1, min(height, width) // 2), min(height, width) + 1, (1,), generator=generator))
    top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
    crop = image[:, top : top + side, left : left + side]
    return F.interpolate(crop[None], size=shape, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


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
    *,
    texture: torch.Tensor | None = None,
    augment: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste texture into a Perlin-shaped region of ``image``.

    Args:
        image: ``(3, H, W)`` in [0, 1].
        generator: Seeds the mask, texture and opacity.
        texture_source: ``(3, H', W')`` image whose shuffled tiles give the texture (another image of the pool).
        opacity: Range of the blend factor of the texture inside the mask.
        texture: ``(3, H', W')`` texture in [0, 1] used as it is (e.g. :func:`texture_from_file`), resized to the
            image. With neither ``texture_source`` nor ``texture``: procedural noise (:func:`procedural_texture`).
        augment: Pass the texture through :func:`augment_texture` first (DRAEM's practice); a procedural texture
            is then also saturated (``contrast=10``).

    Returns:
        The pseudo-anomalous image ``(3, H, W)`` in [0, 1] and its mask ``(H, W)`` in {0, 1}, never empty.
    """
    _, height, width = image.shape
    mask = perlin_mask((height, width), generator)
    if texture_source is not None:
        source = F.interpolate(texture_source[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        fill = shuffled_texture(source, generator)
    elif texture is not None:
        fill = F.interpolate(texture[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    else:  # augmented: saturated (contrast 10), as strong as DRAEM's texture images
        fill = procedural_texture((height, width), generator, contrast=10.0 if augment else 0.0)
    if augment:
        fill = augment_texture(fill, generator)
    beta = opacity[0] + (opacity[1] - opacity[0]) * float(torch.rand(1, generator=generator))
    blended = image * (1 - beta * mask) + fill * beta * mask
    return blended.clamp(0, 1), mask
