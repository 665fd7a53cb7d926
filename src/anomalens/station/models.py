"""Named, versioned detectors: a models directory that an inspection station serves from.

Layout::

    MODELS/
      bottle/                       a product (its name: lowercase letters, digits, ``_ . -``)
        ACTIVE                      the active version's number, replaced atomically (a rename)
        versions/
          0001/                     a saved detector (config.json, model.safetensors) and version.json:
          0002/                     created, fingerprint, calibration, references' SHA-256, source, note

Every version is kept until removed; ``rollback`` moves the pointer back (to the version before the active one,
or to a given one) and ``add`` moves it to the new version. A version folder is written under a temporary name
and renamed into place, so a reader sees a complete version or none; version numbers are claimed with an atomic
``mkdir``, so two writers never share one.

The directory is ``--models DIR`` or ``$ANOMALENS_MODELS``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalens.io.outputs import atomic_write_text, honour_umask, sha256_file
from anomalens.persistence import CONFIG_FILE, config_from_saved
from anomalens.station.drift import DEFAULT_DELTA, drift_record

MODELS_ENV = "ANOMALENS_MODELS"
VERSION_FILE = "version.json"
ACTIVE_FILE = "ACTIVE"
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def check_product_name(name: str) -> str:
    """``name`` if it is a valid product name (lowercase letters, digits, ``_ . -``; at most 64), else a
    ``ValueError`` that says the rule (a name is a folder: no separators, no ``..``)."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise ValueError(f"product name {name!r} must be 1-64 characters of a-z, 0-9, '_', '.', '-', starting with a "
                         "letter or digit")  # fmt: skip
    return name


def models_dir(given: str | os.PathLike | None = None) -> Path:
    """The models directory: ``given``, else ``$ANOMALENS_MODELS``.

    Raises:
        ValueError: Neither is set.
    """
    chosen = given or os.environ.get(MODELS_ENV)
    if not chosen:
        raise ValueError(f"give the models directory: --models DIR or {MODELS_ENV}=DIR")
    return Path(chosen)


@dataclass(frozen=True)
class Version:
    """One version of a product's detector."""

    product: str
    number: int
    path: Path  # the saved detector folder
    record: dict[str, Any]  # version.json

    @property
    def label(self) -> str:
        """``bottle@3``."""
        return f"{self.product}@{self.number}"


