"""Scoring a folder of 10,000 images runs in bounded memory: results stream to disk, nothing grows per image."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import write_noise_images

pytestmark = pytest.mark.heavy  # 10,000 images

SCRIPT = """
import resource, sys
from anomalens.cli import main
code = main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def _peak_kb(tmp_path, inputs, name):
    command = [sys.executable, "-c", SCRIPT, "-q", "predict", str(inputs), "--method", "patchcore", "--backbone",
               "taef2", "--pretrained", "none", "--set", "image_size=16", "--batch-size", "64", "--no-overlays",
               "--reference", str(tmp_path / "refs"), "--out", str(tmp_path / name)]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    peak = int(completed.stdout.split("MAXRSS_KB")[1].split()[0])
    return peak, completed.stdout


def test_peak_memory_does_not_grow_with_the_folder(tmp_path):
    write_noise_images(tmp_path / "refs", 2, size=(12, 12))
    write_noise_images(tmp_path / "small", 1_000, size=(12, 12))
    write_noise_images(tmp_path / "large", 10_000, size=(12, 12))
    small_peak, _ = _peak_kb(tmp_path, tmp_path / "small", "out-small")
    large_peak, output = _peak_kb(tmp_path, tmp_path / "large", "out-large")
    assert "scored 10000 image(s)" in output
    lines = (tmp_path / "out-large" / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 10_000 and json.loads(lines[-1])["path"].endswith("09999.png")
    # 9,000 more images: paths and the score list may grow by a few MB, nothing per-image beyond that.
    assert large_peak - small_peak < 40_000, (small_peak, large_peak)
