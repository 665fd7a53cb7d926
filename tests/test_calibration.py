"""The calibration object: one home for thresholds, checked where it is built so no path can label with NaN; a
rule added from outside in one registration; a saved detector's files checked by SHA-256; run folders that write
only into themselves."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import anomalens
from anomalens.cli import main
from anomalens.thresholds import RULES, Calibration, HeldOutRule, ThresholdOptions, register_threshold_rule

from conftest import TINY_CONFIGS, textured_image, tiny_detector, write_noise_images

TINY = ["--method", "patchcore", "--backbone", "taef2", "--pretrained", "none", "--set", "image_size=32"]


def _references(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [textured_image(rng, 32, 40) for _ in range(count)]


def _saved_detector(tmp_path):
    references = write_noise_images(tmp_path / "refs", 4)
    assert main(["-q", "fit", *TINY, "--reference", str(references), "--out", str(tmp_path / "saved")]) == 0
    return tmp_path / "saved"


# ---------------------------------------------------------------------------------------------------- the object
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "0.5", True])
def test_a_calibration_refuses_a_threshold_that_is_not_a_finite_number(value):
    with pytest.raises(ValueError, match=r"threshold=.* must be a finite number"):
        Calibration(threshold=value)
    with pytest.raises(ValueError, match=r"pixel_threshold=.* must be a finite number"):
        Calibration(pixel_threshold=value)
    detector = tiny_detector("patchcore").fit(_references(2))
    with pytest.raises(ValueError, match=r"threshold=.* must be a finite number"):
        detector.threshold = value  # by hand, checked like any other
    assert detector.threshold_source == "leave-one-out"  # unchanged


def test_the_label_rule_and_the_sources():
    given = Calibration(threshold=0.5)
    assert given.source == "given" and given.label(0.5) is False and given.label(0.51) is True
    assert Calibration().label(99.0) is None and Calibration(threshold=None, source="given").source == "none"
    with pytest.raises(ValueError, match="threshold source 'detector' must be one of given, none"):
        Calibration(threshold=1.0, source="detector")
    kept = Calibration(threshold=0.3, source="leave-one-out", held_out_scores=(0.1, 0.3))
    assert kept.with_options(ThresholdOptions()) == kept  # "auto" keeps a fitted detector's threshold
    assert kept.with_options(ThresholdOptions(threshold=0.7)).source == "given"
    assert kept.with_options(ThresholdOptions(threshold=None)).threshold is None
    with pytest.raises(ValueError, match="false_alarm_rate=0.1 needs normal reference images"):
        kept.with_options(ThresholdOptions(false_alarm_rate=0.1))
    assert Calibration.from_dict(kept.to_dict()) == kept


def test_a_hand_edited_saved_threshold_is_refused_at_load(tmp_path):
    saved = _saved_detector(tmp_path)
    meta = json.loads((saved / "config.json").read_text())
    meta["threshold"] = float("nan")
    (saved / "config.json").write_text(json.dumps(meta))  # json writes NaN, which Python reads back
    with pytest.raises(ValueError, match="threshold=nan must be a finite number"):
        anomalens.load(saved)


# ---------------------------------------------------------------------------------------------------- a new rule
def test_a_rule_added_from_outside_works_everywhere(tmp_path, capsys):
    """A calibration rule registered by a test (no library file touched) is followed by fit, the command line,
    save / load and the run folder. Oracle: the median by hand of held-out scores from refits on the others."""
    rule = register_threshold_rule(HeldOutRule("median", lambda values, alpha: float(np.median(values)),
                                               "median: the median held-out reference score"))  # fmt: skip
    try:
        references = _references(4)
        options = {**TINY_CONFIGS["patchcore"], "coreset_ratio": 1.0}
        detector = anomalens.create("patchcore", **options).fit(references, threshold="median")
        held_out = []
        for index in range(4):
            others = references[:index] + references[index + 1 :]
            by_hand = anomalens.create("patchcore", **options).fit(others, threshold=None)
            held_out.append(by_hand.predict([references[index]])[0].score)
        assert detector.threshold == pytest.approx(float(np.median(held_out)), rel=1e-5)
        assert detector.threshold_source == "median" and detector.threshold_calibration["rule"] == "median"
        assert anomalens.load(detector.save(tmp_path / "saved")).calibration == detector.calibration
        refs, inputs = write_noise_images(tmp_path / "refs", 4), write_noise_images(tmp_path / "in", 2, seed=5)
        argv = ["predict", *TINY, "--reference", str(refs), "--threshold", "median", "--out", str(tmp_path / "o")]
        assert main([*argv, "--", str(inputs)]) == 0, capsys.readouterr().err
        run = json.loads((tmp_path / "o" / "run.json").read_text())
        assert run["threshold_source"] == "median" and run["threshold_rule"] == rule.text
    finally:
        RULES.pop("median")
    with pytest.raises(ValueError, match=r"threshold='median' must be a finite number, none, auto or a rule"):
        ThresholdOptions(threshold="median")


# ---------------------------------------------------------------------------------------------------- F1
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_a_non_finite_threshold_is_refused_on_every_command(tmp_path, capsys, value):
    saved = _saved_detector(tmp_path)
    inputs = write_noise_images(tmp_path / "in", 2, seed=5)
    for command in (["predict", "--detector", str(saved), str(inputs), "--out", str(tmp_path / "o")],
                    ["serve", "--detector", str(saved)], ["fit", *TINY, "--reference", str(inputs), "--out",
                                                          str(tmp_path / "f")]):  # fmt: skip
        capsys.readouterr()
        assert main([*command, f"--threshold={value}"]) == 2, command
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "threshold=" in error and "must be a finite number" in error, error
    assert not (tmp_path / "o").exists() and not (tmp_path / "f").exists()


def test_the_runtime_command_refuses_a_non_finite_threshold(tmp_path):
    pytest.importorskip("onnxruntime")
    detector = tiny_detector("patchcore").fit(_references(3))
    exported = detector.export(tmp_path / "exported")
    inputs = write_noise_images(tmp_path / "in", 2, seed=5)
    for value, code in (("nan", 2), ("inf", 2), ("0.25", 0)):
        completed = subprocess.run([sys.executable, "-m", "anomalens.cli.runtime", "predict", str(exported),
                                    str(inputs), "--out", str(tmp_path / value), "--threshold", value],
                                   capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert completed.returncode == code, completed.stderr
        if code:
            assert "must be a finite number" in completed.stderr and "Traceback" not in completed.stderr
    run = json.loads((tmp_path / "0.25" / "run.json").read_text())
    assert run["threshold"] == 0.25 and run["threshold_source"] == "given"
    records = [json.loads(line) for line in (tmp_path / "0.25" / "scores.jsonl").read_text().splitlines()]
    assert all(record["label"] == ("anomalous" if record["score"] > 0.25 else "normal") for record in records)


# ---------------------------------------------------------------------------------------------------- F4
def test_a_damaged_saved_detector_is_one_line(tmp_path, capsys):
    saved = _saved_detector(tmp_path)
    inputs = write_noise_images(tmp_path / "in", 2, seed=5)
    tensors = saved / "model.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x01  # one flipped weight byte
    tensors.write_bytes(bytes(data))
    argv = ["predict", "--detector", str(saved), str(inputs), "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "model.safetensors does not match config.json" in error
    # A detector saved before files were hashed, with a broken header: still one line naming the file.
    meta = json.loads((saved / "config.json").read_text())
    del meta["files_sha256"]
    (saved / "config.json").write_text(json.dumps(meta))
    tensors.write_bytes(b"\xff" * 16)
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "model.safetensors cannot be read as safetensors" in error


def test_overwrite_never_writes_through_a_linked_artifact(tmp_path, capsys):
    inputs = write_noise_images(tmp_path / "in", 2, seed=5)
    refs = write_noise_images(tmp_path / "refs", 3)
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not anomalens'")
    (out / "overlays").symlink_to(elsewhere, target_is_directory=True)
    capsys.readouterr()
    assert main(["predict", *TINY, "--reference", str(refs), "--out", str(out), "--overwrite", "--", str(inputs)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "overlays as a symbolic link" in error
    assert (elsewhere / "keep.txt").read_text() == "not anomalens'" and (out / "overlays").is_symlink()
