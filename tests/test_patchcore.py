"""PatchCore specifics: features, memory, scoring, golden value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import anomalens
from anomalens.methods.patchcore import PatchCore

from conftest import TINY_CONFIGS, plant_defect, textured_image, tiny_detector


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
    detector = tiny_detector(
        "patchcore", coreset_ratio=1.0, smoothing_sigma=0.0, image_score="max", map_upsampling="nearest"
    ).fit(references)
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


def _independent_patchcore(detector, references, query, *, include_padding, reduce_to, upsampling, border):
    """PatchCore's scoring recomputed from the backbone's raw feature maps with NumPy / SciPy loops: the 3 x 3
    average (zero padding counted or not), bilinear alignment, channel averaging, brute-force nearest distances,
    upsampling, scipy's Gaussian filter, and Eq. 7 with b = 9 by sorting all distances."""
    import scipy.ndimage

    def embed(image):
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        tensor = torch.nn.functional.interpolate(tensor, size=(32, 32), mode="bilinear", antialias=True)
        maps = [feature.double()[0].numpy() for feature in detector.backbone(tensor)]
        pooled = []
        for feature in maps:
            channels, height, width = feature.shape
            out = np.zeros_like(feature)
            for row in range(height):
                for column in range(width):
                    rows = slice(max(row - 1, 0), min(row + 2, height))
                    columns = slice(max(column - 1, 0), min(column + 2, width))
                    window = feature[:, rows, columns]
                    count = 9 if include_padding else window.shape[1] * window.shape[2]
                    out[:, row, column] = window.sum((1, 2)) / count
            pooled.append(torch.from_numpy(out)[None])
        grid = pooled[0].shape[-2:]
        aligned = [pooled[0]] + [torch.nn.functional.interpolate(f, size=grid, mode="bilinear") for f in pooled[1:]]
        features = torch.cat(aligned, 1)[0].permute(1, 2, 0).reshape(-1, sum(f.shape[1] for f in aligned))
        if reduce_to:
            features = torch.nn.functional.adaptive_avg_pool1d(features[:, None], reduce_to)[:, 0]
        return features.numpy(), grid

    bank = np.concatenate([embed(reference)[0] for reference in references])
    features, grid = embed(query)
    distances = np.sqrt(((features[:, None, :] - bank[None]) ** 2).sum(-1))
    patch_scores = distances.min(1)
    worst = int(patch_scores.argmax())
    anchor = bank[distances[worst].argmin()]
    support = np.argsort(np.sqrt(((bank - anchor) ** 2).sum(-1)), kind="stable")[:9]
    to_support = np.sqrt(((bank[support] - features[worst]) ** 2).sum(-1))
    softmax = np.exp(to_support - to_support.max()) / np.exp(to_support - to_support.max()).sum()
    score = (1 - softmax[0]) * patch_scores[worst]
    patch_map = torch.from_numpy(patch_scores.reshape(1, 1, *grid))
    corners = {"align_corners": False} if upsampling == "bilinear" else {}
    upsampled = torch.nn.functional.interpolate(patch_map, size=(32, 32), mode=upsampling, **corners)[0, 0].numpy()
    return score, scipy.ndimage.gaussian_filter(upsampled, 4.0, mode=border, truncate=4.0)


@pytest.mark.parametrize(
    ("compat", "include_padding", "reduce_to", "upsampling", "border"),
    [("paper", True, 96, "bilinear", "reflect"), ("anomalib", True, 0, "nearest", "mirror")],
)
def test_scoring_matches_an_independent_recomputation(compat, include_padding, reduce_to, upsampling, border):
    rng = np.random.default_rng(42)
    references = [textured_image(rng, 32, 32) for _ in range(2)]
    defective, _ = plant_defect(textured_image(rng, 32, 32), 8, 8, 10)
    options = {"feature_dim": reduce_to} if compat == "paper" else {}
    detector = tiny_detector("patchcore", coreset_ratio=1.0, compat=compat, **options).fit(references)
    result = detector.predict([defective])[0]
    expected_score, expected_map = _independent_patchcore(
        detector, references, defective, include_padding=include_padding, reduce_to=reduce_to,
        upsampling=upsampling, border=border,
    )  # fmt: skip
    assert result.score == pytest.approx(expected_score, rel=1e-4)
    np.testing.assert_allclose(result.anomaly_map, expected_map, rtol=1e-4, atol=1e-5)


def test_eq7_reweighting_by_hand():
    """The paper's Eq. 7 with two memory entries on a line, m* = (0, 0) and (-7, 0), b = 2: m_test* = (3, 0) is 3
    from m* and 10 from the other, so s = (1 - e^3 / (e^3 + e^10)) * 3."""
    from anomalens.methods.patchcore import reweighted_scores
    from anomalens.nn.memory import NearestNeighbourMemory

    memory = NearestNeighbourMemory().fit(torch.tensor([[0.0, 0.0], [-7.0, 0.0]]))
    features = torch.tensor([[[3.0, 0.0], [0.5, 0.0]]])  # the first patch is the worst (3 > 0.5)
    scores = reweighted_scores(torch.tensor([[3.0, 0.5]]), torch.tensor([[0, 0]]), features, memory, 2)
    weight = 1 - math.exp(3) / (math.exp(3) + math.exp(10))
    assert float(scores[0]) == pytest.approx(weight * 3.0, rel=1e-6)


