"""Learning from the inspector: reviews into a new detector version (``anomalens models update NAME
--from-reviews``, and ``serve --update-after N``).

Which reviewed parts go where, so that the new version's threshold keeps its guarantee:

- **into the memory**: parts the detector flagged and an inspector confirmed normal (overruled false alarms), and
  with ``include_passes`` a seeded sample of reviewed passes confirmed normal, **outside** the random audit sample;
  never a part an earlier version already took in.
- **into the calibration**: parts of the random audit sample (drawn at random among all inspections, whatever their
  score) confirmed normal, and not in the memory. They are a random sample of the line's normal parts, which the
  new version never saw, so the conformal threshold chosen on them holds for the line's normal parts, not only the
  lab's references (the record restates this assumption).

The new version records the parts taken in (their SHA-256, cumulative over versions), the calibration's size and
source, the memory's size and coverage radius before and after, and the thresholds before and after; ``models
rollback`` restores the previous version exactly (it is kept as it was).
"""

from __future__ import annotations

import logging
import random
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from anomalens.station.history import History
from anomalens.station.models import ModelStore, Version
from anomalens.station.store import ImageStore
from anomalens.thresholds import RULES, required_references

logger = logging.getLogger(__name__)


@dataclass
class ReviewedParts:
    """The reviewed parts of a product, sorted for an update (see the module docstring)."""

    false_alarms: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    calibration: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)  # reviewed parts whose stored image is gone

    @property
    def additions(self) -> list[dict[str, Any]]:
        return [*self.false_alarms, *self.passes]


def taken_in(version: Version) -> set[str]:
    """SHA-256 of every reviewed part the version's lineage took into its memory."""
    return set((version.record.get("feedback") or {}).get("taken_in_sha256", []))


def sort_reviews(history: History, images: ImageStore, version: Version, include_passes: int = 0,
                 seed: int = 0, check_images: bool = True) -> ReviewedParts:  # fmt: skip
    """The product's parts confirmed normal by review, sorted into memory additions and calibration;
    ``check_images=False`` counts them without looking for their stored images (none is then ``missing``)."""
    if isinstance(include_passes, bool) or not isinstance(include_passes, int) or include_passes < 0:
        raise ValueError(f"include_passes={include_passes!r} must be an integer >= 0")
    seen = taken_in(version)
    parts = ReviewedParts()
    passes: list[dict[str, Any]] = []
    for row in history.inspections(product=version.product, verdict="normal", limit=None, newest_first=False):
        sha = row["image_sha256"]
        if sha in seen:
            continue
        if check_images and (not row.get("image_path") or not images.path(row["image_path"]).is_file()):
            parts.missing.append(row)
            continue
        seen.add(sha)
        if row["audit"]:
            parts.calibration.append(row)
        elif row["label"] == "anomalous":
            parts.false_alarms.append(row)
        else:
            passes.append(row)
    parts.passes = random.Random(seed).sample(passes, min(include_passes, len(passes)))
    return parts


def calibration_needed(record: dict[str, Any]) -> int:
    """Held-out normal images a version's threshold rule needs (0: a given threshold or none)."""
    calibration = record.get("calibration") or {}
    source = calibration.get("threshold_source")
    if source not in RULES:
        return 0
    alpha = (calibration.get("threshold_calibration") or {}).get("false_alarm_rate")
    return required_references(alpha) if RULES[source].needs_alpha and alpha else 2


