"""Writing results: atomic files, heatmap overlays and raw maps."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it is to set it (and put it back at once)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file made by ``tempfile`` (mode 0600, or 0700 for a folder) the mode a plain ``open`` would have:
    0666 (0777 for a folder) less the umask, i.e. 0644/0755 under the usual umask 022."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file.

    The file gets the mode a plain ``open`` would give it (the umask applies), not the temporary file's 0600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as output:
            output.write(data)
        honour_umask(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically (``nan`` becomes ``null``)."""
    return atomic_write_text(path, json.dumps(_finite(payload), indent=2, sort_keys=False) + "\n")


def _finite(value: Any) -> Any:
    """Replace non-finite floats with ``None`` so the JSON is standard."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 RGB/gray or uint16 gray array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Map ``[0, 1]`` values to a blue-cyan-yellow-red palette, ``(..., 3)`` uint8."""
    values = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4.0 * values - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * values - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * values - 1.0), 0.0, 1.0)
    return (np.stack([red, green, blue], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def normalise_map(anomaly_map: np.ndarray, threshold: float | None) -> np.ndarray:
    """Scale a map to ``[0, 1]`` for display.

    With a threshold, the threshold sits at the middle of the palette (``map / (2 * threshold)``), so colours
    mean the same in every image of a run. Without one, the image's own min-max range is used.
    """
    if threshold is not None and threshold > 0:
        return np.clip(anomaly_map / (2.0 * threshold), 0.0, 1.0)
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    return (anomaly_map - low) / (high - low) if high > low else np.zeros_like(anomaly_map)


def heatmap_overlay(
    image: np.ndarray, anomaly_map: np.ndarray, threshold: float | None, alpha: float = 0.5
) -> np.ndarray:
    """Blend the coloured map over the ``(H, W, 3)`` uint8 image; returns ``(H, W, 3)`` uint8."""
    colours = jet_colormap(normalise_map(anomaly_map, threshold)).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def raw_map_bytes(anomaly_map: np.ndarray, raw_format: str) -> tuple[bytes, dict[str, float]]:
    """Encode a float map exactly (``npy``) or as a 16-bit PNG (``png16``) with the scale to undo it.

    For ``png16``, ``value = pixel / 65535 * scale_max`` where ``scale_max`` is returned in the metadata.
    """
    if raw_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, anomaly_map.astype(np.float32))
        return buffer.getvalue(), {}
    if raw_format == "png16":
        scale_max = float(max(anomaly_map.max(), 1e-12))
        pixels = np.clip(np.rint(np.clip(anomaly_map, 0, None) / scale_max * 65535.0), 0, 65535).astype(np.uint16)
        return png_bytes(pixels), {"map_scale_max": scale_max}
    raise ValueError(f"unknown raw map format {raw_format!r}; valid formats: npy, png16")
