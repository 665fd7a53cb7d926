"""The station's options, declared once (the command line's ``--models``, ``--db``, ``--store`` ... options are
generated from these dataclasses). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anomalens.checks import check_options


@dataclass
class StationPaths:
    """Where a station keeps its state."""

    models: str | None = None  # the models directory (default: $ANOMALENS_MODELS)
    db: str | None = None  # history database URL; default: sqlite:///MODELS/history.db (or postgresql+psycopg://...)

    def models_dir(self) -> Path:
        from anomalens.station.models import models_dir

        return models_dir(self.models)

    def db_url(self) -> str:
        from anomalens.station.history import History

        return self.db or History.default_url(self.models_dir())


@dataclass
class InspectionSettings:
    """How a station records inspections."""

    store: str | None = None  # folder keeping images and overlays by content; default: MODELS/store
    keep_days: float | None = None  # remove stored images older than this many days (the rows stay)
    keep_gb: float | None = None  # remove the oldest stored images beyond this many gigabytes
    keep_images: bool = True  # keep each inspected image and its overlay in the store
    audit_rate: float = 0.02  # share of inspections drawn at random for review (measures the false-alarm rate)
    webhook: tuple[str, ...] = ()  # URLs that get each verdict and review as signed JSON (repeat for more)

    def __post_init__(self) -> None:
        check_options("station", self, {
            "audit_rate": (isinstance(self.audit_rate, (int, float)) and 0 <= self.audit_rate <= 1, "in [0, 1]"),
            "webhook": (all(isinstance(url, str) and url.startswith(("http://", "https://")) for url in self.webhook),
                        "http:// or https:// URLs"),
            "keep_days": (self.keep_days is None or self.keep_days > 0, "> 0 or none"),
            "keep_gb": (self.keep_gb is None or self.keep_gb > 0, "> 0 or none"),
        })  # fmt: skip


@dataclass
class PoolOptions:
    """How many products a station keeps loaded."""

    max_loaded: int | None = None  # products kept loaded at most, least recently used evicted; default: all used

    def __post_init__(self) -> None:
        check_options("station", self, {"max_loaded": (
            self.max_loaded is None or (isinstance(self.max_loaded, int) and self.max_loaded >= 1),
            "an integer >= 1 or none")})  # fmt: skip
