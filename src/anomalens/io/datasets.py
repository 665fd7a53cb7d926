"""Benchmark datasets as lists of :class:`Sample` records (paths, labels, masks), read lazily.

- ``mvtec``: the MVTec AD layout, ``<root>/<category>/train/good``, ``<root>/<category>/test/<type>``,
  ``<root>/<category>/ground_truth/<type>/<stem>_mask.png``. The same reader serves MPDD, BTAD
  (``ok``/``ko`` folders, masks named like their images), converted KolektorSDD, and MVTec AD 2's public
  test set (``test_public/{good,bad}`` with ``test_public/ground_truth/bad``).
- ``visa``: VisA with its ``split_csv/1cls.csv`` split.
- ``realiad``: Real-IAD with its JSON split files (``realiad_jsons/<category>.json``).
- ``folder``: your own folder, ``<root>/good`` (normal), any other sub-folder (defect types),
  optional ``<root>/masks/<type>/<stem>[_mask].<ext>`` and optional ``<root>/reference`` (normal
  images for few-shot references; without it, references are drawn from ``good`` and left out of the test).

An anomalous image whose mask is missing (where the dataset has masks) or of another size is an error
that names both files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalens.io.images import IMAGE_EXTENSIONS, load_mask

NORMAL_FOLDER_NAMES = ("good", "ok", "normal")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split."""

    image_path: Path
    label: int  # 0 normal, 1 anomalous
    category: str
    defect_type: str  # "good" for normal images
    mask_path: Path | None = None  # None for normal images (an all-zero mask)

    def mask(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The boolean ``(H, W)`` ground truth for an image of ``shape``: all False if normal, ``None`` if unknown.

        Raises:
            ValueError: The mask file cannot be read or its size differs from the image's.
        """
        if self.mask_path is None:
            return None if self.label else np.zeros(shape[:2], dtype=bool)
        return load_mask(self.mask_path, shape)


class Dataset:
    """Base class: categories, the normal training pool and the labelled test split."""

    name = ""

    def categories(self) -> list[str]:
        raise NotImplementedError

    def train_samples(self, category: str) -> list[Sample]:
        """Normal images references are drawn from."""
        raise NotImplementedError

    def test_samples(self, category: str) -> list[Sample]:
        """Labelled test images, normal and anomalous."""
        raise NotImplementedError

    def _check_category(self, category: str) -> None:
        valid = self.categories()
        if category not in valid:
            raise ValueError(f"unknown category {category!r} for {self.name} at {self.root}; valid: {', '.join(valid)}")


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for extension in (".png", ".bmp", ".tif", ".tiff", ".jpg"):
            candidate = folder / f"{name}{extension}"
            if candidate.is_file():
                return candidate
    return None


def _require_root(root: str | os.PathLike, dataset: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise ValueError(f"{dataset} root {str(path)!r} is not a folder")
    return path


class MVTecAD(Dataset):
    """The MVTec AD layout (also MPDD, BTAD, MVTec AD 2 public test, converted KolektorSDD)."""

    name = "mvtec"

    def __init__(self, root: str | os.PathLike):
        self.root = _require_root(root, self.name)

    def categories(self) -> list[str]:
        found = sorted(
            child.name
            for child in self.root.iterdir()
            if child.is_dir() and self._test_dir(child) is not None  # train/ is optional (references from test)
        )
        if not found and self._test_dir(self.root) is not None:
            return [self.root.name]  # the root is itself one category
        return found

    def _category_dir(self, category: str) -> Path:
        self._check_category(category)
        if self.root.name == category and self._test_dir(self.root) is not None:
            return self.root
        return self.root / category

    @staticmethod
    def _test_dir(category_dir: Path) -> Path | None:
        for name in ("test", "test_public"):
            if (category_dir / name).is_dir():
                return category_dir / name
        return None

    def train_samples(self, category: str) -> list[Sample]:
        train = self._category_dir(category) / "train"
        if not train.exists():
            return []  # a set without a training split: the benchmark draws references from test/good
        normal = next((train / name for name in NORMAL_FOLDER_NAMES if (train / name).is_dir()), None)
        if normal is None:
            raise ValueError(f"{train} has no normal folder (expected one of {', '.join(NORMAL_FOLDER_NAMES)})")
        return [Sample(path, 0, category, "good") for path in _images_in(normal)]

    def test_samples(self, category: str) -> list[Sample]:
        category_dir = self._category_dir(category)
        test = self._test_dir(category_dir)
        truth_dirs = [category_dir / "ground_truth", test / "ground_truth"]
        samples = []
        for type_dir in sorted(child for child in test.iterdir() if child.is_dir() and child.name != "ground_truth"):
            normal = type_dir.name.lower() in NORMAL_FOLDER_NAMES
            for path in _images_in(type_dir):
                if normal:
                    samples.append(Sample(path, 0, category, "good"))
                    continue
                mask = next(
                    (m for d in truth_dirs if (m := _find_mask(d / type_dir.name, path.stem)) is not None), None
                )
                if mask is None:
                    raise ValueError(
                        f"anomalous image {path} has no mask: expected {truth_dirs[0] / type_dir.name / path.stem}"
                        "_mask.png (or the same stem, .png/.bmp/.tif)"
                    )
                samples.append(Sample(path, 1, category, type_dir.name, mask))
        return samples


class VisA(Dataset):
    """VisA, split by ``split_csv/1cls.csv`` (columns ``object,split,label,image,mask``)."""

    name = "visa"

    def __init__(self, root: str | os.PathLike, split_file: str = "split_csv/1cls.csv"):
        self.root = _require_root(root, self.name)
        self.split_path = self.root / split_file
        if not self.split_path.is_file():
            raise ValueError(f"VisA split file {self.split_path} not found (expected the official split_csv/1cls.csv)")
        with open(self.split_path, newline="") as handle:
            self.rows = list(csv.DictReader(handle))
        required = {"object", "split", "label", "image", "mask"}
        if not self.rows or not required <= set(self.rows[0]):
            raise ValueError(f"{self.split_path} must have columns {sorted(required)}")

    def categories(self) -> list[str]:
        return sorted({row["object"] for row in self.rows})

    def _samples(self, category: str, split: str) -> list[Sample]:
        self._check_category(category)
        samples = []
        for row in self.rows:
            if row["object"] != category or row["split"] != split:
                continue
            image = self.root / row["image"]
            anomalous = row["label"].strip().lower() not in ("normal", "0", "good")
            mask = self.root / row["mask"] if anomalous and row["mask"].strip() else None
            if anomalous and (mask is None or not mask.is_file()):
                raise ValueError(f"anomalous image {image} has no mask file ({row['mask']!r} in {self.split_path})")
            samples.append(Sample(image, int(anomalous), category, "anomaly" if anomalous else "good", mask))
        return samples

    def train_samples(self, category: str) -> list[Sample]:
        return [sample for sample in self._samples(category, "train") if sample.label == 0]

    def test_samples(self, category: str) -> list[Sample]:
        return self._samples(category, "test")


class RealIAD(Dataset):
    """Real-IAD with its JSON splits: ``{"meta": {"prefix", "normal_class"}, "train": [...], "test": [...]}``.

    Each entry has ``category``, ``anomaly_class``, ``image_path`` and ``mask_path``. Images are looked up
    under ``image_root`` (default: the first of ``realiad_1024``, ``realiad_512``, ``realiad_256``,
    ``realiad_raw`` found in the root, else the root), with or without a ``<category>/`` prefix.
    """

    name = "realiad"

    def __init__(self, root: str | os.PathLike, json_dir: str | None = None, image_root: str | None = None):
        self.root = _require_root(root, self.name)
        candidates = [self.root / json_dir] if json_dir else [self.root / "realiad_jsons" / "realiad_jsons",
                                                                self.root / "realiad_jsons", self.root]  # fmt: skip
        self.json_dir = next((path for path in candidates if path.is_dir() and any(path.glob("*.json"))), None)
        if self.json_dir is None:
            raise ValueError(f"no Real-IAD JSON split files found in {', '.join(map(str, candidates))}")
        if image_root:
            self.image_root = self.root / image_root
        else:
            names = ("realiad_1024", "realiad_512", "realiad_256", "realiad_raw")
            self.image_root = next((self.root / n for n in names if (self.root / n).is_dir()), self.root)

    def categories(self) -> list[str]:
        return sorted(path.stem for path in self.json_dir.glob("*.json"))

    def _split(self, category: str, split: str) -> list[Sample]:
        self._check_category(category)
        path = self.json_dir / f"{category}.json"
        data = json.loads(path.read_text())
        if split not in data:
            raise ValueError(f"{path} has no {split!r} list")
        meta = data.get("meta", {})
        normal_class = meta.get("normal_class", "OK")
        prefix = meta.get("prefix", "") or ""
        samples = []
        for entry in data[split]:
            anomalous = entry.get("anomaly_class", normal_class) != normal_class
            image = self._locate(category, prefix, entry["image_path"])
            mask = self._locate(category, prefix, entry["mask_path"]) if entry.get("mask_path") else None
            if anomalous and (mask is None or not mask.is_file()):
                raise ValueError(f"anomalous image {image} has no mask file ({entry.get('mask_path')!r} in {path})")
            defect = entry.get("anomaly_class", "OK") if anomalous else "good"
            samples.append(Sample(image, int(anomalous), category, defect, mask))
        return samples

    def _locate(self, category: str, prefix: str, relative: str) -> Path:
        options = [self.image_root / prefix / relative, self.image_root / category / prefix / relative]
        return next((path for path in options if path.exists()), options[0])

    def train_samples(self, category: str) -> list[Sample]:
        return [sample for sample in self._split(category, "train") if sample.label == 0]

    def test_samples(self, category: str) -> list[Sample]:
        return self._split(category, "test")


class Folder(Dataset):
    """Your own images: ``<root>/good``, one sub-folder per defect type, optional ``masks`` and ``reference``.

    Without masks, pixel metrics are ``nan``. Without a ``reference`` folder, the normal images are split
    in two by a hash of their file name (stable across runs and seeds): one half is the reference pool,
    the other half is tested.
    """

    name = "folder"

    def __init__(self, root: str | os.PathLike, normal_dir: str = "good", mask_dir: str = "masks",
                 reference_dir: str = "reference"):  # fmt: skip
        self.root = _require_root(root, self.name)
        self.normal_dir, self.mask_dir, self.reference_dir = normal_dir, mask_dir, reference_dir
        if not (self.root / normal_dir).is_dir():
            raise ValueError(f"folder dataset {self.root} has no normal-image folder {normal_dir!r}")

    def categories(self) -> list[str]:
        return [self.root.name]

    def _normal_split(self) -> tuple[list[Path], list[Path]]:
        normals = _images_in(self.root / self.normal_dir)
        if (self.root / self.reference_dir).is_dir():
            return _images_in(self.root / self.reference_dir), normals
        in_pool = [int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 2 == 0 for path in normals]
        return [p for p, keep in zip(normals, in_pool) if keep], [p for p, keep in zip(normals, in_pool) if not keep]

    def train_samples(self, category: str) -> list[Sample]:
        self._check_category(category)
        return [Sample(path, 0, category, "good") for path in self._normal_split()[0]]

    def test_samples(self, category: str) -> list[Sample]:
        self._check_category(category)
        samples = [Sample(path, 0, category, "good") for path in self._normal_split()[1]]
        skip = {self.normal_dir, self.mask_dir, self.reference_dir}
        masks_root = self.root / self.mask_dir
        for type_dir in sorted(child for child in self.root.iterdir() if child.is_dir() and child.name not in skip):
            for path in _images_in(type_dir):
                mask = _find_mask(masks_root / type_dir.name, path.stem) if masks_root.is_dir() else None
                if masks_root.is_dir() and mask is None:
                    raise ValueError(f"anomalous image {path} has no mask in {masks_root / type_dir.name}")
                samples.append(Sample(path, 1, category, type_dir.name, mask))
        return samples


DATASETS: dict[str, type[Dataset]] = {"mvtec": MVTecAD, "visa": VisA, "realiad": RealIAD, "folder": Folder}


def register_dataset(name: str, cls: type[Dataset]) -> type[Dataset]:
    """Add a dataset layout under ``name`` (``anomalens benchmark --dataset NAME`` accepts it from then on).

    Raises:
        ValueError: ``cls`` is not a :class:`Dataset` subclass, or the name is taken.
    """
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise ValueError(f"{cls!r} must be a subclass of anomalens.io.datasets.Dataset")
    if name in DATASETS and DATASETS[name] is not cls:
        raise ValueError(f"dataset {name!r} is registered already; registered: {', '.join(list_datasets())}")
    DATASETS[name] = cls
    return cls


def list_datasets() -> list[str]:
    """Names accepted by :func:`open_dataset` and ``anomalens benchmark --dataset``."""
    return sorted(DATASETS)


def open_dataset(name: str, root: str | os.PathLike) -> Dataset:
    """Open dataset ``name`` at ``root``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(list_datasets())}")
    return DATASETS[name](root)
