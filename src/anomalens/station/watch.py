"""Hot folders: ``anomalens watch DIR --product NAME`` scores each new file exactly once and moves it out of the way.

A camera or PLC gateway drops image files into ``DIR``. The watcher

1. waits until a file is fully written: its size and modification time unchanged for ``settle_s`` (files named
   ``*.part``, ``*.tmp``, ``*.crdownload`` or starting with ``.`` are never taken, so writers can also write
   under such a name and rename when done);
2. claims it in the history by product and content hash: a file scored before (a restart, a duplicate dropped
   twice) is not scored again, and two watchers of one folder never both score it;
3. scores and records it (one transaction: the verdict, the claim completed, the webhook events), and only then
   moves it to ``DIR/done/``; a file that is not an acceptable image goes to ``DIR/failed/`` with
   ``NAME.reason.txt`` beside it.

So a watcher killed at any moment (``kill -9``) loses nothing and records nothing twice: a file still in ``DIR``
is either unrecorded (scored again) or recorded (moved without scoring). If the database cannot be written, files
stay where they are and the watcher logs the error and tries again, waiting 1 s, 2 s, 4 s ... up to 10 s between
passes while the error lasts (nothing is silently dropped).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from anomalens.io.images import IMAGE_EXTENSIONS, MAX_FILE_BYTES, ImageLoadError
from anomalens.station.history import ClaimLost
from anomalens.station.inspect import Station

logger = logging.getLogger(__name__)

PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial")
MAX_BACKOFF_S = 10.0  # the longest wait between passes while the database cannot be written


@dataclass
class WatchOptions:
    """Where ``watch`` looks and where it puts what it took."""

    product: str = ""  # the product the folder's images are of (a name in the models directory; required)
    settle_s: float = 1.0  # a file is taken once its size and time have not changed for this many seconds
    poll_s: float = 0.5  # seconds between looks at the folder
    done: str | None = None  # where scored files go; default: DIR/done
    failed: str | None = None  # where refused files go, with NAME.reason.txt; default: DIR/failed
    station: str = ""  # the station's name in the history's source column; default: this host
    once: bool = False  # score what is there (after it settles) and exit, instead of watching
    max_loaded: int | None = 1  # products kept loaded (a watcher scores one product)
    device: str = "cpu"  # torch device the detector runs on

    def __post_init__(self) -> None:
        from anomalens.checks import check_options

        check_options("watch", self, {
            "product": (bool(self.product), "a product name (--product NAME)"),
            "settle_s": (self.settle_s >= 0, ">= 0 seconds"), "poll_s": (self.poll_s > 0, "> 0 seconds"),
        })  # fmt: skip


@dataclass
class WatchCounts:
    scored: int = 0
    duplicates: int = 0
    failed: int = 0
    errors: int = 0  # attempts that failed for a reason other than the file (the database away), retried


@dataclass
class Watcher:
    """Watches one folder for one product (see the module docstring)."""

    station: Station
    folder: Path
    options: WatchOptions
    counts: WatchCounts = field(default_factory=WatchCounts)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if not self.folder.is_dir():
            raise ValueError(f"watch folder {self.folder} is not a folder")
        self.done_dir = Path(self.options.done) if self.options.done else self.folder / "done"
        self.failed_dir = Path(self.options.failed) if self.options.failed else self.folder / "failed"
        self.station.pool.store.active(self.options.product)  # an unknown product is refused now, not per file
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{self.folder.resolve()}"
        self.source = f"watch:{self.options.station or socket.gethostname()}:{self.folder.name}"
        self._seen: dict[Path, tuple[int, float, float]] = {}  # path -> (size, mtime, first time seen so)

    def ready(self) -> list[Path]:
        """The files that have settled, oldest first."""
        moment = time.monotonic()
        ready, present = [], set()
        for path in sorted(self.folder.iterdir()):
            if not self._candidate(path):
                continue
            present.add(path)
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            signature = (stat.st_size, stat.st_mtime)
            seen = self._seen.get(path)
            if seen is None or seen[:2] != signature:
                self._seen[path] = (*signature, moment)
            elif stat.st_size > 0 and moment - seen[2] >= self.options.settle_s:
                ready.append(path)
        self._seen = {path: value for path, value in self._seen.items() if path in present}
        return ready

    def _candidate(self, path: Path) -> bool:
        name = path.name
        return (path.is_file() and not path.is_symlink() and not name.startswith(".")
                and not name.endswith(PARTIAL_SUFFIXES))  # fmt: skip

    def process(self, path: Path) -> str:
        """Take one settled file; returns what became of it: ``scored``, ``duplicate``, ``failed``, ``busy``
        (another watcher has it) or ``retry`` (an error not of the file's making: it stays, tried again later)."""
        try:
            data = _read(path)
        except FileNotFoundError:
            return "busy"  # another watcher of this folder moved it
        except ImageLoadError as problem:
            self._move(path, self.failed_dir, problem.reason)
            self.counts.failed += 1
            return "failed"
        product = self.options.product
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            return self._score(path, product, sha256, data)
        except ClaimLost:
            return "busy"
        except (ImageLoadError, ValueError, RuntimeError) as problem:  # the file's fault: refused for good
            try:
                self.station.history.fail_claim(product, sha256, str(problem))
            except Exception as error:  # noqa: BLE001 - the database away: the file stays, retried
                return self._retry(path, error)
            self._move(path, self.failed_dir, str(problem))
            self.counts.failed += 1
            return "failed"
        except Exception as error:  # noqa: BLE001 - the database away: the file stays, retried
            return self._retry(path, error)

    def _retry(self, path: Path, error: Exception) -> str:
        self.counts.errors += 1
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0][:300]
        logger.error("%s: not recorded, will retry: %s: %s", path.name, type(error).__name__, reason)
        return "retry"

    def _score(self, path: Path, product: str, sha256: str, data: bytes) -> str:
        state = self.station.history.claim(product, sha256, self.owner)
        if state == "busy":
            return "busy"
        if state == "done":
            self._move(path, self.done_dir)
            self.counts.duplicates += 1
            return "duplicate"
        if state == "failed":
            self._move(path, self.failed_dir, "refused before (same content)")
            self.counts.failed += 1
            return "failed"
        self.station.inspect(product, data, path.name, self.source, claim=(product, sha256, self.owner))
        self._move(path, self.done_dir)
        self.counts.scored += 1
        return "scored"

    def _move(self, path: Path, folder: Path, reason: str | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        counter = 1
        while target.exists():
            counter += 1
            target = folder / f"{path.stem}-{counter}{path.suffix}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return  # moved by another watcher meanwhile
        except OSError:  # another file system: copy, then remove
            shutil.copy2(path, target)
            path.unlink(missing_ok=True)
        if reason is not None:
            (folder / f"{target.name}.reason.txt").write_text(reason + "\n")

    def run(self, stop: threading.Event | None = None, prune_every_s: float = 3600.0) -> WatchCounts:
        """Watch until ``stop`` is set (or, with ``once``, until the folder is empty of settled files)."""
        stop = stop or threading.Event()
        last_prune = 0.0
        backoff = 0.0  # seconds to wait after a pass that hit an error not of a file's making (the database away)
        while not stop.is_set():
            ready = self.ready()
            for path in ready:
                if stop.is_set():
                    break
                if self.process(path) == "retry":  # the next files would fail the same way: wait, then again
                    backoff = min(MAX_BACKOFF_S, max(1.0, backoff * 2))
                    logger.error("waiting %.0f s before trying again", backoff)
                    break
            else:
                backoff = 0.0
            if time.monotonic() - last_prune > prune_every_s:
                last_prune = time.monotonic()
                self.station.apply_retention()
            if self.options.once and not ready and not any(self._candidate(path) for path in self.folder.iterdir()):
                break
            stop.wait(max(self.options.poll_s, backoff))
        return self.counts


def _read(path: Path) -> bytes:
    """A watched file's bytes, bounded (a file over the limit is refused as an image would be)."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageLoadError(str(path), f"not an image file name ({', '.join(sorted(IMAGE_EXTENSIONS))})", "format")
    with open(path, "rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ImageLoadError(str(path), f"file exceeds the limit of {MAX_FILE_BYTES} bytes", "size")
    return data
