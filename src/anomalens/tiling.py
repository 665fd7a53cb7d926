"""Tiling: score large or elongated images as overlapping square tiles and stitch the maps back.

Every method resizes its input to a fixed square (PatchCore 256 px, WinCLIP 240 px, ...). A 500 x 1250 part
squeezed into such a square loses its thin cracks: the long side is shrunk 2.5 times more than the short one.
With ``tiling`` set in a method's config (``anomalens.create(..., tiling=TileConfig(size=512))`` or
``--set tiling=size=512,overlap=0.25``) the base :class:`~anomalens.detector.Detector` instead (:func:`score_tiled`)

1. cuts each image (references included) into square tiles of ``size`` pixels of the image as read, so the
   part's aspect ratio is kept inside each tile; ``size=0`` uses the image's shorter side, the right choice for
   elongated parts (a 500 x 1250 part becomes three or four 500 px tiles);
2. spreads the tiles evenly so that neighbours share at least ``overlap`` of a tile (or start ``stride``
   pixels apart), the last tile ending exactly at the border;
3. scores the tiles in batches like any images, brings each tile's map to the tile's own pixel size, and
   blends overlapping tiles with weights that ramp linearly over the overlap (no seams);
4. takes the image score from the stitched map (``score="map_max"``, its maximum) or, with
   ``score="tile_max"``, as the largest of the tiles' own image scores.

When to use it: parts whose image is far from square, or whose defects are a few pixels wide in a high-resolution
image (the model would see them shrunk below one patch). It costs one model pass per tile.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from anomalens.checks import check_options

AUTO = "auto"  # tiling chosen at fit time from the references (choose_tiling)
ELONGATED = 2.0  # tile parts whose long side exceeds this many times the short side (a guess: the example)
LARGE = 4.0  # tile parts whose shorter side is this many times the method's input size (a guess)
TILE_SCORES = ("map_max", "tile_max")
TILE_ASPECTS = ("keep",)
MAX_TILES = 4096  # tiles per image; more is a mistake (tiny tiles on a large image), refused before any work


@dataclass(frozen=True)
class TileConfig:
    """How images are cut into tiles (see the module docstring)."""

    size: int = 0  # tile side in pixels of the image as read; 0 = the image's shorter side (elongated parts)
    overlap: float = 0.25  # least share of a tile that neighbouring tiles have in common, in [0, 1)
    stride: int = 0  # distance between tile starts in pixels; 0 = derived from ``overlap``
    aspect: str = "keep"  # tiles are square in image pixels, so each keeps the part's aspect (the one mode)
    score: str = "map_max"  # image score: "map_max" (maximum of the stitched map) or "tile_max" (largest tile score)

    def __post_init__(self) -> None:
        check_options("tiling", self, {
            "size": (isinstance(self.size, int) and self.size >= 0, "an integer >= 0 (0: the shorter side)"),
            "overlap": (isinstance(self.overlap, (int, float)) and 0 <= self.overlap < 1, "in [0, 1)"),
            "stride": (isinstance(self.stride, int) and self.stride >= 0, "an integer >= 0 (0: from overlap)"),
            "aspect": (self.aspect in TILE_ASPECTS, f"one of {', '.join(TILE_ASPECTS)}"),
            "score": (self.score in TILE_SCORES, f"one of {', '.join(TILE_SCORES)}"),
        })  # fmt: skip

    @classmethod
    def parse(cls, value: Any) -> TileConfig | str | None:
        """A config from a :class:`TileConfig`, a dict, JSON, ``"size=512,overlap=0.25"``, ``"on"`` (defaults),
        ``"off"`` / ``None`` (no tiling), or ``"auto"`` (kept as :data:`AUTO`: chosen at fit time by
        :func:`choose_tiling`).

        Raises:
            ValueError: An unknown key (the message lists the valid ones) or an unreadable value.
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.lower() in ("", "off", "none", "false", "0"):
                return None
            if text.lower() == AUTO:
                return AUTO
            if text.lower() in ("on", "true", "1"):
                return cls()
            if text.startswith("{"):
                value = json.loads(text)
            else:
                value = {}
                for part in text.split(","):
                    if "=" not in part:
                        raise ValueError(f"tiling: expected key=value items (size=512,overlap=0.25), got {text!r}")
                    key, item = part.split("=", 1)
                    value[key.strip()] = item.strip()
        if not isinstance(value, dict):
            raise ValueError(f"tiling must be a TileConfig, a dict or 'size=...,overlap=...', got {value!r}")
        valid = ("size", "overlap", "stride", "aspect", "score")
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ValueError(f"unknown tiling option(s) {unknown}; valid options: {', '.join(valid)}")
        types = {"size": int, "overlap": float, "stride": int, "aspect": str, "score": str}
        try:
            return cls(**{key: types[key](item) for key, item in value.items()})
        except (TypeError, ValueError) as error:
            if "tiling option" in str(error):
                raise
            raise ValueError(f"tiling: cannot read {value!r} ({error})") from None


