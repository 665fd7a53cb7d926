"""PatchCore specifics: features, memory, scoring, golden value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anomalens
from anomalens.methods.patchcore import PatchCore

from conftest import plant_defect, textured_image, tiny_detector


def test_embedding_grid_and_width():
    detector = tiny_detector("patchcore", image_size=64)
    features = detector.embed(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 16, 16, 128)  # block9 grid (stride 4), 64 + 64 channels
    narrow = tiny_detector("patchcore", image_size=64, feature_dim=32)
    assert narrow.embed(torch.rand(1, 3, 64, 64)).shape == (1, 16, 16, 32)


def test_memory_size_follows_coreset_ratio():
    rng = np.random.default_rng(0)
    references = [textured_image(rng, 32, 32) for _ in range(2)]
    full = tiny_detector("patchcore", coreset_ratio=1.0).fit(references)
    assert len(full.memory) == 2 * 8 * 8
    reduced = tiny_detector("patchcore", coreset_ratio=0.25).fit(references)
    assert len(reduced.memory) == 32


def test_patch_score_is_nearest_neighbour_distance():
    rng = np.random.default_rng(0)
    references = [textured_image(rng, 32, 32)]
    detector = tiny_detector("patchcore", coreset_ratio=1.0, smoothing_sigma=0.0).fit(references)
    query = textured_image(rng, 32, 32)
    features = detector.embed(torch.from_numpy(query).permute(2, 0, 1)[None].float() / 255)
    bank = detector.memory.bank
    expected = torch.cdist(features.reshape(-1, bank.shape[1]).double(), bank.double()).min(1).values.max()
    assert detector.predict([query])[0].score == pytest.approx(float(expected), rel=1e-4)


def test_planted_defect_is_found():
    rng = np.random.default_rng(1)
    references = [textured_image(rng, 64, 64) for _ in range(3)]
    detector = tiny_detector("patchcore", image_size=64, coreset_ratio=1.0).fit(references)
    normal = textured_image(rng, 64, 64)
    defective, mask = plant_defect(textured_image(rng, 64, 64), 20, 30, 14)
    normal_result, defect_result = detector.predict([normal, defective])
    assert defect_result.score > normal_result.score
    anomaly_map = defect_result.anomaly_map
    assert anomaly_map[mask > 0].mean() > anomaly_map[mask == 0].mean() * 1.5


def test_config_validation_names_values():
    with pytest.raises(ValueError, match=r"coreset_ratio=1.5 must be in \(0, 1\]"):
        anomalens.create("patchcore", backbone="taef2", pretrained=None, coreset_ratio=1.5)
    with pytest.raises(ValueError, match="neighbourhood=2 must be an odd integer"):
        anomalens.create("patchcore", backbone="taef2", pretrained=None, neighbourhood=2)
    with pytest.raises(ValueError, match="layers .*'layer9'.* valid layers: block1, block5"):
        anomalens.create("patchcore", backbone="taef2", pretrained=None, layers=("layer9",))
    valid = "dino_vits8, resnet18, taef2, vgg16_bn, wide_resnet50_2"
    with pytest.raises(ValueError, match=f"unknown backbone 'vit'; valid backbones: {valid}"):
        anomalens.create("patchcore", backbone="vit")
    with pytest.raises(ValueError, match="cannot read 'abc' as int"):
        anomalens.create("patchcore", backbone="taef2", pretrained=None, image_size="abc")


def test_cli_style_string_options_are_coerced():
    detector = anomalens.create(
        "patchcore", backbone="taef2", pretrained="none", layers="block5,block9", image_size="48", coreset_ratio="0.5"
    )
    assert detector.config.pretrained is None and detector.config.layers == ("block5", "block9")
    assert detector.config.image_size == 48 and detector.config.coreset_ratio == 0.5


def test_required_weights():
    assert PatchCore.required_weights(PatchCore.config_class(backbone="taef2")) == ["taef2_encoder"]
    assert PatchCore.required_weights(PatchCore.config_class()) == ["wide_resnet50_2"]
    assert PatchCore.required_weights(PatchCore.config_class(pretrained=None)) == []


def test_default_backbone_needs_weights_offline():
    with pytest.raises(anomalens.WeightsNotFoundError, match="'wide_resnet50_2'.*weights download patchcore"):
        anomalens.create("patchcore")


def test_wide_resnet_random_init_runs():
    detector = anomalens.create("patchcore", pretrained=None, image_size=64, coreset_ratio=0.5)
    rng = np.random.default_rng(0)
    detector.fit([textured_image(rng, 64, 64)])
    result = detector.predict([textured_image(rng, 50, 70)])[0]
    assert result.anomaly_map.shape == (50, 70)
    assert detector.embed(torch.rand(1, 3, 64, 64)).shape == (1, 8, 8, 1024)  # layer2 grid, averaged to 1024


def test_golden_value():
    """A seeded tiny model on a fixed synthetic image gives a recorded score (guards silent behaviour changes)."""
    rng = np.random.default_rng(42)
    references = [textured_image(rng, 32, 32) for _ in range(2)]
    defective, _ = plant_defect(textured_image(rng, 32, 32), 8, 8, 10)
    detector = tiny_detector("patchcore", seed=0).fit(references)
    result = detector.predict([defective])[0]
    assert result.score == pytest.approx(GOLDEN_SCORE, rel=1e-4)
    assert float(result.anomaly_map.mean()) == pytest.approx(GOLDEN_MAP_MEAN, rel=1e-4)


GOLDEN_SCORE = 0.30861207842826843
GOLDEN_MAP_MEAN = 0.22976043820381165
