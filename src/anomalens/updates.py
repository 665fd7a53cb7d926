"""Updating a fitted detector with new normal images, without a refit: ``Detector.update``.

An inspector who overrules a false alarm has found a normal part the detector's references did not cover. The
memory methods (PatchCore, WinCLIP+ and CLIPFusion with references, ensembles of them) take such parts in
incrementally: each new image is encoded once, and its features enter the memory where they lie beyond the
memory's coverage radius (:meth:`anomalens.nn.memory.NearestNeighbourMemory.extend`), so an update costs the new
images' encoding plus a search bounded by the memory's size, not a refit on every reference.

The threshold is then recalibrated by the rule that chose it (conformal at the same ``α``, or leave-one-out's
maximum) on held-out normal images that the updated detector never saw: for a line, the inspector-confirmed
parts of the random audit sample. Without them the old threshold is kept and the record says so (a
nearest-neighbour score can only fall when the memory grows, so the old threshold then errs towards fewer
alarms, but its rate is no longer the promised one).

Example:
    >>> import numpy as np, anomalens
    >>> detector = anomalens.create("patchcore", backbone="taef2", pretrained=None, image_size=32)
    >>> normal = [np.full((32, 32, 3), value, np.uint8) for value in (100, 110, 120)]
    >>> report = detector.fit(normal).update([np.full((32, 32, 3), 200, np.uint8)])
    >>> report.memory_size_after > report.memory_size_before
    True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from anomalens.io.images import ImageLike, load_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateReport:
    """What :meth:`anomalens.Detector.update` changed."""

    images: int  # new normal images taken in
    memories: dict[str, Any]  # memory name -> its MemoryUpdate (entries added, sizes, coverage radius before/after)
    threshold_before: float | None
    threshold_after: float | None
    pixel_threshold_before: float | None
    pixel_threshold_after: float | None
    recalibrated: bool  # whether the threshold was chosen again on held-out images
    calibration_images: int  # held-out normal images it was chosen on
    seconds: float  # wall time of the update (encoding, memory growth, recalibration)
    memory_seconds: float = 0.0  # of it: encoding the new images and growing the memory
    notes: list[str] = field(default_factory=list)

    @property
    def memory_size_before(self) -> int:
        return sum(update.size_before for update in self.memories.values())

    @property
    def memory_size_after(self) -> int:
        return sum(update.size_after for update in self.memories.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (a version's ``version.json`` keeps it)."""
        return {"images": self.images, "memories": {name: update.to_dict() for name, update in self.memories.items()},
                "memory_size_before": self.memory_size_before, "memory_size_after": self.memory_size_after,
                "threshold_before": self.threshold_before, "threshold_after": self.threshold_after,
                "pixel_threshold_before": self.pixel_threshold_before,
                "pixel_threshold_after": self.pixel_threshold_after, "recalibrated": self.recalibrated,
                "calibration_images": self.calibration_images, "seconds": round(self.seconds, 3),
                "memory_seconds": round(self.memory_seconds, 3),
                "notes": list(self.notes)}  # fmt: skip


def update_detector(detector: Any, images: Sequence[ImageLike], calibration_images: Sequence[ImageLike] | None = None,
                    *, max_memory: int | None = None, calibration_from: str = "held-out normal images",
                    progress: Callable[[int, int], None] | None = None) -> UpdateReport:  # fmt: skip
    """The work of :meth:`anomalens.Detector.update` (see there)."""
    detector._check_fitted()
    if detector.cannot_update:
        raise ValueError(f"method {detector.method_name!r} cannot be updated incrementally: {detector.cannot_update}; "
                         "refit it with the new images among its references")  # fmt: skip
    images = list(images)
    if not images:
        raise ValueError("update needs at least one new normal image, got none")
    calibration_images = list(calibration_images or [])
    if calibration_images and detector.calibration.source in ("given", "none"):
        raise ValueError(f"calibration images recalibrate a threshold chosen by a rule; this detector's is "
                         f"{detector.calibration.source!r}")  # fmt: skip
    report = progress or (lambda done, total: None)
    start = time.perf_counter()
    before = detector.calibration
    arrays = [load_image(image) for image in images]
    held_out = [load_image(image) for image in calibration_images]  # read before anything changes
    grown = time.perf_counter()
    memories = detector._extend_arrays(arrays, max_memory, report)
    grown = time.perf_counter() - grown
    notes = []
    if held_out:
        detector._rescale_on(held_out)  # a method with a common scale (an ensemble) re-estimates it first
        results = []
        for first in range(0, len(held_out), detector.config.batch_size):
            results.extend(detector.predict_arrays(held_out[first : first + detector.config.batch_size]))
        detector.calibration = before.recalibrated(results, calibration_from)
    elif before.source not in ("given", "none"):
        notes.append("threshold kept from before the update (no held-out normal images given): scores can only "
                     "fall as the memory grows, so it errs towards fewer alarms, but its rate is no longer the one "
                     "promised")  # fmt: skip
        logger.warning("%s update: %s", detector.method_name, notes[-1])
    after = detector.calibration
    for name, update in memories.items():
        if update.bounded:
            notes.append(f"{name}: max_memory stopped the additions; coverage radius grew from "
                         f"{update.radius_before:.4g} to {update.radius_after:.4g}")  # fmt: skip
    return UpdateReport(len(arrays), memories, before.threshold, after.threshold, before.pixel_threshold,
                        after.pixel_threshold, bool(held_out), len(held_out), time.perf_counter() - start,
                        memory_seconds=grown, notes=notes)

