"""What every method (and the torch-free runtime, :mod:`anomalens.runtime`) returns, and how pooled inputs are
ordered. Needs numpy only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["AnomalyResult", "pool_order"]


@dataclass
class AnomalyResult:
    """The output of every method for one image.

    Attributes:
        score: Image-level anomaly score; higher means more anomalous.
        anomaly_map: ``(H, W)`` float32 map at the input image's own resolution.
        label: ``True`` (anomalous) / ``False`` when a threshold applies, else ``None``.
        threshold: The threshold the label was decided with, if any.
        source: What the image was (its path, or a short description of an in-memory image).
        pixel_threshold: Map value above which a pixel is marked defective (see :meth:`defect_mask`), if any.
    """

    score: float
    anomaly_map: np.ndarray
    label: bool | None = None
    threshold: float | None = None
    source: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    pixel_threshold: float | None = None

    def defect_mask(self, pixel_threshold: float | None = None) -> np.ndarray | None:
        """``(H, W)`` bool mask of the pixels above ``pixel_threshold`` (default: the detector's), or ``None``
        when there is no pixel threshold."""
        value = self.pixel_threshold if pixel_threshold is None else pixel_threshold
        return None if value is None else self.anomaly_map > value


def pool_order(count: int, seed: int) -> list[int]:
    """The order in which a pooled method's inputs are cut into pools: a permutation of ``range(count)`` seeded
    by ``seed``. Consecutive inputs (a sorted folder lists one defect type after another) then rarely share a
    pool, and the same inputs and seed always give the same pools."""
    return np.random.default_rng(seed).permutation(count).tolist()