class ModelStore:
    """The products and versions of one models directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ------------------------------------------------------------------ reading
    def products(self) -> list[str]:
        """The product names, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(child.name for child in self.root.iterdir() if child.is_dir() and NAME.match(child.name)
                      and (child / "versions").is_dir())  # fmt: skip

    def versions(self, product: str) -> list[Version]:
        """Every version of ``product``, oldest first.

        Raises:
            ValueError: An unknown product (the message lists the known ones).
        """
        folder = self._product(product) / "versions"
        found = []
        for child in sorted(folder.iterdir()):
            if child.is_dir() and child.name.isdigit() and (child / VERSION_FILE).is_file():
                found.append(Version(product, int(child.name), child, json.loads((child / VERSION_FILE).read_text())))
        return sorted(found, key=lambda version: version.number)

    def active(self, product: str) -> Version:
        """The active version of ``product``.

        Raises:
            ValueError: An unknown product, or one without a version.
        """
        pointer = self._product(product) / ACTIVE_FILE
        if not pointer.is_file():
            raise ValueError(f"product {product!r} has no active version")
        return self.version(product, int(pointer.read_text().strip()))

    def version(self, product: str, number: int) -> Version:
        """Version ``number`` of ``product`` (a ``ValueError`` listing the versions if there is none)."""
        for version in self.versions(product):
            if version.number == number:
                return version
        known = ", ".join(str(version.number) for version in self.versions(product)) or "none"
        raise ValueError(f"product {product!r} has no version {number}; versions: {known}")

    def describe(self, product: str) -> dict[str, Any]:
        """The product's versions (their records) and which is active, JSON-ready."""
        active = self.active(product).number
        return {"product": product, "active": active,
                "versions": [{**version.record, "active": version.number == active} for version in
                             self.versions(product)]}  # fmt: skip

    def _product(self, product: str) -> Path:
        check_product_name(product)
        folder = self.root / product
        if not (folder / "versions").is_dir():
            raise ValueError(f"unknown product {product!r} in {self.root}; products: "
                             f"{', '.join(self.products()) or 'none'}")  # fmt: skip
        return folder

    # ------------------------------------------------------------------ writing
    def add(self, product: str, detector_dir: str | os.PathLike, *, references: list[str] | None = None,
            source: str = "add", note: str | None = None, extra: dict[str, Any] | None = None,
            drift_delta: float | None = DEFAULT_DELTA) -> Version:
        """Copy the saved detector in ``detector_dir`` in as the product's next version and make it active.

        Args:
            product: The product's name (created if new).
            detector_dir: A folder written by ``Detector.save`` / ``anomalens fit`` (checked, hashes included).
            references: The reference images it was fitted on (their SHA-256 are recorded).
            source: What made the version (``add``, ``fit``, ``update``...).
            note: A free note.
            extra: More fields for ``version.json``.
            drift_delta: ``δ`` of the version's drift alarm (:mod:`anomalens.station.drift`), recorded with the rule
                and its assumptions; ``None``: none recorded here (``extra`` may carry a parent's).

        Raises:
            ValueError: An invalid name, or a folder that is not a saved detector (or fails its checks).
        """
        check_product_name(product)
        drift = drift_record(drift_delta) if drift_delta is not None else None
        meta = config_from_saved(detector_dir)  # a saved detector, its files' hashes checked
        versions = self.root / product / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        number = self._claim_number(versions)
        staging = Path(tempfile.mkdtemp(prefix=f".{number:04d}.", dir=versions))
        try:
            for item in Path(detector_dir).iterdir():
                if item.is_file() and not item.name.startswith("."):
                    shutil.copy2(item, staging / item.name)
            created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            record = {"product": product, "version": number, "created": created, "source": source, "note": note,
                      "method": meta["method"], "fingerprint": meta.get("fingerprint"),
                      "config_hash": meta.get("config_hash"), "class_name": meta.get("class_name"),
                      "calibration": {key: meta.get(key) for key in ("threshold", "threshold_source",
                                                                     "pixel_threshold", "threshold_calibration")},
                      "references_sha256": [sha256_file(path) for path in references or []],
                      "anomalens_version": meta.get("anomalens_version"), "drift": drift,
                      **(extra or {})}  # fmt: skip
            (staging / VERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
            honour_umask(staging, directory=True)
            os.replace(staging, versions / f"{number:04d}")  # over the empty claim: one rename, no gap
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._point(product, number)
        return self.version(product, number)

    def rollback(self, product: str, number: int | None = None) -> Version:
        """Make version ``number`` active (default: the newest version older than the active one).

        Raises:
            ValueError: No such version, or no older version to roll back to.
        """
        if number is None:
            current = self.active(product).number
            older = [version.number for version in self.versions(product) if version.number < current]
            if not older:
                raise ValueError(f"product {product!r} has no version older than the active {current}")
            number = older[-1]
        self._point(product, self.version(product, number).number)
        return self.active(product)

    def remove(self, product: str, number: int | None = None) -> None:
        """Remove one version (not the active one), or with ``number=None`` the whole product.

        Raises:
            ValueError: An unknown product or version, or the active version.
        """
        folder = self._product(product)
        if number is None:
            graveyard = folder.with_name(f".{product}.removed.{os.getpid()}")
            os.replace(folder, graveyard)  # gone for readers at once, deleted after
            shutil.rmtree(graveyard, ignore_errors=True)
            return
        version = self.version(product, number)
        if version.number == self.active(product).number:
            raise ValueError(f"version {number} of {product!r} is active: roll back or add another version first")
        shutil.rmtree(version.path)

    def _claim_number(self, versions: Path) -> int:
        """The next free version number, claimed with an atomic ``mkdir`` (two writers never share one)."""
        existing = [int(child.name) for child in versions.iterdir() if child.name.isdigit()]
        number = max(existing, default=0) + 1
        while True:
            try:
                (versions / f"{number:04d}").mkdir()
                return number
            except FileExistsError:
                number += 1

    def _point(self, product: str, number: int) -> None:
        atomic_write_text(self.root / product / ACTIVE_FILE, f"{number}\n")


def is_saved_detector(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a saved detector folder (its ``config.json`` is there)."""
    return (Path(path) / CONFIG_FILE).is_file()