def tile_starts(length: int, side: int, stride: int) -> list[int]:
    """Start offsets of tiles of ``side`` pixels covering ``[0, length)``: evenly spread, first at 0, last ending at
    ``length``, consecutive starts at most ``stride`` apart."""
    if side >= length:
        return [0]
    count = math.ceil((length - side) / max(stride, 1)) + 1
    return [round(index * (length - side) / (count - 1)) for index in range(count)]


def tile_boxes(height: int, width: int, config: TileConfig) -> list[tuple[int, int, int, int]]:
    """The ``(top, left, bottom, right)`` boxes tiling an ``height x width`` image, row by row.

    Tiles are square, ``min(size or shorter side, height, width)`` pixels.
    """
    side = min(config.size or min(height, width), height, width)
    stride = config.stride or max(1, int(round(side * (1.0 - config.overlap))))
    rows, columns = tile_starts(height, side, stride), tile_starts(width, side, stride)
    if len(rows) * len(columns) > MAX_TILES:
        raise ValueError(
            f"tiling size={config.size} (stride {stride}) cuts a {height} x {width} image into "
            f"{len(rows) * len(columns)} tiles, more than {MAX_TILES}: use larger tiles or less overlap"
        )
    return [(top, left, top + side, left + side) for top in rows for left in columns]


def blend_weights(side: int, ramp: int) -> np.ndarray:
    """``(side, side)`` blending weights: 1 inside, falling linearly to ``1 / (ramp + 1)`` over the ``ramp`` pixels
    nearest each edge, so overlapping tiles hand over smoothly (a lone tile at a border still gets its own value,
    the weights being normalised where they add up)."""
    position = np.arange(side, dtype=np.float32)
    distance = np.minimum(position, side - 1 - position) + 1.0
    edge = np.minimum(distance / (max(ramp, 0) + 1.0), 1.0)
    return np.outer(edge, edge)


class MapStitcher:
    """Accumulates tile maps into one ``(H, W)`` map with :func:`blend_weights`."""

    def __init__(self, height: int, width: int, boxes: list[tuple[int, int, int, int]]):
        self.total = np.zeros((height, width), dtype=np.float64)
        self.weight = np.zeros((height, width), dtype=np.float64)
        sides = {bottom - top for top, _, bottom, _ in boxes}
        starts = sorted({top for top, *_ in boxes}) + sorted({left for _, left, *_ in boxes})
        side = next(iter(sides))
        gaps = [b - a for a, b in zip(starts, starts[1:]) if b > a]
        ramp = max(0, side - min(gaps)) if gaps else 0  # the overlap in pixels
        self.window = blend_weights(side, ramp)

    def add(self, box: tuple[int, int, int, int], tile_map: np.ndarray) -> None:
        top, left, bottom, right = box
        self.total[top:bottom, left:right] += self.window * tile_map
        self.weight[top:bottom, left:right] += self.window

    def result(self) -> np.ndarray:
        return (self.total / np.maximum(self.weight, 1e-12)).astype(np.float32)


