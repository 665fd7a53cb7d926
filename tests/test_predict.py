"""The batch-scoring engine: one bad image never costs the others their results."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import anomalens
from anomalens.predict import prepare_out_dir, run_predict


@dataclass
class FragileConfig:
    batch_size: int = 4  # images per forward pass


class Fragile(anomalens.Detector):
    """Scores mean brightness, but fails on any image 13 pixels wide (a stand-in for a model error)."""

    method_name = "fragile_test"
    config_class = FragileConfig
    zero_shot, few_shot = True, False

    def _fit(self, reference_images, class_name):
        pass

    def _predict_batch(self, images):
        if any(image.shape[1] == 13 for image in images):
            raise RuntimeError("cannot handle width 13")
        maps = torch.stack([torch.full((4, 4), float(image.mean())) for image in images])
        return maps.flatten(1).amax(1), maps


def test_failing_batch_is_retried_image_by_image(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, width in enumerate([10, 13, 10, 10, 10]):
        Image.fromarray(np.full((8, width, 3), 20 * index, np.uint8)).save(folder / f"{index}.png")
    detector = Fragile(FragileConfig()).fit()
    detector.threshold = 50.0
    summary = run_predict(detector, [folder], tmp_path / "out")
    assert (summary.scored, summary.skipped, summary.flagged) == (4, 1, 2)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"path": str(folder / "1.png"), "error": "scoring failed: cannot handle width 13"}]
    scored = [json.loads(line)["path"] for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [p.rsplit("/", 1)[1] for p in scored] == ["0.png", "2.png", "3.png", "4.png"]
    assert not (tmp_path / "out" / ".scores.csv.partial").exists()
    assert len((tmp_path / "out" / "scores.csv").read_text().splitlines()) == 5


def test_out_dir_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        prepare_out_dir(tmp_path / "file", overwrite=False)
