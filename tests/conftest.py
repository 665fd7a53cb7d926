"""Shared fixtures: an offline, isolated environment; synthetic datasets; tiny detectors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anomalens

SHARED = Path(os.environ.get("ANOMALENS_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_CLIP = "anomalens-tiny-clip"  # tests/assets/anomalens-tiny-clip.json: 3 ViT blocks, 64 wide, real BPE vocabulary

# Tiny configurations for every registered method: the contract tests run each of them.
TINY_VLMDIFF = {  # random tiny autoencoder, text encoder and UNet at 32 px (latents 4 x 4)
    "unet": "tiny",
    "autoencoder": "tiny",
    "autoencoder_weights": None,
    "text_encoder": "tiny",
    "text_encoder_weights": None,
    "image_size": 32,
}
TINY_CONFIGS: dict[str, dict] = {
    "patchcore": {"backbone": "taef2", "pretrained": None, "image_size": 32, "coreset_ratio": 0.5, "batch_size": 4},
    "winclip": {"backbone": TINY_CLIP, "pretrained": None, "batch_size": 4},
    "dual_image_clip": {"backbone": TINY_CLIP, "pretrained": None, "layers": (1, 2), "tta_steps": 3},
    "clipfusion": {
        "backbone": TINY_CLIP,
        "pretrained": None,
        "clip_layers": (1, 2),
        "diffusion": None,
        "diffusion_architecture": "tiny",
        "attention_resolutions": (8, 4),
        "feature_blocks": ("up_blocks.0", "up_blocks.1"),
        "map_size": 32,
    },
    "vlmdiff": {
        "architecture": TINY_VLMDIFF,
        "feature_extractor": "taef2",
        "feature_weights": None,
        "feature_layers": ("block5", "block9"),
        "noise_level": 500,
        "ddim_steps": 2,
        "smoothing_sigma": 1.0,
    },
}
TINY_CONFIGS["ensemble"] = {  # a memory-bank member and a language member, each tiny
    "members": (
        {"method": "patchcore", **TINY_CONFIGS["patchcore"]},
        {"method": "winclip", **TINY_CONFIGS["winclip"]},
    ),
    "batch_size": 4,
}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``heavy`` (a Ray cluster, a browser, fuzzing, 10,000 images) run with ANOMALENS_HEAVY=1, as in
    CI (``.ci/run``); the default run stays fast."""
    if os.environ.get("ANOMALENS_HEAVY") == "1":
        return
    skip = pytest.mark.skip(reason="heavy: set ANOMALENS_HEAVY=1 to run it (CI does)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def tiny_clip_config():
    """Register the tiny open_clip config (open_clip's extension point for model configs)."""
    import open_clip

    open_clip.add_model_config(ASSETS / f"{TINY_CLIP}.json")


@pytest.fixture(autouse=True)
def offline_environment(monkeypatch, tmp_path_factory):
    """No network, no user cache, no weights folder from the caller's shell."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("ANOMALENS_WEIGHTS_DIR", raising=False)


def textured_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth, product-like texture: horizontal stripes plus mild noise, ``(H, W, 3)`` uint8."""
    rows = np.linspace(0, 6 * np.pi, height)[:, None]
    base = 120 + 60 * np.sin(rows + rng.uniform(0, 0.2)) * np.ones((1, width))
    image = base[:, :, None] + rng.normal(0, 4, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def bilinear_upsample(grid: np.ndarray, size: int, align_corners: bool = False) -> np.ndarray:
    """Bilinear upsampling of an ``(h, w, ...)`` grid to ``(size, size, ...)`` with a plain loop: half-pixel
    centres and clamped edges, or (``align_corners``) the corner samples on the corner pixels."""
    height, width = grid.shape[:2]
    out = np.empty((size, size, *grid.shape[2:]))
    for y in range(size):
        for x in range(size):
            if align_corners:
                sy, sx = y * (height - 1) / (size - 1), x * (width - 1) / (size - 1)
            else:
                sy = min(max((y + 0.5) * height / size - 0.5, 0.0), height - 1)
                sx = min(max((x + 0.5) * width / size - 0.5, 0.0), width - 1)
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            fy, fx = sy - y0, sx - x0
            top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
            bottom = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


def plant_defect(image: np.ndarray, top: int, left: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A saturated square (the defect) and its mask."""
    defective = image.copy()
    defective[top : top + size, left : left + size] = (255, 20, 20)
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    mask[top : top + size, left : left + size] = 255
    return defective, mask


def write_mvtec(root: Path, category: str = "widget", *, n_train: int = 4, n_good: int = 3, n_bad: int = 3,
                size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:  # fmt: skip
    """Write a synthetic MVTec AD category (non-square images, one defect type with masks)."""
    rng = np.random.default_rng(seed)
    height, width = size
    base = root / category
    for index in range(n_train):
        _save(base / "train" / "good" / f"{index:03d}.png", textured_image(rng, height, width))
    for index in range(n_good):
        _save(base / "test" / "good" / f"{index:03d}.png", textured_image(rng, height, width))
    for index in range(n_bad):
        image, mask = plant_defect(textured_image(rng, height, width), 8 + 2 * index, 10 + 3 * index, 10)
        _save(base / "test" / "scratch" / f"{index:03d}.png", image)
        _save(base / "ground_truth" / "scratch" / f"{index:03d}_mask.png", mask)
    return root


def write_noise_images(folder: Path, count: int, *, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """Write ``count`` uniform-noise RGB images ``00000.png``, ``00001.png``, ... into a new ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{index:05d}.png")
    return folder


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def mvtec_root(tmp_path) -> Path:
    return write_mvtec(tmp_path / "mvtec")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def tiny_detector(method: str, **overrides):
    return anomalens.create(method, **{**TINY_CONFIGS[method], **overrides})


@dataclass
class BrightnessConfig(anomalens.DetectorConfig):
    batch_size: int = 4  # images per forward pass
    fail_on_width: int = 0  # raise on any image of this width (0: never), to simulate a model error


class BrightnessDetector(anomalens.Detector):
    """A zero-shot toy method for engine tests: the score is the image's mean brightness."""

    method_name = "brightness_test"
    config_class = BrightnessConfig
    zero_shot, few_shot = True, False

    def _fit(self, reference_images, class_name):
        pass

    def _predict_batch(self, images):
        if any(image.shape[1] == self.config.fail_on_width for image in images):
            raise RuntimeError(f"cannot handle width {self.config.fail_on_width}")
        maps = torch.stack([torch.full((4, 4), float(image.mean())) for image in images])
        return maps.flatten(1).amax(1), maps


def predict_local(detector, inputs, out, progress=None, batch_size=None, **settings):
    """The local engine over ``inputs``, with the predict request built as the command line builds it."""
    from anomalens.engines.local import run_predict
    from anomalens.engines.request import OutputSettings, PredictRequest

    request = PredictRequest.prepare(inputs, OutputSettings(out=str(out), **settings), batch_size=batch_size)
    return run_predict(detector, request.calibrated(detector), progress)


def predict_ray(detector_or_path, inputs, out, *, batch_size=None, overwrite=False, progress=None, **engine):
    """The Ray engine over ``inputs`` (URIs included), resuming an earlier run in ``out`` as the command line does."""
    from anomalens.engines.ray import list_inputs, score
    from anomalens.engines.request import OutputSettings, PredictRequest

    request = PredictRequest.prepare(inputs, OutputSettings(out=str(out), overwrite=overwrite), batch_size=batch_size,
                                     lister=list_inputs, resumable=True)  # fmt: skip
    return score(detector_or_path, request, progress=progress, **engine)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (Debian's; .ci/run installs it where it is missing)."""
    from postgres_server import PostgresServer, postgres_bin

    if postgres_bin() is None:
        pytest.skip("needs Debian's postgresql (apt-get install postgresql; .ci/run installs it)")
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty history database: an SQLite file, and a new database on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.db'}"
    import uuid

    return request.getfixturevalue("postgres").database(f"t{uuid.uuid4().hex[:12]}")
