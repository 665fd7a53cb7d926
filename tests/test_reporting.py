"""What a user sees: the overlay's fixed colour scale, defect regions, true labels, and the benchmark's per-defect
tables, per-image scores, references and false-alarm rates."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import anomalens
from anomalens.engines.run_folder import true_label
from anomalens.evaluation.benchmark import run_benchmark
from anomalens.evaluation.metrics import auroc
from anomalens.io.outputs import (
    FOOTER_HEIGHT,
    defect_regions,
    footer_height,
    heatmap_overlay,
    jet_colormap,
)
from anomalens.thresholds import Calibration

from conftest import TINY_CONFIGS


def test_defect_regions_match_a_hand_drawn_mask():
    mask = np.zeros((20, 30), dtype=bool)
    mask[2:5, 3:9] = True  # 18 px
    mask[10:16, 20:22] = True  # 12 px
    mask[16, 22] = True  # touches the second region diagonally: 8-connected, 13 px
    anomaly_map = np.zeros((20, 30), dtype=np.float32)
    anomaly_map[3, 4], anomaly_map[12, 21] = 5.0, 7.0
    regions = defect_regions(mask, anomaly_map)
    assert [region["area"] for region in regions] == [18, 13]
    assert regions[0]["box"] == [3, 2, 9, 5] and regions[0]["peak"] == 5.0 and regions[0]["centroid"] == [5.5, 3.0]
    assert regions[1]["box"] == [20, 10, 23, 17] and regions[1]["peak"] == 7.0
    assert defect_regions(np.zeros((4, 4), dtype=bool), np.zeros((4, 4))) == []


def test_overlay_uses_a_fixed_scale_not_each_maps_own_range():
    """A flat, low map (a good part) stays blue on the fixed scale; per-image min-max would stretch its noise."""
    image = np.full((10, 12, 3), 128, dtype=np.uint8)
    good = np.full((10, 12), 0.1, dtype=np.float32) + np.linspace(0, 0.01, 12, dtype=np.float32)
    fixed = heatmap_overlay(image, good, (0.0, 1.0), alpha=1.0)
    expected = jet_colormap((good - 0.0) / 1.0)
    assert np.abs(fixed.astype(int) - expected.astype(int)).max() <= 1
    assert fixed[..., 2].mean() > fixed[..., 0].mean()  # blue, not red
    stretched = heatmap_overlay(image, good, None, alpha=1.0)
    assert stretched[:, -1, 0].mean() > 100 and stretched[:, -1, 2].mean() < 10  # per-image: the noise's top is red
    assert fixed[..., 0].max() < 10  # on the fixed scale no pixel is red
    annotated = heatmap_overlay(image, good, (0.0, 1.0), caption="score 0.1", marker=0.5)
    assert annotated.shape == (10 + footer_height(12), 12, 3) and footer_height(12) == FOOTER_HEIGHT


def test_map_scale_precedence():
    references = Calibration(map_scale=(0.2, 1.0), pixel_threshold=0.6)
    assert references.map_scale_for((0, 5)) == ((0.0, 5.0), "given")
    assert references.map_scale_for() == ((0.2, 1.0), "references")
    assert Calibration(pixel_threshold=0.6).map_scale_for() == ((0.0, 1.2), "pixel-threshold")
    assert Calibration().map_scale_for(zero_shot=True) == ((0, 1), "fixed")
    assert Calibration().map_scale_for() == (None, "per-image")
    with pytest.raises(ValueError, match=r"map scale \(2, 1\) must be two finite numbers LOW < HIGH"):
        references.map_scale_for((2, 1))


def test_true_label_from_the_layout(tmp_path):
    assert true_label("/data/bottle/test/good/000.png") == ("normal", "good")
    assert true_label("/data/bottle/test/broken_large/000.png") == ("anomalous", "broken_large")
    (tmp_path / "ok").mkdir()
    assert true_label(tmp_path / "scratch" / "1.png") == ("anomalous", "scratch")  # beside an ok folder
    assert true_label("/photos/line3/1.png") == (None, None)


def test_benchmark_without_training_images_records_references_defect_types_and_false_alarms(mvtec_root, tmp_path):
    """A set without train/good: references come from test/good (seeded) and are not scored; the per-defect
    table and per-image scores agree with metrics recomputed from scores.csv; the false-alarm rate is measured."""
    shutil.rmtree(mvtec_root / "widget" / "train")
    good = mvtec_root / "widget" / "test" / "good"
    for index in range(3, 9):  # more normal test images, so that references can be drawn and some left
        shutil.copy(good / f"{index % 3:03d}.png", good / f"{index:03d}.png")
    detector = anomalens.create("patchcore", **TINY_CONFIGS["patchcore"])
    results = run_benchmark(detector, "mvtec", str(mvtec_root), shots=4, seeds=(0, 1), out_dir=str(tmp_path / "out"),
                            false_alarm_rates=(0.2, 0.01))  # fmt: skip
    category = results["categories"]["widget"]
    assert category["references_from"] == "test"
    for paths in category["references"].values():
        assert len(paths) == 4 and all(Path(path).parent.name == "good" for path in paths)
    with open(tmp_path / "out" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    for seed in ("0", "1"):
        scored = [row for row in rows if row["seed"] == seed]
        assert not {row["path"] for row in scored} & set(category["references"][seed])  # references not scored
        assert len(scored) == 3 + 9 - 4
    seed0 = [row for row in rows if row["seed"] == "0"]
    seed1 = [row for row in rows if row["seed"] == "1"]
    by_hand = np.mean([auroc([float(row["score"]) for row in rows_], [int(row["label"]) for row in rows_])
                       for rows_ in (seed0, seed1)])  # fmt: skip
    assert category["defect_types"]["scratch"]["image_auroc"] == pytest.approx(by_hand)
    alarms = {row["alpha"]: row for row in category["false_alarm"]}
    assert alarms[0.01]["measured"] is None and "needs 99 held-out" in alarms[0.01]["note"]
    normal = [float(row["score"]) for row in seed0 if row["label"] == "0"]
    assert alarms[0.2]["n_normal_test"] == 2 * len(normal)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| widget | scratch | 3 |" in markdown and "| widget | 0.2 | 4 | leave-one-out |" in markdown
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    assert stored["categories"]["widget"]["references"] == category["references"]


def test_region_labelling_matches_scipy():
    """The runtime's numpy labelling (no scipy there) against scipy.ndimage.label, 8-connectivity."""
    from scipy import ndimage

    from anomalens.io.outputs import label_regions

    rng = np.random.default_rng(0)
    for _ in range(100):
        height, width = rng.integers(1, 40, 2)
        mask = rng.random((height, width)) < rng.uniform(0.05, 0.7)
        labels, count = label_regions(mask)
        expected, expected_count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        assert count == expected_count and np.array_equal(labels, expected)
