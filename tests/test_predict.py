"""The batch-scoring engine: one bad image never costs the others their results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anomalens.engines.run_folder import prepare_out_dir

from conftest import BrightnessConfig, BrightnessDetector, predict_local


def test_failing_batch_is_retried_image_by_image(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, width in enumerate([10, 13, 10, 10, 10]):
        Image.fromarray(np.full((8, width, 3), 20 * index, np.uint8)).save(folder / f"{index}.png")
    detector = BrightnessDetector(BrightnessConfig(fail_on_width=13)).fit()
    detector.threshold = 50.0
    summary = predict_local(detector, [folder], tmp_path / "out")
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


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_honour_the_umask(tmp_path, umask, file_mode, folder_mode):
    """Run files (atomically written through 0600 temporary files) and saved detectors get the modes a plain
    ``open`` would give them under the umask."""
    import os
    import stat

    from conftest import BrightnessConfig, BrightnessDetector, write_noise_images

    inputs = write_noise_images(tmp_path / "in", 2)
    previous = os.umask(umask)
    try:
        detector = BrightnessDetector(BrightnessConfig()).fit()
        predict_local(detector, [inputs], tmp_path / "out")
        detector.save(tmp_path / "saved")
    finally:
        os.umask(previous)
    files = [tmp_path / "out" / name for name in ("run.json", "scores.jsonl", "scores.csv", "errors.jsonl")]
    files += [*(tmp_path / "out" / "overlays").iterdir(), *(tmp_path / "out" / "maps").iterdir()]
    files += [tmp_path / "saved" / "config.json", tmp_path / "saved" / "model.safetensors"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE((tmp_path / "saved").stat().st_mode) == folder_mode


def test_interrupted_local_run_is_marked_and_keeps_its_records(tmp_path):
    from conftest import write_noise_images

    inputs = write_noise_images(tmp_path / "in", 6)
    detector = BrightnessDetector(BrightnessConfig(batch_size=2)).fit()

    def stop(done):
        if done >= 4:
            raise KeyboardInterrupt  # what Ctrl+C, or SIGTERM through terminate_as_interrupt, raises

    with pytest.raises(KeyboardInterrupt):
        predict_local(detector, [inputs], tmp_path / "out", progress=stop)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "interrupted"
    assert len((tmp_path / "out" / "scores.jsonl").read_text().splitlines()) == 4