def update_from_reviews(models: ModelStore, history: History, images: ImageStore, product: str, *,
                        include_passes: int = 0, max_memory: int | None = None, keep_threshold: bool = False,
                        seed: int = 0, device: str = "cpu", note: str | None = None) -> tuple[Version, dict[str, Any]]:
    """Publish a new version of ``product`` that has taken in its reviewed false alarms (module docstring).

    Returns:
        The new (active) version and its update record.

    Raises:
        ValueError: Nothing new to take in, too few audit-sample parts confirmed normal for the threshold's rule
            (unless ``keep_threshold``), or a method that cannot be updated (the message says why).
    """
    import anomalens

    active = models.active(product)
    parts = sort_reviews(history, images, active, include_passes, seed)
    if not parts.false_alarms and not parts.passes:
        raise ValueError(f"product {product!r}: no reviewed false alarms (flagged parts confirmed normal) that "
                         f"version {active.number} has not taken in yet")  # fmt: skip
    needed = calibration_needed(active.record)
    if needed and len(parts.calibration) < needed and not keep_threshold:
        raise ValueError(f"product {product!r}: recalibrating the threshold needs {needed} audit-sample parts "
                         f"confirmed normal that the memory never saw, got {len(parts.calibration)}; review more of "
                         "the audit sample, or keep the threshold (--keep-threshold)")  # fmt: skip

    def read(rows: list[dict[str, Any]]) -> list[bytes]:
        return [images.path(row["image_path"]).read_bytes() for row in rows]

    detector = anomalens.load(active.path, map_location=device)
    calibration = read(parts.calibration) if needed and len(parts.calibration) >= needed else None
    report = detector.update(_decoded(read(parts.additions)), _decoded(calibration) if calibration else None,
                             max_memory=max_memory, calibration_from="the line's random audit sample, confirmed "
                             "normal by review")  # fmt: skip
    added = [row["image_sha256"] for row in parts.additions]
    feedback = {"false_alarms": len(parts.false_alarms), "passes": len(parts.passes),
                "calibration_sha256": [row["image_sha256"] for row in parts.calibration] if calibration else [],
                "missing_images": len(parts.missing)}  # fmt: skip
    return publish_update(models, active, detector, report, added, feedback,
                          note or f"{len(added)} reviewed part(s) taken in from version {active.number}")


def publish_update(models: ModelStore, active: Version, detector, report, added: list[str],
                   feedback: dict[str, Any], note: str | None) -> tuple[Version, dict[str, Any]]:  # fmt: skip
    """Save an updated ``detector`` as the product's next, active version, recording the update ``report``, the
    SHA-256 of the images taken in (``added``; the lineage's cumulative set too), ``feedback``'s details and the
    parent's drift rule. Returns the version and its update record."""
    feedback = {"parent_version": active.number, **feedback, "taken_in_now_sha256": added,
                "taken_in_sha256": sorted(taken_in(active) | set(added))}  # fmt: skip
    record = {"update": report.to_dict(), "feedback": feedback,
              "references_sha256": [*active.record.get("references_sha256", []), *added]}
    with tempfile.TemporaryDirectory(prefix=f".update-{active.product}.", dir=models.root) as folder:
        detector.save(folder)
        version = models.add(active.product, folder, source="update", note=note, drift_delta=None,
                             extra={**record, "drift": active.record.get("drift")})  # fmt: skip
    logger.info("%s: %d image(s) taken in, memory %d -> %d, threshold %s -> %s", version.label, len(added),
                report.memory_size_before, report.memory_size_after, report.threshold_before,
                report.threshold_after)  # fmt: skip
    return version, record


def _decoded(blobs: list[bytes]) -> list:
    from anomalens.io.images import ImageLimits, load_image_bytes

    return [load_image_bytes(blob, f"stored image {index}", ImageLimits()) for index, blob in enumerate(blobs)]


class UpdatePolicy:
    """``serve --update-after N``: after ``N`` reviewed false alarms of a product that its active version has not
    taken in, publish an update in the background (one at a time per product; a refusal, such as too few audit
    parts for the threshold, is logged and tried again after the next review)."""

    def __init__(self, after: int, models: ModelStore, history: History, images: ImageStore, device: str = "cpu"):
        if isinstance(after, bool) or not isinstance(after, int) or after < 1:
            raise ValueError(f"serve option update_after={after!r} must be an integer >= 1")
        self.after, self.models, self.history, self.images, self.device = after, models, history, images, device
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self.published: list[str] = []  # version labels published, for the logs and the tests

    def reviewed(self, product: str) -> threading.Thread | None:
        """Called after each review of ``product``; the update's thread if one was started."""
        active = self.models.active(product)
        pending = sort_reviews(self.history, self.images, active, check_images=False).false_alarms  # a count only
        if len(pending) < self.after:
            return None
        with self._lock:
            if product in self._running:
                return None
            self._running.add(product)
        thread = threading.Thread(target=self._run, args=(product,), name=f"update-{product}", daemon=True)
        thread.start()
        return thread

    def _run(self, product: str) -> None:
        try:
            version, _ = update_from_reviews(self.models, self.history, self.images, product, device=self.device,
                                             note=f"automatic: {self.after} reviewed false alarms")  # fmt: skip
            self.published.append(version.label)
        except Exception as error:  # noqa: BLE001
            logger.error("automatic update of %s not published: %s", product, error)
        finally:
            with self._lock:
                self._running.discard(product)
