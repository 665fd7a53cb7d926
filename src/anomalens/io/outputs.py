"""Writing results: atomic files, heatmap overlays and raw maps."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_format_file(path: Path, format_name: str, format_version: int) -> dict[str, Any]:
    """The JSON description file of a saved or exported folder, checked: its ``format`` must be ``format_name``
    and its ``format_version`` at most ``format_version`` (else a ``ValueError`` naming the file)."""
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON description ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != format_name:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {format_name!r}")
    if meta.get("format_version", 0) > format_version:
        raise ValueError(f"{path} was written by a newer anomalens (format {meta['format_version']})")
    return meta


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


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode a uint8 RGB/gray or uint16 gray array as PNG (lossless; ``compress_level`` 1 is about 2.5x faster than
    the default 6 on a 900 x 900 overlay, for a file about 7 % larger)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    """Encode a uint8 RGB/gray array as JPEG (lossy, for display: about 50x faster than PNG on an overlay). Colour is
    kept at full resolution (4:4:4), so thin coloured peaks and the white defect outline stay sharp."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Map ``[0, 1]`` values to a blue-cyan-yellow-red palette, ``(..., 3)`` uint8."""
    values = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4.0 * values - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * values - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * values - 1.0), 0.0, 1.0)
    return (np.stack([red, green, blue], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def normalise_map(anomaly_map: np.ndarray, scale: tuple[float, float] | None) -> np.ndarray:
    """Scale a map to ``[0, 1]`` for display: ``(map - low) / (high - low)`` on the fixed ``scale = (low, high)``
    (see :meth:`anomalens.thresholds.Calibration.map_scale_for`), clipped; without a scale, the map's own min-max
    range."""
    if scale is not None:
        low, high = scale
        return np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    return (anomaly_map - low) / (high - low) if high > low else np.zeros_like(anomaly_map)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask (mask pixels with a 4-neighbour outside it)."""
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


FOOTER_HEIGHT = 30  # least height in pixels of the colour bar and caption band under an annotated overlay


def footer_height(width: int) -> int:
    """Height of the band under an overlay ``width`` pixels wide: ``FOOTER_HEIGHT``, growing with wide images."""
    return max(FOOTER_HEIGHT, round(width / 16))


def heatmap_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    scale: tuple[float, float] | None = None,
    alpha: float = 0.5,
    *,
    mask: np.ndarray | None = None,
    caption: str | None = None,
    marker: float | None = None,
) -> np.ndarray:
    """Blend the coloured map over the ``(H, W, 3)`` uint8 image.

    Args:
        image: ``(H, W, 3)`` uint8.
        anomaly_map: ``(H, W)`` float map.
        scale: ``(low, high)`` fixed colour scale (:meth:`~anomalens.thresholds.Calibration.map_scale_for`);
            ``None``: the map's own min-max.
        alpha: Weight of the colours.
        mask: ``(H, W)`` bool defect mask, outlined in white.
        caption: With ``caption`` (e.g. the score), a ``FOOTER_HEIGHT`` band is added below the image: the colour
            bar from ``low`` to ``high`` with its values, a tick at ``marker`` (the pixel threshold), the caption.

    Returns:
        ``(H, W, 3)`` uint8, or ``(H + footer_height(W), W, 3)`` with a caption.
    """
    colours = jet_colormap(normalise_map(anomaly_map, scale)).astype(np.float32)
    blended = np.clip((1.0 - alpha) * image.astype(np.float32) + alpha * colours + 0.5, 0, 255).astype(np.uint8)
    if mask is not None and mask.any():
        blended[_outline(mask)] = (255, 255, 255)
    if caption is None:
        return blended
    return np.concatenate([blended, _footer(blended.shape[1], scale, caption, marker)], axis=0)


def _footer(width: int, scale: tuple[float, float] | None, caption: str, marker: float | None) -> np.ndarray:
    from PIL import ImageDraw, ImageFont

    height = footer_height(width)
    bar_height = height // 4
    band = Image.new("RGB", (width, height), (24, 24, 24))
    bar = jet_colormap(np.linspace(0.0, 1.0, width, dtype=np.float32))[None].repeat(bar_height, axis=0)
    band.paste(Image.fromarray(bar), (0, 0))
    draw = ImageDraw.Draw(band)
    try:
        font = ImageFont.load_default(size=max(10, round(height * 0.3)))
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    line = bar_height + 1
    if scale is not None:
        low, high = scale
        if marker is not None and low < marker < high:
            x = int(round((marker - low) / (high - low) * (width - 1)))
            draw.line([(x, 0), (x, bar_height + 1)], fill=(0, 0, 0), width=2)
            text = f"pixel threshold {marker:.3g}"
            half = int(draw.textlength(text, font=font)) // 2
            draw.text((min(max(0, x - half), max(0, width - 2 * half)), line), text, fill=(220, 220, 220), font=font)
        left, right = f"{low:.3g}", f"{high:.3g}"
        draw.text((1, line), left, fill=(220, 220, 220), font=font)
        draw.text((max(0, width - 1 - int(draw.textlength(right, font=font))), line), right, fill=(220, 220, 220),
                  font=font)  # fmt: skip
    else:
        draw.text((1, line), "per-image scale", fill=(220, 220, 220), font=font)
    draw.text((1, line + (height - line) // 2), caption, fill=(255, 255, 255), font=font)
    return np.asarray(band)


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of a boolean ``(H, W)`` mask: ``(labels, count)`` with labels
    ``1..count`` numbered in raster order of their first pixel, 0 outside. Numpy only (the torch-free runtime has
    no scipy): runs of each row are joined to the touching runs of the row above with a union-find."""
    height, width = mask.shape
    labels = np.zeros((height, width), dtype=np.int32)
    parent = [0]

    def find(label: int) -> int:
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    previous: list[tuple[int, int, int]] = []  # (start, stop, label) of the row above, sorted
    for row in range(height):
        edges = np.diff(np.concatenate(([0], mask[row].astype(np.int8), [0])))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        current, pointer = [], 0
        for start, stop in zip(starts.tolist(), stops.tolist()):
            while pointer < len(previous) and previous[pointer][1] < start:  # ends before this run's left neighbour
                pointer += 1
            label, probe = 0, pointer
            while probe < len(previous) and previous[probe][0] <= stop:  # touches, diagonals included
                root = find(previous[probe][2])
                if label == 0:
                    label = root
                elif root != label:
                    parent[max(root, label)] = min(root, label)
                    label = min(root, label)
                probe += 1
            if label == 0:
                label = len(parent)
                parent.append(label)
            labels[row, start:stop] = label
            current.append((start, stop, label))
        previous = current
    if len(parent) == 1:
        return labels, 0
    roots = np.array([find(label) for label in range(len(parent))], dtype=np.int32)
    unique_roots = np.unique(roots[1:])  # roots are the smallest label of their set: raster order is kept
    renumber = np.zeros(len(parent), dtype=np.int32)
    renumber[unique_roots] = np.arange(1, len(unique_roots) + 1, dtype=np.int32)
    return renumber[roots][labels], len(unique_roots)


def defect_regions(mask: np.ndarray, anomaly_map: np.ndarray, limit: int = 100) -> list[dict[str, Any]]:
    """The connected regions (8-connectivity) of a boolean ``(H, W)`` defect mask, largest first.

    Each region: ``box`` ``[left, top, right, bottom]`` (right and bottom exclusive), ``area`` in pixels, ``peak``
    (the map's maximum inside it) and ``centroid`` ``[x, y]``. At most ``limit`` regions are returned.
    """
    labels, count = label_regions(mask)
    if count == 0:
        return []
    rows, columns = np.nonzero(labels)
    owners = labels[rows, columns]
    areas = np.bincount(owners, minlength=count + 1)[1:]
    regions = []
    for number in np.argsort(-areas, kind="stable")[:limit].tolist():
        inside = owners == number + 1
        region_rows, region_columns = rows[inside], columns[inside]
        regions.append({
            "box": [int(region_columns.min()), int(region_rows.min()), int(region_columns.max()) + 1,
                    int(region_rows.max()) + 1],
            "area": int(areas[number]),
            "peak": float(anomaly_map[region_rows, region_columns].max()),
            "centroid": [round(float(region_columns.mean()), 2), round(float(region_rows.mean()), 2)],
        })  # fmt: skip
    return regions


def raw_map_bytes(anomaly_map: np.ndarray, raw_format: str, compress_level: int = 6) -> tuple[bytes, dict[str, float]]:
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
        return png_bytes(pixels, compress_level), {"map_scale_max": scale_max}
    raise ValueError(f"unknown raw map format {raw_format!r}; valid formats: npy, png16")