def tiles_of(array: np.ndarray, config: TileConfig | None) -> list[np.ndarray]:
    """The tiles of one ``(H, W, 3)`` image (the image itself without tiling)."""
    if config is None:
        return [array]
    return [np.ascontiguousarray(array[top:bottom, left:right])
            for top, left, bottom, right in tile_boxes(*array.shape[:2], config)]  # fmt: skip


ScoreImages = Callable[[list[np.ndarray]], list[tuple[float, np.ndarray]]]  # images -> (score, map at image size)


def score_tiled(arrays: list[np.ndarray], config: TileConfig, score_images: ScoreImages,
                batch_size: int) -> list[tuple[float, np.ndarray]]:  # fmt: skip
    """Score every tile of every image with ``score_images`` (``batch_size`` tiles per call; a pooled method
    passes all tiles of the call at once) and stitch each image's map; the image score is the stitched map's
    maximum (``score="map_max"``) or the largest tile score (``"tile_max"``)."""
    boxes = [tile_boxes(*array.shape[:2], config) for array in arrays]
    stitchers = [MapStitcher(*array.shape[:2], image_boxes) for array, image_boxes in zip(arrays, boxes)]
    tile_scores: list[list[float]] = [[] for _ in arrays]
    work = [(owner, box) for owner, image_boxes in enumerate(boxes) for box in image_boxes]
    for start in range(0, len(work), batch_size):
        chunk = work[start : start + batch_size]
        crops = [np.ascontiguousarray(arrays[owner][top:bottom, left:right])
                 for owner, (top, left, bottom, right) in chunk]  # fmt: skip
        for (owner, box), (score, tile_map) in zip(chunk, score_images(crops)):
            stitchers[owner].add(box, tile_map)
            tile_scores[owner].append(score)
    results = []
    for owner, stitcher in enumerate(stitchers):
        anomaly_map = stitcher.result()
        results.append((float(anomaly_map.max()) if config.score == "map_max" else max(tile_scores[owner]),
                        anomaly_map))  # fmt: skip
    return results


def choose_tiling(sizes: list[tuple[int, int]], input_size: int) -> tuple[TileConfig | None, str]:
    """``tiling="auto"``: tiles or not, from the references' ``(height, width)`` and the method's input side.

    - Elongated parts (a reference's long side over :data:`ELONGATED` times its short side): tiles of the shorter
      side (``size=0``), so each tile keeps the part's aspect.
    - Large parts (every reference's shorter side at least :data:`LARGE` times the input side): tiles of twice the
      input side, each shrunk twice instead of many times.
    - Otherwise, and without references: whole images.

    Returns:
        ``(the tiling, the reason in words)``; the reason is recorded with the detector (``tiling_choice``).
    """
    if not sizes:
        return None, "no references to judge by: images are scored whole"
    aspect = max(max(height, width) / min(height, width) for height, width in sizes)
    short = min(min(height, width) for height, width in sizes)
    if aspect > ELONGATED:
        return TileConfig(size=0), (f"elongated parts (long side up to {aspect:.2f}x the short side, over "
                                    f"{ELONGATED:g}x): tiles of the shorter side")  # fmt: skip
    if short >= LARGE * input_size:
        return TileConfig(size=2 * input_size), (
            f"large parts (shorter side {short} px, {short / input_size:.1f}x the method's {input_size} px input, at "
            f"least {LARGE:g}x): tiles of {2 * input_size} px")  # fmt: skip
    return None, (f"parts of aspect up to {aspect:.2f} and shorter side {short} px suit the method's {input_size} px "
                  "input: scored whole")  # fmt: skip
