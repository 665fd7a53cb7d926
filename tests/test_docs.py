"""The documentation site builds with MkDocs in strict mode (a broken link, anchor or API reference fails it), and
its generated pages hold what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strictly(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                               cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    from anomalens.cli.parser import COMMANDS

    reference = (tmp_path / "reference" / "cli" / "index.html").read_text()
    for name in COMMANDS:  # every command, generated from its option dataclasses
        assert f"anomalens {name}" in reference, name
    assert "--false-alarm-rate" in reference and "k-fold" in reference
    api = (tmp_path / "reference" / "api" / "index.html").read_text()
    for name in ("anomalens.thresholds.Calibration", "anomalens.engines.request.PredictRequest", "register_dataset"):
        assert name in api, name
    home = (tmp_path / "index.html").read_text()
    assert "scored 83 image(s), 65 flagged" in home  # the home page is the README
    assert "conformal" in (tmp_path / "thresholds" / "index.html").read_text()
