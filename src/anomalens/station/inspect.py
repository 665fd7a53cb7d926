"""One inspection, the same wherever the image comes from (the server, a hot folder, ``predict --record``): score
it with the product's active version, keep the image and its overlay by content, and write the verdict to the
history in one transaction with its webhook events.

A full disk for the image store costs the stored files, never the verdict: the row is written with the error in
``store_error``. A database that cannot be written is an error the caller sees (a watched file then stays where it
is, to be scored again): an inspection is never silently dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anomalens.engines.run_folder import label_text
from anomalens.io.images import ImageLimits, load_image_bytes, probe_image
from anomalens.io.outputs import defect_regions, heatmap_overlay, jpeg_bytes
from anomalens.station.drift import DriftWatch, version_delta
from anomalens.station.history import History
from anomalens.station.models import ModelStore
from anomalens.station.pool import DetectorPool
from anomalens.station.settings import InspectionSettings, PoolOptions, StationPaths
from anomalens.station.store import ImageStore

logger = logging.getLogger(__name__)


@dataclass
class Station:
    """What an inspection needs: the detectors, the history, the store and the recording policy."""

    pool: DetectorPool
    history: History
    images: ImageStore
    settings: InspectionSettings = field(default_factory=InspectionSettings)
    limits: ImageLimits = field(default_factory=ImageLimits)
    seed: int | None = None  # of the audit draw (None: fresh entropy)
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self.drift = DriftWatch(self.history, tuple(self.settings.webhook))

    def inspect(self, product: str, data: bytes, name: str, source: str, *,
                claim: tuple[str, str] | None = None, timeout: float = 600.0) -> dict[str, Any]:  # fmt: skip
        """Score one encoded image of ``product`` and record it; returns the history's row (its ``id`` included).

        Raises:
            ImageLoadError: Not an acceptable image (over the limits, not an image, corrupt).
            ValueError: An unknown product.
            RuntimeError: The image failed to score (logged with an error id).
        """
        sha256 = hashlib.sha256(data).hexdigest()
        kind = probe_image(data, name, self.limits)[0].lower()
        array = load_image_bytes(data, name, self.limits)
        with self.pool.use(product) as entry:
            result = entry.worker.submit([array]).result(timeout=timeout)[0][0]
            if isinstance(result, str):
                raise RuntimeError(f"{name}: scoring failed (error id {result})")
            detector, version = entry.detector, entry.version
            calibration = detector.calibration
            scale, _ = calibration.map_scale_for(zero_shot=detector.zero_shot)
        row = self._row(product, version, detector, result, array, sha256, name, source)
        row["p_value"] = calibration.p_value(result.score)
        if self.settings.keep_images:
            self._keep(row, data, kind, array, result, scale)
        row["id"] = self.history.record(row, claim=claim, webhooks=self.settings.webhook)
        self.drift.observe_quietly(product, version.number, version_delta(version.record))
        return row

    def _row(self, product: str, version, detector, result, array: np.ndarray, sha256: str, name: str,
             source: str) -> dict[str, Any]:  # fmt: skip
        mask = result.defect_mask()
        return {
            "product": product, "version": version.number, "fingerprint": version.record.get("fingerprint"),
            "method": detector.method_name, "source": source[:255], "image_sha256": sha256,
            "image_name": name[-255:], "width": int(array.shape[1]), "height": int(array.shape[0]),
            "score": float(result.score), "threshold": result.threshold, "label": label_text(result.label),
            "pixel_threshold": result.pixel_threshold,
            "regions": defect_regions(mask, result.anomaly_map) if mask is not None else None,
            "audit": self._random.random() < self.settings.audit_rate,
        }  # fmt: skip

    def _keep(self, row: dict[str, Any], data: bytes, kind: str, array: np.ndarray, result, scale) -> None:
        """Store the image and its overlay; a failure (a full disk) is recorded in the row, not raised."""
        try:
            row["image_path"] = self.images.put_image(row["image_sha256"], data, kind)
            overlay = heatmap_overlay(array, result.anomaly_map, scale, mask=result.defect_mask())
            row["overlay_path"] = self.images.put_overlay(row["image_sha256"], row["product"], row["version"],
                                                          jpeg_bytes(overlay))  # fmt: skip
        except OSError as error:
            row["store_error"] = f"{type(error).__name__}: {error}"[:2000]
            logger.error("image store %s: %s (the verdict is recorded without the image)", self.images.root, error)

    def prune(self) -> int:
        """Apply the store's retention policy and clear the removed files from the history; returns the count."""
        removed = self.images.prune()
        if removed:
            self.history.forget_images(removed)
        return len(removed)

    def apply_retention(self) -> int:
        """:meth:`prune`, logged, for the servers' and watchers' periodic runs: a failure is logged, never raised
        (retention must never stop the line). Returns how many files were removed."""
        try:
            removed = self.prune()
        except Exception as error:  # noqa: BLE001
            logger.error("retention of %s failed: %s", self.images.root, error)
            return 0
        if removed:
            logger.info("retention: removed %d stored file(s) from %s", removed, self.images.root)
        return removed



def open_station(paths: StationPaths, inspection: InspectionSettings | None = None, pool: PoolOptions | None = None,
                 server=None, device: str = "cpu", seed: int | None = None,
                 wait_s: float | None = 0.0) -> Station:  # fmt: skip
    """A station over a models directory: its detectors, its history (upgraded to the newest schema) and its
    image store (``MODELS/store`` by default).

    ``wait_s``: how long to wait for a database server that cannot be reached (``None``: until it answers).

    Raises:
        ValueError: No models directory given.
        ImportError: SQLAlchemy or Alembic missing (the message gives the install command).
        HistoryUnavailable: The database cannot be reached within ``wait_s``.
    """
    inspection = inspection or InspectionSettings()
    pool = pool or PoolOptions()
    root = paths.models_dir()
    store = ModelStore(root)
    limits = server.image_limits if server is not None else ImageLimits()
    history = History(paths.db_url(), wait_s=wait_s)
    return Station(pool=DetectorPool(store, pool.max_loaded, server, device), history=history,
                   images=ImageStore(inspection.store or root / "store", inspection.keep_days, inspection.keep_gb),
                   settings=inspection, limits=limits, seed=seed)  # fmt: skip
