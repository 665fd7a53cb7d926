"""Images and overlays of inspections, kept on disk by content (never inside the database).

Layout under the store's root (default ``MODELS/store``)::

    images/ab/abcdef...0123.png          an inspected image's bytes, named by their SHA-256 (kept once)
    overlays/ab/abcdef...-bottle-3.jpg   its heatmap overlay from version 3 of product bottle

Files are written atomically. A retention policy (``keep_days``, ``keep_gb``) removes the oldest files; the
history's rows stay, with their file fields cleared. A full disk is an ``OSError`` the inspection records beside
its verdict (the verdict is never lost for want of space).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from anomalens.io.outputs import atomic_write_bytes

SUFFIXES = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tif"}


class ImageStore:
    """Content-addressed files with a retention policy (see the module docstring).

    Args:
        root: The store's folder.
        keep_days: Remove files older than this many days (``None``: keep).
        keep_gb: Remove the oldest files beyond this many gigabytes (``None``: no limit).
    """

    def __init__(self, root: str | os.PathLike, keep_days: float | None = None, keep_gb: float | None = None):
        if keep_days is not None and not keep_days > 0:
            raise ValueError(f"store option keep_days={keep_days!r} must be > 0 or none")
        if keep_gb is not None and not keep_gb > 0:
            raise ValueError(f"store option keep_gb={keep_gb!r} must be > 0 or none")
        self.root = Path(root)
        self.keep_days = keep_days
        self.keep_gb = keep_gb

    def put_image(self, sha256: str, data: bytes, kind: str = "png") -> str:
        """Keep an image's bytes under its hash (once); returns its path relative to the root."""
        relative = f"images/{sha256[:2]}/{sha256}{SUFFIXES.get(kind, '.img')}"
        if not (self.root / relative).exists():
            atomic_write_bytes(self.root / relative, data)
        return relative

    def put_overlay(self, sha256: str, product: str, version: int | None, data: bytes) -> str:
        """Keep a JPEG overlay of an image as one detector version drew it; returns its relative path."""
        relative = f"overlays/{sha256[:2]}/{sha256}-{product}-{version or 0}.jpg"
        atomic_write_bytes(self.root / relative, data)
        return relative

    def path(self, relative: str) -> Path:
        """The file of a relative path the store handed out (a ``ValueError`` for any path outside the store)."""
        candidate = (self.root / relative).resolve()
        if self.root.resolve() not in candidate.parents:
            raise ValueError(f"{relative!r} is not a path inside the image store")
        return candidate

    def prune(self, moment: float | None = None) -> list[str]:
        """Apply the retention policy; returns the relative paths removed (oldest first)."""
        moment = time.time() if moment is None else moment
        files = sorted(((path.stat().st_mtime, path) for path in self.root.rglob("*") if path.is_file()
                        and not path.name.startswith(".")), key=lambda item: item[0])  # fmt: skip
        removed = []
        if self.keep_days is not None:
            cutoff = moment - self.keep_days * 86_400
            for _, path in [item for item in files if item[0] < cutoff]:
                path.unlink(missing_ok=True)
                removed.append(path)
            files = [item for item in files if item[0] >= cutoff]
        if self.keep_gb is not None:
            budget = self.keep_gb * 2**30
            total = sum(path.stat().st_size for _, path in files)
            for _, path in files:
                if total <= budget:
                    break
                total -= path.stat().st_size
                path.unlink(missing_ok=True)
                removed.append(path)
        return [path.relative_to(self.root).as_posix() for path in removed]
