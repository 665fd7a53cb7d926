"""Detectors of many products, loaded on first use and evicted least-recently-used under a budget.

:class:`DetectorPool` hands out a product's active version through :meth:`~DetectorPool.use`; at most
``max_loaded`` stay loaded, and one in use is never evicted (a request in flight always finishes on the detector it
started with; the pool runs over its budget until the request ends). When a product's active version changes
(``models add`` or ``rollback`` while serving), the next use loads the new version and the old one is dropped once
its last request ends.

Each loaded product is scored by a :class:`~anomalens.engines.serve.ModelWorker`, which micro-batches the images of
concurrent requests into one forward pass.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from anomalens.engines.serve import ModelWorker, ServerSettings
from anomalens.station.models import ModelStore, Version

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    """One loaded product version and its worker; ``users`` counts the requests in flight on it."""

    version: Version
    worker: ModelWorker
    users: int = 0
    retired: bool = False  # replaced by a newer active version: dropped when its last user leaves

    @property
    def detector(self):
        return self.worker.detector


@dataclass
class PoolStats:
    loads: int = 0
    evictions: int = 0
    loaded_now: list[str] = field(default_factory=list)


class DetectorPool:
    """See the module docstring.

    Args:
        store: The models directory.
        max_loaded: Products kept loaded at most (``None``: all that were used).
        settings: Batching of each product's worker.
        device: The torch device detectors are loaded onto.
    """

    def __init__(self, store: ModelStore, max_loaded: int | None = None, settings: ServerSettings | None = None,
                 device: str = "cpu"):  # fmt: skip
        if max_loaded is not None and (isinstance(max_loaded, bool) or not isinstance(max_loaded, int)
                                       or max_loaded < 1):  # fmt: skip
            raise ValueError(f"serve option max_loaded={max_loaded!r} must be an integer >= 1 or none")
        self.store = store
        self.max_loaded = max_loaded
        self.settings = settings or ServerSettings()
        self.device = device
        self.stats = PoolStats()
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()  # product -> entry, least recently used first
        self._retired: list[Loaded] = []
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def use(self, product: str) -> Iterator[Loaded]:
        """The product's active version, loaded if needed, held for the ``with`` block (never evicted meanwhile).

        Raises:
            ValueError: An unknown product or one without a version.
        """
        entry = self._acquire(product)
        try:
            yield entry
        finally:
            self._release(entry)

    def loaded(self) -> list[str]:
        """The products loaded now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def close(self) -> None:
        with self._lock:
            entries = [*self._loaded.values(), *self._retired]
            self._loaded.clear()
            self._retired.clear()
        for entry in entries:
            entry.worker.stop()

    # ------------------------------------------------------------------ internals
    def _acquire(self, product: str) -> Loaded:
        active = self.store.active(product)  # the pointer, read on every use: a rollback takes effect at once
        with self._lock:
            entry = self._current(product, active)
            if entry is not None:
                entry.users += 1
                return entry
            loading = self._loading.setdefault(product, threading.Lock())
        with loading:  # one load per product at a time; others wait for it
            with self._lock:
                entry = self._current(product, active)
                if entry is not None:
                    entry.users += 1
                    return entry
            entry = self._load(active)
            with self._lock:
                old = self._loaded.pop(product, None)
                if old is not None:
                    self._retire(old)
                self._loaded[product] = entry
                entry.users += 1
                self._evict()
            return entry

    def _current(self, product: str, active: Version) -> Loaded | None:
        entry = self._loaded.get(product)
        if entry is None or entry.version.number != active.number:
            return None
        self._loaded.move_to_end(product)
        return entry

    def _load(self, version: Version) -> Loaded:
        import anomalens

        logger.info("loading %s from %s", version.label, version.path)
        detector = anomalens.load(version.path, map_location=self.device)
        self.stats.loads += 1
        return Loaded(version, ModelWorker(detector, self.settings))

    def _release(self, entry: Loaded) -> None:
        stop = None
        with self._lock:
            entry.users -= 1
            if entry.retired and entry.users == 0 and entry in self._retired:
                self._retired.remove(entry)
                stop = entry
            else:
                self._evict()
        if stop is not None:
            stop.worker.stop()

    def _retire(self, entry: Loaded) -> None:
        """Drop a replaced version now if nobody uses it, else when its last user leaves (lock held)."""
        entry.retired = True
        if entry.users == 0:
            threading.Thread(target=entry.worker.stop, daemon=True).start()
        else:
            self._retired.append(entry)

    def _evict(self) -> None:
        """Evict least-recently-used idle products until the budget holds (lock held)."""
        if self.max_loaded is None:
            return
        for product in list(self._loaded):
            if len(self._loaded) <= self.max_loaded:
                break
            entry = self._loaded[product]
            if entry.users == 0:
                del self._loaded[product]
                self.stats.evictions += 1
                logger.info("evicting %s (budget %d loaded)", entry.version.label, self.max_loaded)
                threading.Thread(target=entry.worker.stop, daemon=True).start()
