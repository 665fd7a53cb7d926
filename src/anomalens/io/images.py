"""Image input: any PNG, JPEG, BMP or TIFF, returned as an RGB ``uint8`` array.

Grayscale, palette, RGBA, 16-bit, float, CMYK and EXIF-rotated images are all normalised to
``(H, W, 3)`` uint8 in display orientation. A file that cannot be read raises
:class:`ImageLoadError`, a ``ValueError`` whose message names the file.

Before any pixel is decoded, the header's width, height, pixel count and the memory the whole pipeline will
need for that image (decoding, the RGB copy, the float tensor of the resize, the full-size anomaly map and the
overlay) are checked against :class:`ImageLimits`; a file over a limit is refused with its numbers, so no
input, however small on disk, can exhaust memory. Every entry point (API, ``predict``, Ray, ``serve``) reads
images through :func:`load_image` / :func:`load_image_bytes`.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anomalens.checks import check_options

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
"""What the API accepts as an image: a path, a PIL image, or an ``(H, W)``/``(H, W, C)`` array."""


class ImageLoadError(ValueError):
    """An input could not be read as an image; ``source`` names it.

    ``kind`` says why, for callers that answer differently: ``empty``, ``format`` (not an accepted image
    type), ``size`` (over :class:`ImageLimits`) or ``unreadable`` (missing, corrupt, truncated).
    """

    def __init__(self, source: str, reason: str, kind: str = "unreadable"):
        super().__init__(f"cannot read image {source}: {reason}")
        self.source = source
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class ImageLimits:
    """What one input image may cost; checked from the header, before decoding."""

    max_pixels: int = 40_000_000  # width * height
    max_side: int = 65_535  # the longest side, in pixels
    max_memory_bytes: int = 2 * 2**30  # estimated peak memory of the whole pipeline for this image

    def __post_init__(self) -> None:
        check_options("image limits", self, {
            name: (isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)
                   and getattr(self, name) >= 1, "a positive integer")
            for name in ("max_pixels", "max_side", "max_memory_bytes")
        })  # fmt: skip


DEFAULT_LIMITS = ImageLimits()
# Bytes per decoded sample of a PIL mode (before conversion to RGB); modes not listed count 4.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3, "LA": 2, "PA": 2, "I;16": 2,
               "I;16B": 2, "I;16L": 2, "I": 4, "F": 4, "LAB": 3, "HSV": 3, "RGBX": 4, "RGBa": 4, "La": 2}  # fmt: skip
# Per pixel after decoding: RGB copy (3) + RGBA compositing (8) + float32 tensor for the resize (12) +
# float32 anomaly map (4) + its normalised float64 copy (8) + overlay: colours, image and blend as float32 (36)
# and uint8 (3).
_PIPELINE_BYTES_PER_PIXEL = 64


def estimate_memory(width: int, height: int, mode: str = "RGB") -> int:
    """Estimated peak bytes that loading and scoring one ``width`` x ``height`` image of PIL ``mode`` needs
    (the model's own activations, which do not depend on the image size, excluded)."""
    return width * height * (_MODE_BYTES.get(mode, 4) + _PIPELINE_BYTES_PER_PIXEL)


def check_image_size(source: str, width: int, height: int, mode: str = "RGB",
                     limits: ImageLimits = DEFAULT_LIMITS) -> None:  # fmt: skip
    """Refuse an image whose size breaks ``limits``; raises :class:`ImageLoadError` with the numbers."""
    if width <= 0 or height <= 0:
        raise ImageLoadError(source, f"zero-size image {width}x{height}")
    if max(width, height) > limits.max_side:
        raise ImageLoadError(source, f"{width}x{height}: a side exceeds the limit of {limits.max_side} pixels", "size")
    if width * height > limits.max_pixels:
        raise ImageLoadError(
            source, f"{width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}", "size"
        )
    needed = estimate_memory(width, height, mode)
    if needed > limits.max_memory_bytes:
        raise ImageLoadError(
            source,
            f"{width}x{height} (mode {mode}) would need about {needed / 2**20:.0f} MiB to score, over the limit "
            f"of {limits.max_memory_bytes / 2**20:.0f} MiB",
            "size",
        )


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer or float pixel data of any depth to uint8."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit data (also stored by PIL as int32 "I" mode): scale by the container's range.
        maximum = 65535 if array.max(initial=0) > 255 or array.dtype in (np.uint16, np.int32) else 255
        return np.clip(np.rint(array.astype(np.float64) * (255.0 / maximum)), 0, 255).astype(np.uint8)
    array = array.astype(np.float64)
    finite = np.isfinite(array)
    if not finite.all():
        array = np.where(finite, array, 0.0)
    high = array.max(initial=0.0)
    scale = 255.0 if high <= 1.0 else 255.0 / high
    return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to ``(H, W, 3)`` uint8."""
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        gray = _scale_to_uint8(np.asarray(image, dtype=np.uint16))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(image))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        # Composite on black: transparent regions carry no part to inspect.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def array_to_rgb(array: np.ndarray, source: str = "<array>", limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Normalise an ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` array to RGB uint8."""
    if not isinstance(array, np.ndarray):
        raise ImageLoadError(source, f"expected a numpy array, got {type(array).__name__}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageLoadError(source, f"array shape {array.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    check_image_size(source, int(array.shape[1]), int(array.shape[0]), limits=limits)
    array = _scale_to_uint8(array)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        array = np.rint(array[:, :, :3].astype(np.float32) * alpha).astype(np.uint8)
    return np.ascontiguousarray(array)


def load_image(image: ImageLike, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Read one image as RGB.

    Args:
        image: A file path, a PIL image or a numpy array.
        limits: Size limits, checked from the header before decoding.

    Returns:
        ``(H, W, 3)`` uint8 array in display orientation (EXIF rotation applied).

    Raises:
        ImageLoadError: The file is missing, empty, not an image, corrupt, of zero size or over ``limits``.
    """
    if isinstance(image, np.ndarray):
        return array_to_rgb(image, limits=limits)
    if isinstance(image, Image.Image):
        check_image_size("<PIL image>", image.width, image.height, image.mode, limits)
        return _pil_to_rgb(image)
    if not isinstance(image, (str, os.PathLike)):
        raise ImageLoadError(repr(image)[:80], f"unsupported input type {type(image).__name__}")
    path = Path(image)
    if not path.exists():
        raise ImageLoadError(str(path), "no such file")
    if path.is_dir():
        raise ImageLoadError(str(path), "is a directory")
    if not path.is_file():  # a device (/dev/zero), a FIFO: reading it could block or never end
        raise ImageLoadError(str(path), "not a regular file")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageLoadError(str(path), f"file of {size} bytes exceeds the limit of {MAX_FILE_BYTES} bytes", "size")
        data = path.read_bytes()
    except OSError as error:
        raise ImageLoadError(str(path), f"cannot read ({error})") from None
    return load_image_bytes(data, str(path), limits)


MAX_FILE_BYTES = 2**30  # an encoded image file larger than this is refused before it is read
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "MPO")  # as PIL names them (MPO: multi-picture JPEG)


def probe_image(data: bytes, source: str, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[str, int, int, str]:
    """Read only the header of an encoded image and check it: ``(format, width, height, mode)``.

    Raises:
        ImageLoadError: Empty, not a PNG/JPEG/BMP/TIFF by its content, or over ``limits``.
    """
    if not data:
        raise ImageLoadError(source, "empty file (0 bytes)", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limits apply instead
            with Image.open(io.BytesIO(data)) as probe:
                kind, (width, height), mode = probe.format, probe.size, probe.mode
    except UnidentifiedImageError:
        raise ImageLoadError(source, "not a recognised image format (PNG, JPEG, BMP or TIFF)", "format") from None
    except Image.DecompressionBombError as error:  # PIL's own hard cap, far above ours, hit while opening
        declared = re.search(r"\((\d+) pixels\)", str(error))
        count = declared.group(1) if declared else "too many"
        raise ImageLoadError(
            source, f"the header declares {count} pixels, which exceeds the limit of {limits.max_pixels}", "size"
        ) from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as error:
        raise ImageLoadError(source, f"corrupt image header ({error})") from None
    if kind not in ACCEPTED_FORMATS:
        raise ImageLoadError(source, f"image type {kind} is not accepted; use PNG, JPEG, BMP or TIFF", "format")
    check_image_size(source, width, height, mode, limits)
    return kind, width, height, mode


def load_image_bytes(data: bytes, source: str, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, BMP, TIFF) held in memory; errors name ``source``.

    The header is checked against ``limits`` (:func:`probe_image`) before any pixel is decoded.
    """
    probe_image(data, source, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                return _pil_to_rgb(opened)
    except (OSError, ValueError, SyntaxError, struct.error, EOFError, MemoryError) as error:
        raise ImageLoadError(source, f"corrupt or truncated image ({error})") from None


def image_source(image: Any) -> str:
    """A short name for an image input, for messages and records."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, np.ndarray):
        return f"<array {tuple(image.shape)}>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.width}x{image.height}>"
    return f"<{type(image).__name__}>"


def find_images(inputs: Iterable[str | os.PathLike], *, recursive: bool = True) -> list[Path]:
    """Expand files and folders into a sorted, de-duplicated list of image files.

    Folders contribute the files whose extension is one of :data:`IMAGE_EXTENSIONS` (case-insensitive);
    files named explicitly are kept whatever their extension, so that a bad one is reported, not ignored.

    Raises:
        ValueError: An input path does not exist.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            candidates = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists():
            candidates = [path]
        else:
            raise ValueError(f"input {str(path)!r} does not exist")
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    return found


def load_mask(path: str | os.PathLike, shape: Sequence[int]) -> np.ndarray:
    """Read a ground-truth mask as a boolean ``(H, W)`` array (non-zero = anomalous).

    Raises:
        ValueError: The mask cannot be read or its size differs from the image's ``shape`` (H, W).
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            mask = (
                np.asarray(opened.convert("L")) > 0 if opened.mode not in ("I", "I;16", "F") else np.asarray(opened) > 0
            )
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ValueError(f"cannot read mask {path}: {error}") from None
    if tuple(mask.shape) != tuple(shape[:2]):
        raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}")
    return mask


def images_to_tensor(images: list, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Stack ``(H, W, 3)`` uint8 arrays into ``(B, 3, size, size)`` float in ``[0, 1]``.

    Each image is resized on its own (antialiased ``mode``: bilinear or bicubic), so sizes and aspect ratios
    may differ; maps computed on the square grid are resized back to each image's geometry by the detector.
    """
    import torch  # here, so that reading images needs no torch
    import torch.nn.functional as F

    tensors = []
    for image in images:
        pixels = torch.from_numpy(image) if image.flags.writeable else torch.tensor(image)  # read-only: copy, quietly
        tensor = pixels.permute(2, 0, 1)[None].float().div_(255.0)
        height, width = tensor.shape[-2:]
        if (height, width) != (size, size):
            # Shrink the longer side first: resizing both at once widens a 1-pixel-wide strip of height H to an
            # (H, size) intermediate, size/3 times the image's own memory (6.7 GB for a 1 x 2,500,000 PNG).
            steps = [(size, width), (size, size)] if height >= width else [(height, size), (size, size)]
            for step in steps:
                if tuple(tensor.shape[-2:]) != step:
                    tensor = F.interpolate(tensor, size=step, mode=mode, antialias=True, align_corners=False)
        tensors.append(tensor)
    return torch.cat(tensors).clamp_(0.0, 1.0)


def readable_images(
    paths: Iterable[Any],
    kind: str = "image",
    on_error: Callable[[Any, str], None] | None = None,
    load: Callable[[Any], np.ndarray] | None = None,
) -> Iterator[tuple[Any, np.ndarray]]:
    """``(path, (H, W, 3) uint8 image)`` for each of ``paths`` that loads; the others are reported and skipped.

    The one "load or report" loop of the library: ``on_error(path, reason)`` gets each failure (default: a
    warning naming the file, its ``kind`` and the reason); ``load`` reads one path (default :func:`load_image`;
    the Ray engine passes its URI reader) and raises :class:`ImageLoadError` for a bad one.
    """
    for path in paths:
        try:
            image = (load or load_image)(path)
        except ImageLoadError as error:
            if on_error is None:
                logger.warning("skipped %s %s: %s", kind, path, error.reason)
            else:
                on_error(path, error.reason)
            continue
        yield path, image
