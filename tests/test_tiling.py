"""Tiling: tile geometry against brute force, stitching against a hand computation, and a thin defect on an
elongated part that the whole-image path misses and the tiled path finds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anomalens
from anomalens.evaluation.metrics import auroc
from anomalens.tiling import TileConfig, blend_weights, tile_boxes

from conftest import TINY_CONFIGS, BrightnessDetector


@pytest.mark.parametrize("height,width,config", [
    (32, 384, TileConfig()), (900, 900, TileConfig(size=600)), (500, 1250, TileConfig(size=256, overlap=0.5)),
    (100, 130, TileConfig(size=40, stride=25)), (20, 30, TileConfig(size=64)),
])  # fmt: skip
def test_tiles_cover_the_image_square_and_overlapping_enough(height, width, config):
    boxes = tile_boxes(height, width, config)
    covered = np.zeros((height, width), dtype=int)
    side = min(config.size or min(height, width), height, width)
    for top, left, bottom, right in boxes:
        assert bottom - top == right - left == side  # square: the part's aspect is kept inside each tile
        assert 0 <= top and 0 <= left and bottom <= height and right <= width
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1  # every pixel is scored
    stride = config.stride or round(side * (1 - config.overlap))
    for axis in (0, 1):  # neighbours start at most `stride` apart
        starts = sorted({box[axis] for box in boxes})
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    assert len(boxes) == len(set(boxes))


def test_tiling_options_parse_and_refuse_bad_values():
    assert TileConfig.parse("size=512,overlap=0.5") == TileConfig(size=512, overlap=0.5)
    assert TileConfig.parse({"size": 64}) == TileConfig(size=64)
    assert TileConfig.parse("on") == TileConfig() and TileConfig.parse("off") is None
    with pytest.raises(ValueError, match=r"unknown tiling option\(s\) \['sise'\]; valid options: size"):
        TileConfig.parse("sise=5")
    with pytest.raises(ValueError, match=r"tiling option overlap=1.0 must be in \[0, 1\)"):
        TileConfig(overlap=1.0)
    with pytest.raises(ValueError, match="tiling option aspect='stretch' must be one of keep"):
        TileConfig.parse("aspect=stretch")
    detector = anomalens.create("patchcore", **{**TINY_CONFIGS["patchcore"], "tiling": "size=16"})
    assert detector.config.tiling == TileConfig(size=16)


def test_stitched_map_is_the_weighted_mean_of_the_tiles():
    """A toy method whose map is the tile's own pixel values: stitching must give back the image exactly (every
    tile agrees), and the score is the stitched map's maximum."""

    class Identity(BrightnessDetector):
        method_name = "identity_test"

        def _predict_batch(self, images):
            maps = torch.stack([torch.from_numpy(image[:, :, 0].astype(np.float32)) for image in images])
            return maps.flatten(1).amax(1) * 0, maps

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 71, 3), dtype=np.uint8)
    detector = Identity(Identity.config_class(tiling=TileConfig(size=20, overlap=0.4))).fit(None)
    result = detector.predict(image)[0]
    assert np.allclose(result.anomaly_map, image[:, :, 0], atol=1e-4)
    assert result.score == pytest.approx(float(image[:, :, 0].max()), abs=1e-3)
    # the blend weights: 1 inside, a linear ramp of `ramp` pixels at each edge
    weights = blend_weights(10, 3)
    assert np.allclose(weights[5], [0.25, 0.5, 0.75, 1, 1, 1, 1, 0.75, 0.5, 0.25])


def _elongated_part(rng: np.random.Generator, height: int = 32, width: int = 384) -> np.ndarray:
    columns = np.linspace(0, 24 * np.pi, width)[None, :]
    base = 128 + 50 * np.sin(columns + rng.uniform(0, 0.3)) * np.ones((height, 1))
    return np.clip(base[:, :, None] + rng.normal(0, 3, (height, width, 3)), 0, 255).astype(np.uint8)


