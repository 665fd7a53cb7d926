"""Every CLI command, on tiny random models and synthetic data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.cli import main
from anomalens.engines.run_folder import output_names
from anomalens.thresholds import ThresholdOptions, apply_threshold_options

from conftest import tiny_detector

TINY = ["--method", "patchcore", "--backbone", "taef2", "--pretrained", "none", "--set", "image_size=32"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _inputs_with_bad_files(mvtec_root, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in (mvtec_root / "widget" / "test").rglob("*.png"):
        (inputs / path.parent.name).mkdir(exist_ok=True)
        (inputs / path.parent.name / path.name).write_bytes(path.read_bytes())
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "text.jpg").write_text("not an image")
    return inputs


def test_predict_with_references(capsys, mvtec_root, tmp_path):
    inputs = _inputs_with_bad_files(mvtec_root, tmp_path)
    references = str(mvtec_root / "widget" / "train" / "good")
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "predict", *TINY, str(inputs), "--reference", references, "--out", str(out))
    assert code == 0, stderr
    assert "scored 6 image(s)" in stdout and "skipped 2" in stdout and "(leave-one-out)" in stdout
    assert "empty.png: empty file" in stderr and "text.jpg: not a recognised image format" in stderr
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(records) == 6
    threshold = records[0]["threshold"]
    assert all(r["label"] == ("anomalous" if r["score"] > threshold else "normal") for r in records)
    assert {r["method"] for r in records} == {"patchcore"} and len({r["config_hash"] for r in records}) == 1
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [r["path"] for r in records]
    first = records[0]
    overlay = np.asarray(Image.open(out / first["overlay"]))
    assert overlay.shape == (40 + 30, 48, 3)  # the image, then the colour bar and score band
    assert np.load(out / first["map"]).shape == (40, 48)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["path"].rsplit("/", 1)[1] for e in errors) == ["empty.png", "text.jpg"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["scored"] == 6 and run["skipped"] == 2
    assert run["threshold_source"] == "leave-one-out" and "leave-one-out" in run["threshold_rule"]
    # the threshold is the largest of the per-reference held-out scores saved beside it; the references are listed
    assert len(run["held_out_scores"]) == 4 and run["threshold"] == max(run["held_out_scores"])
    assert sorted(Path(path).name for path in run["references"]) == ["000.png", "001.png", "002.png", "003.png"]
    # the fixed colour scale puts the pixel threshold at the middle of the palette
    low, high = run["map_scale"]
    assert run["map_scale_source"] == "references" and (low + high) / 2 == pytest.approx(run["pixel_threshold"])
    for record in records:  # each mask is the saved map above the pixel threshold; the regions' areas add up
        anomaly_map = np.load(out / record["map"])
        mask = np.asarray(Image.open(out / record["mask"])) > 0
        assert np.array_equal(mask, anomaly_map > run["pixel_threshold"])
        assert record["defect_area"] == mask.sum() == sum(region["area"] for region in record["regions"])
        truth = {"good": "normal", "scratch": "anomalous"}.get(Path(record["path"]).parent.name)
        assert record["true_label"] == truth


def test_predict_refuses_to_mix_runs(capsys, mvtec_root, tmp_path):
    args = ["predict", *TINY, str(mvtec_root / "widget" / "test" / "good"), "--threshold", "0.5"]
    args += ["--reference", str(mvtec_root / "widget" / "train" / "good" / "000.png"), "--out", str(tmp_path / "out")]
    assert _run(capsys, *args)[0] == 0
    (tmp_path / "out" / "my_notes.txt").write_text("keep me")
    code, _, stderr = _run(capsys, *args)
    assert code == 2 and "already holds a run" in stderr and "--overwrite" in stderr
    code, stdout, _ = _run(capsys, *args, "--overwrite", "--raw-format", "png16", "--no-overlays")
    assert code == 0 and "scored 3 image(s)" in stdout
    assert (tmp_path / "out" / "my_notes.txt").read_text() == "keep me"
    assert not (tmp_path / "out" / "maps" / "000.npy").exists() and (tmp_path / "out" / "maps" / "000.png").exists()
    assert not (tmp_path / "out" / "overlays").exists()
    record = json.loads((tmp_path / "out" / "scores.jsonl").read_text().splitlines()[0])
    raw = np.asarray(Image.open(tmp_path / "out" / record["map"]))
    assert raw.dtype == np.uint16 and raw.max() == 65535 and record["map_scale_max"] > 0
    assert record["threshold"] == 0.5


def test_fit_then_predict_with_saved_detector(capsys, mvtec_root, tmp_path):
    references = str(mvtec_root / "widget" / "train" / "good")
    code, stdout, _ = _run(capsys, "fit", *TINY, "--reference", references, "--out", str(tmp_path / "det"))
    assert code == 0 and "saved fitted patchcore detector" in stdout and "(leave-one-out)" in stdout
    test = str(mvtec_root / "widget" / "test")
    code, stdout, _ = _run(capsys, "predict", "--detector", str(tmp_path / "det"), test, "--out", str(tmp_path / "o"))
    assert code == 0 and "scored 6 image(s)" in stdout
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["threshold"] is not None and run["threshold_source"] == "leave-one-out"  # the saved rule, kept


def test_predict_errors_are_one_line(capsys, mvtec_root, tmp_path):
    code, _, stderr = _run(capsys, "predict", "--method", "nope", str(mvtec_root), "--out", str(tmp_path / "o"))
    assert code == 2 and "valid methods: clipfusion, dual_image_clip, ensemble, patchcore, vlmdiff, winclip" in stderr
    assert "Traceback" not in stderr
    code, _, stderr = _run(capsys, "predict", *TINY, str(mvtec_root), "--out", str(tmp_path / "o"))
    assert code == 2 and "needs at least one normal reference image" in stderr
    code, _, stderr = _run(capsys, "predict", *TINY, "--set", "bogus=1", str(mvtec_root), "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown option(s) ['bogus']" in stderr and "coreset_ratio" in stderr
    code, _, stderr = _run(capsys, "predict", *TINY, str(tmp_path / "absent"), "--out", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in stderr


def test_benchmark_writes_schema(capsys, mvtec_root, tmp_path):
    out = tmp_path / "bench"
    args = ["benchmark", *TINY, "--dataset", "mvtec", "--root", str(mvtec_root), "--shots", "2"]
    code, stdout, stderr = _run(capsys, *args, "--seeds", "0", "1", "--eval-size", "32", "--out", str(out))
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert {"method", "dataset", "config", "shots", "seeds", "categories", "mean"} <= set(results)
    assert results["shots"] == 2 and results["seeds"] == [0, 1] and "command" in results and "machine" in results
    record = results["categories"]["widget"]
    for name in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"):
        assert 0.0 <= record[name] <= 1.0 and record[f"{name}_std"] >= 0.0
    assert record["n_images"] == 6 and record["seconds_per_image"] > 0 and record["peak_memory_mb"] > 0
    table = (out / "results.md").read_text()
    assert "| widget |" in table and "| **mean** |" in table and "AUPRO" in table and "±" in table
    assert "| widget |" in stdout
    before = (out / "results.json").read_bytes()
    code, _, stderr = _run(capsys, *args, "--out", str(out))  # the committed-results mistake: refused, untouched
    assert code == 2 and "already holds benchmark results" in stderr and "--overwrite" in stderr
    assert (out / "results.json").read_bytes() == before
    code, _, stderr = _run(capsys, *args, "--eval-size", "32", "--out", str(out), "--overwrite")
    assert code == 0 and json.loads((out / "results.json").read_text())["seeds"] == [0]


def test_benchmark_shots_all_and_errors(capsys, mvtec_root, tmp_path):
    args = ["benchmark", *TINY, "--dataset", "mvtec", "--root", str(mvtec_root), "--eval-size", "none"]
    code, stdout, _ = _run(capsys, *args, "--shots", "all")
    assert code == 0 and "all-shot" in stdout
    code, _, stderr = _run(capsys, *args, "--shots", "9")
    assert code == 2 and "training pool has only 4 images" in stderr
    code, _, stderr = _run(capsys, *args, "--shots", "0")
    assert code == 2 and "is not zero-shot" in stderr
    code, _, stderr = _run(capsys, *args, "--category", "bottle")
    assert code == 2 and "valid: widget" in stderr


def test_weights_commands(capsys, tmp_path):
    code, _, stderr = _run(capsys, "weights", "download", "patchcore", "--backbone", "taef2")
    assert code == 2 and "'taef2_encoder'" in stderr and "--weights-dir" in stderr
    (tmp_path / "taef2_encoder.pth").write_bytes(b"x")
    code, stdout, _ = _run(
        capsys, "weights", "download", "patchcore", "--backbone", "taef2", "--weights-dir", str(tmp_path)
    )
    assert code == 0 and "taef2_encoder.pth" in stdout
    code, stdout, _ = _run(capsys, "weights", "list", "--weights-dir", str(tmp_path))
    assert code == 0 and "wide_resnet50_2" in stdout and "not found" in stdout and str(tmp_path) in stdout
    code, stdout, _ = _run(capsys, "list")
    assert code == 0 and "patchcore" in stdout and "taef2" in stdout and "realiad" in stdout


def test_console_script_runs(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "anomalens.cli", "list"], capture_output=True, text=True, check=False, timeout=120
    )
    assert completed.returncode == 0 and "methods:" in completed.stdout


def test_leave_one_out_threshold_rule():
    rng = np.random.default_rng(0)
    from conftest import textured_image

    references = [textured_image(rng, 32, 32) for _ in range(3)]
    detector = tiny_detector("patchcore", coreset_ratio=1.0)
    apply_threshold_options(detector, references, None, ThresholdOptions())  # the command line's default rule
    threshold = detector.threshold
    held_out = []
    for index in range(3):
        others = references[:index] + references[index + 1 :]
        held_out.append(tiny_detector("patchcore", coreset_ratio=1.0).fit(others).predict([references[index]])[0].score)
    assert threshold == pytest.approx(max(held_out))
    assert len(detector.memory) == 3 * 64  # ends fitted on all references
    single = tiny_detector("patchcore")
    apply_threshold_options(single, references[:1], None, ThresholdOptions())
    assert single.threshold is None


def test_output_names_avoid_collisions(tmp_path):
    from pathlib import Path

    names = output_names(
        [Path("a/x.png"), Path("b/x.png"), Path("/r/sub/y.png"), Path("/r/sub/y.jpg")],
        [None, None, Path("/r"), Path("/r")],
    )
    assert names == ["a/x", "b/x", "sub/y", "sub/y-2"]
    defects = [Path("/d/test/broken/000.png"), Path("/d/test/crack/000.png"), Path("/d/test/crack/001.png")]
    assert output_names(defects, [path.parent for path in defects]) == ["broken/000", "crack/000", "001"]


def test_benchmark_max_images_keeps_both_classes(capsys, mvtec_root, tmp_path):
    from anomalens.evaluation.benchmark import subset_test
    from anomalens.io.datasets import open_dataset

    test = open_dataset("mvtec", mvtec_root).test_samples("widget")
    subset = subset_test(test, 4)
    assert len(subset) == 4 and {s.label for s in subset} == {0, 1} and subset == subset_test(test, 4)
    assert [test.index(s) for s in subset] == sorted(test.index(s) for s in subset)
    out = tmp_path / "bench"
    args = ["benchmark", *TINY, "--dataset", "mvtec", "--root", str(mvtec_root), "--max-images", "4"]
    assert _run(capsys, *args, "--out", str(out))[0] == 0
    results = json.loads((out / "results.json").read_text())
    assert results["max_images"] == 4 and results["categories"]["widget"]["n_images"] == 4


# ---------------------------------------------------------------------------------------------------- the station
def test_models_commands_fit_into_a_product_and_roll_back(capsys, mvtec_root, tmp_path):
    pytest.importorskip("sqlalchemy")
    from anomalens.station.models import ModelStore

    models = tmp_path / "models"
    train = str(mvtec_root / "widget" / "train" / "good")
    code, out, _ = _run(capsys, "fit", *TINY, "--reference", train, "--product", "widget", "--models", str(models),
                        "--note", "first fit")  # fmt: skip
    assert code == 0 and "added widget@1 (now active)" in out
    saved = tmp_path / "saved"
    assert _run(capsys, "fit", *TINY, "--reference", train, "--out", str(saved))[0] == 0
    code, out, _ = _run(capsys, "models", "add", "widget", "--detector", str(saved), "--models", str(models))
    assert code == 0
    store = ModelStore(models)
    assert [version.number for version in store.versions("widget")] == [1, 2] and store.active("widget").number == 2
    assert store.versions("widget")[0].record["note"] == "first fit"
    code, out, _ = _run(capsys, "models", "list", "--models", str(models))
    assert "widget" in out and "active 2" in out
    shown = json.loads(_run(capsys, "models", "show", "widget", "--models", str(models))[1])
    assert [version["version"] for version in shown["versions"]] == [1, 2] and shown["active"] == 2
    assert shown["versions"][0]["created"].endswith("+00:00") and len(shown["versions"][0]["references_sha256"]) == 4
    assert _run(capsys, "models", "rollback", "widget", "--models", str(models))[0] == 0
    assert store.active("widget").number == 1
    code, _, err = _run(capsys, "models", "rollback", "widget", "7", "--models", str(models))
    assert code == 2 and "7" in err and "1, 2" in err
    code, _, err = _run(capsys, "models", "show", "gadget", "--models", str(models))
    assert code == 2 and "gadget" in err and "widget" in err


def test_predict_record_writes_the_history(capsys, mvtec_root, tmp_path):
    pytest.importorskip("sqlalchemy")
    import hashlib

    from anomalens.station.history import History

    models = tmp_path / "models"
    train = str(mvtec_root / "widget" / "train" / "good")
    test = mvtec_root / "widget" / "test"
    code, _, _ = _run(capsys, "predict", str(test), *TINY, "--reference", train, "--out", str(tmp_path / "run"),
                      "--record", "--product", "widget", "--models", str(models))  # fmt: skip
    assert code == 0
    rows = History(f"sqlite:///{models / 'history.db'}").inspections(limit=None)
    with open(tmp_path / "run" / "scores.csv") as handle:
        scored = list(csv.DictReader(handle))
    assert len(rows) == len(scored) == len(list(test.rglob("*.png")))
    by_hash = {row["image_sha256"]: row for row in rows}
    for item in scored:
        sha256 = hashlib.sha256(Path(item["path"]).read_bytes()).hexdigest()
        assert by_hash[sha256]["score"] == pytest.approx(float(item["score"]))
        assert by_hash[sha256]["product"] == "widget" and by_hash[sha256]["source"].startswith("predict:")
    code, _, err = _run(capsys, "predict", str(test), *TINY, "--reference", train, "--out", str(tmp_path / "run2"),
                        "--record", "--models", str(models))  # fmt: skip
    assert code == 2 and "product" in err