def test_uniform_normal_images_give_no_border_peak():
    """References and test image share a uniform product with a defect-free border: the map is flat where the
    test image equals the references (the border included) and peaks at the defect, never at the border."""
    reference = np.full((64, 64, 3), 128, np.uint8)
    defective = reference.copy()
    defective[28:36, 28:36] = (250, 30, 30)
    detector = tiny_detector("patchcore", image_size=64, coreset_ratio=1.0).fit([reference, reference.copy()])
    normal_map = detector.predict([reference])[0].anomaly_map
    assert float(np.abs(normal_map).max()) < 1e-3
    anomaly_map = detector.predict([defective])[0].anomaly_map
    row, column = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
    assert 20 <= row <= 44 and 20 <= column <= 44, (row, column)
    border = np.concatenate([anomaly_map[:4].ravel(), anomaly_map[-4:].ravel(), anomaly_map[:, :4].ravel(),
                             anomaly_map[:, -4:].ravel()])  # fmt: skip
    assert border.max() < 0.2 * anomaly_map.max()


def test_compat_presets_and_overrides():
    paper = PatchCore.config_class(backbone="taef2", pretrained=None)
    assert (paper.neighbourhood_padding, paper.feature_dim, paper.map_upsampling, paper.smoothing_border,
            paper.image_score) == ("zeros", 1024, "bilinear", "reflect", "reweighted")  # fmt: skip
    anomalib = PatchCore.config_class(backbone="taef2", pretrained=None, compat="anomalib", map_upsampling="bilinear")
    assert (anomalib.feature_dim, anomalib.map_upsampling, anomalib.smoothing_border) == (0, "bilinear", "mirror")
    with pytest.raises(ValueError, match="unknown patchcore compat 'pytorch'; valid: paper, anomalib"):
        PatchCore.config_class(compat="pytorch")
    with pytest.raises(ValueError, match="smoothing_border='wrap' must be one of nearest, reflect, mirror"):
        PatchCore.config_class(smoothing_border="wrap")


def test_detectors_saved_before_the_compat_fields_keep_their_scoring(tmp_path):
    import json

    rng = np.random.default_rng(0)
    references = [textured_image(rng, 32, 32) for _ in range(2)]
    former = tiny_detector("patchcore", neighbourhood_padding="exclude", map_upsampling="bilinear",
                           smoothing_border="nearest", image_score="max").fit(references)  # fmt: skip
    former.save(tmp_path / "saved")
    config_file = next(path for path in (tmp_path / "saved").iterdir() if path.suffix == ".json")
    meta = json.loads(config_file.read_text())
    for name in ("compat", "neighbourhood_padding", "map_upsampling", "smoothing_border", "image_score",
                 "num_neighbours"):  # fmt: skip
        meta["config"].pop(name)  # as an earlier anomalens wrote it
    config_file.write_text(json.dumps(meta))
    loaded = anomalens.load(tmp_path / "saved")
    query = textured_image(rng, 32, 32)
    assert loaded.predict([query])[0].score == pytest.approx(former.predict([query])[0].score, rel=1e-6)


def test_approximate_search_probing_every_list_scores_as_the_exact_search():
    """``search="approximate"`` with as many probes as lists searches every entry: the exact scores and maps; with
    fewer probes a score can only rise (a neighbour missed is farther). Bad settings name the field."""
    rng = np.random.default_rng(5)
    references = [textured_image(rng, 40, 40) for _ in range(3)]
    queries = [textured_image(rng, 40, 40) for _ in range(2)]
    options = {**TINY_CONFIGS["patchcore"], "coreset_ratio": 1.0, "image_score": "max"}
    exact = anomalens.create("patchcore", **options).fit(references, threshold=None)
    every = anomalens.create("patchcore", **options, search="approximate", search_lists=6, search_probes=6)
    every.fit(references, threshold=None)
    few = anomalens.create("patchcore", **options, search="approximate", search_lists=6, search_probes=1)
    few.fit(references, threshold=None)
    for a, b, c in zip(exact.predict(queries), every.predict(queries), few.predict(queries)):
        assert b.score == pytest.approx(a.score, rel=1e-6)
        assert np.allclose(b.anomaly_map, a.anomaly_map, atol=1e-6)
        assert c.score >= a.score - 1e-6  # the smoothed map's maximum, over distances that can only grow
    with pytest.raises(ValueError, match="search='fast'.*exact or approximate"):
        anomalens.create("patchcore", **options, search="fast")