def test_thin_defect_on_an_elongated_part_is_missed_whole_and_found_tiled():
    """A 2-px crack on a 32 x 384 part: squeezed into the model's 32 px square it is averaged away (AUROC near
    chance); tiles of the shorter side keep it at full resolution (perfect separation, the map's peak on it)."""
    rng = np.random.default_rng(0)
    references = [_elongated_part(rng) for _ in range(3)]
    normal = [_elongated_part(rng) for _ in range(6)]
    defective, cracks = [], []
    for _ in range(6):
        image = _elongated_part(rng)
        left, top = int(rng.integers(20, 364)), int(rng.integers(4, 20))
        image[top : top + 8, left : left + 2] = 0
        defective.append(image)
        cracks.append((top, left))
    labels = [0] * 6 + [1] * 6
    aurocs = {}
    for tiling in (None, "size=0,overlap=0.25"):
        detector = anomalens.create("patchcore", **{**TINY_CONFIGS["patchcore"], "coreset_ratio": 1.0,
                                                    "tiling": tiling})  # fmt: skip
        detector.fit(references, threshold=None)
        results = detector.predict(normal + defective)
        aurocs[tiling] = auroc([result.score for result in results], labels)
        if tiling:
            for result, (top, left) in zip(results[6:], cracks):
                row, column = np.unravel_index(np.argmax(result.anomaly_map), result.anomaly_map.shape)
                assert abs(column - left) <= 16 and abs(row - top) <= 24  # on the crack, not elsewhere
    assert aurocs[None] < 0.75 and aurocs["size=0,overlap=0.25"] == 1.0


def test_tiled_references_and_leave_one_out_threshold(tmp_path):
    """References are tiled like test images: the leave-one-out threshold equals refitting per fold by hand."""
    rng = np.random.default_rng(1)
    references = [_elongated_part(rng, 24, 100) for _ in range(3)]
    options = {**TINY_CONFIGS["patchcore"], "coreset_ratio": 1.0, "tiling": "size=0"}
    detector = anomalens.create("patchcore", **options).fit(references, threshold="leave-one-out")
    brute_force = []
    for index in range(3):
        others = references[:index] + references[index + 1 :]
        fold = anomalens.create("patchcore", **options).fit(others, threshold=None)
        brute_force.append(fold.predict(references[index])[0].score)
    assert detector.threshold == pytest.approx(max(brute_force), rel=1e-6)
    assert detector.held_out_scores == pytest.approx(brute_force, rel=1e-6)
    restored = anomalens.load(detector.save(tmp_path / "saved"))  # the tiling is part of the saved config
    assert restored.config.tiling == TileConfig(size=0)
    query = _elongated_part(rng, 24, 100)
    assert restored.predict(query)[0].score == pytest.approx(detector.predict(query)[0].score, rel=1e-6)


def test_too_many_tiles_is_refused_before_any_work():
    """Tiny tiles on a large image (e.g. a hostile config) would mean ~170,000 model passes: refused, with numbers."""
    with pytest.raises(ValueError, match=r"cuts a 5000 x 5000 image into 173889 tiles, more than 4096"):
        tile_boxes(5000, 5000, TileConfig(size=16))


# ---------------------------------------------------------------------------------------------------- tiling="auto"
@pytest.mark.parametrize("sizes,input_size,expected", [
    ([(100, 300)], 224, TileConfig(size=0)),  # 3:1, over 2:1: elongated
    ([(100, 100), (64, 200)], 224, TileConfig(size=0)),  # one elongated reference is enough
    ([(100, 200)], 224, None),  # exactly 2:1 is not over it
    ([(1024, 1100)], 224, TileConfig(size=448)),  # 1024 >= 4 x 224: large, tiles of twice the input
    ([(800, 800)], 224, None),  # 3.6 x 224: whole
    ([], 224, None),  # no references (zero-shot)
])  # fmt: skip
def test_auto_tiling_by_hand(sizes, input_size, expected):
    from anomalens.tiling import choose_tiling

    chosen, reason = choose_tiling(sizes, input_size)
    assert chosen == expected and reason


def test_auto_is_the_default_chosen_at_fit_saved_and_equal_to_the_explicit_choice(tmp_path, rng):
    from conftest import textured_image, tiny_detector

    elongated = [textured_image(rng, 32, 112) for _ in range(4)]
    square = [textured_image(rng, 40, 48) for _ in range(4)]
    auto = tiny_detector("patchcore").fit(elongated)
    assert auto.config.tiling == TileConfig(size=0) and "elongated" in auto.tiling_choice
    explicit = tiny_detector("patchcore", tiling=TileConfig(size=0)).fit(elongated)
    probe = textured_image(rng, 32, 112)
    assert auto.predict([probe])[0].score == pytest.approx(explicit.predict([probe])[0].score, rel=1e-6)
    loaded = anomalens.load(auto.save(tmp_path / "auto"))
    assert loaded.config.tiling == TileConfig(size=0) and loaded.describe()["tiling_choice"] == auto.tiling_choice
    whole = tiny_detector("patchcore").fit(square)
    assert whole.config.tiling is None and "whole" in whole.tiling_choice
    off = tiny_detector("patchcore", tiling="off").fit(square)
    probe = textured_image(rng, 40, 48)
    assert whole.predict([probe])[0].score == pytest.approx(off.predict([probe])[0].score, rel=1e-6)
    assert tiny_detector("patchcore", tiling="off").fit(elongated).config.tiling is None  # an explicit choice stays
