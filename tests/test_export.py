"""Export: exported graphs against the torch detectors, the torch-free runtime (torch blocked), its preprocessing
against torch's own interpolation, the hash check, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomalens
from anomalens.cli import main
from anomalens.io.images import images_to_tensor

from conftest import TINY_CONFIGS, plant_defect, textured_image, tiny_detector

pytest.importorskip("onnxruntime", reason="export is in the test extras: pip install -e '.[test]'")
pytest.importorskip("onnx", reason="export is in the test extras: pip install -e '.[test]'")

from anomalens.runtime import ExportedDetector, preprocess, restore_map  # noqa: E402

EXPORTABLE = [  # (method, options, with references)
    ("patchcore", {}, True),
    ("patchcore", {"image_score": "max", "smoothing_kernel": "2d"}, True),
    ("winclip", {}, False),  # zero-shot
    ("winclip", {}, True),  # WinCLIP+
    ("winclip", {"compat": "anomalib", "resize_mode": "crop"}, True),
]


def _data():
    rng = np.random.default_rng(2)
    references = [textured_image(rng, 40, 48) for _ in range(3)]
    queries = [textured_image(rng, 40, 48), plant_defect(textured_image(rng, 40, 48), 10, 12, 12)[0],
               textured_image(rng, 23, 61), plant_defect(textured_image(rng, 52, 44), 20, 6, 9)[0]]  # fmt: skip
    return references, queries


@pytest.mark.parametrize("method,options,with_references", EXPORTABLE)
def test_exported_detector_matches_torch(method, options, with_references, tmp_path):
    references, queries = _data()
    detector = tiny_detector(method, **options).fit(references if with_references else None, class_name="widget")
    folder = detector.export(tmp_path / "exported", batch_size=2)
    exported = ExportedDetector.load(folder)
    expected, got = detector.predict(queries), exported.predict(queries)
    for a, b in zip(expected, got):
        assert b.anomaly_map.shape == a.anomaly_map.shape
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-4
        assert abs(a.score - b.score) <= 1e-4
    assert np.argsort([r.score for r in expected]).tolist() == np.argsort([r.score for r in got]).tolist()
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["method"] == method and metadata["config_hash"] == detector.config_hash
    assert metadata["threshold"] == detector.threshold and metadata["batch_size"] == 2
    assert metadata["verified_max_abs_difference"] <= 1e-4


@pytest.mark.parametrize("kind", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(900, 900), (40, 48), (23, 61), (300, 1250), (20, 20)])
def test_runtime_preprocessing_matches_torch_interpolation(kind, shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    size = 32 if shape[0] < 100 else 224
    expected = images_to_tensor([image], size, mode=kind)[0].numpy()
    assert np.abs(preprocess(image, size, kind, "resize", [0, 0, 0], [1, 1, 1]) - expected).max() <= 1e-5
    anomaly_map = np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32) * 5
    resized = F.interpolate(torch.from_numpy(anomaly_map)[None, None], size=shape, mode="bilinear",
                            align_corners=False)[0, 0].numpy()  # fmt: skip
    assert np.abs(restore_map(anomaly_map, shape, "resize") - resized).max() <= 5e-5


def test_runtime_refuses_a_changed_model(tmp_path):
    references, _ = _data()
    folder = tiny_detector("patchcore").fit(references).export(tmp_path / "exported")
    with open(folder / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match="does not match metadata.json .*changed or damaged after export"):
        ExportedDetector.load(folder)


@pytest.mark.parametrize("method", ["dual_image_clip", "clipfusion", "vlmdiff", "ensemble"])
def test_methods_that_cannot_export_say_why(method, tmp_path):
    references, _ = _data()
    detector = tiny_detector(method)
    detector.fit(references if detector.few_shot else None, class_name="widget")
    with pytest.raises(ValueError, match=rf"method '{method}' cannot be exported: .+; exportable: patchcore, winclip"):
        detector.export(tmp_path / "out")
    tiled = anomalens.create("patchcore", **{**TINY_CONFIGS["patchcore"], "tiling": "on"}).fit(references)
    with pytest.raises(ValueError, match="a tiled detector cannot be exported"):
        tiled.export(tmp_path / "tiled")


def test_runtime_runs_where_torch_cannot_be_imported(tmp_path):
    """The runtime and its command line in a process where ``import torch`` fails: same scores and files."""
    references, queries = _data()
    detector = tiny_detector("patchcore").fit(references, class_name="widget")
    folder = detector.export(tmp_path / "exported")
    inputs = tmp_path / "inputs" / "test" / "scratch"
    inputs.mkdir(parents=True)
    from PIL import Image

    for index, query in enumerate(queries):
        Image.fromarray(query).save(inputs / f"{index:03d}.png")
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import anomalens.cli.runtime as runtime
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch imported")
code = runtime.main(["predict", {str(folder)!r}, {str(inputs)!r}, "--out", {str(tmp_path / "run")!r}])
assert "torch" not in sys.modules or sys.modules["torch"] is None
raise SystemExit(code)
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "scored 4 image(s)" in completed.stdout
    lines = (tmp_path / "run" / "scores.jsonl").read_text().splitlines()
    records = {Path(record["path"]).name: record for record in map(json.loads, lines)}
    for index, result in enumerate(detector.predict(queries)):
        record = records[f"{index:03d}.png"]
        assert record["score"] == pytest.approx(result.score, abs=1e-4)
        assert np.abs(np.load(tmp_path / "run" / record["map"]) - result.anomaly_map).max() <= 1e-4
        assert (tmp_path / "run" / record["overlay"]).exists() and record["true_label"] == "anomalous"


def test_cli_export_then_predict_matches_the_torch_run(capsys, mvtec_root, tmp_path):
    tiny = ["--method", "patchcore", "--backbone", "taef2", "--pretrained", "none", "--set", "image_size=32"]
    references = str(mvtec_root / "widget" / "train" / "good")
    assert main(["-q", "fit", *tiny, "--reference", references, "--out", str(tmp_path / "saved")]) == 0
    assert main(["-q", "export", "--detector", str(tmp_path / "saved"), "--out", str(tmp_path / "onnx")]) == 0
    assert "exported patchcore" in capsys.readouterr().out
    inputs = str(mvtec_root / "widget" / "test")
    for name, detector in (("torch", "saved"), ("runtime", "onnx")):
        code = main(["-q", "predict", "--detector", str(tmp_path / detector), inputs, "--out", str(tmp_path / name)])
        assert code == 0
    runs = {}
    for name in ("torch", "runtime"):
        lines = (tmp_path / name / "scores.jsonl").read_text().splitlines()
        runs[name] = {record["path"]: record for record in map(json.loads, lines)}
    assert runs["torch"].keys() == runs["runtime"].keys() and len(runs["torch"]) == 6
    for path, record in runs["torch"].items():
        other = runs["runtime"][path]
        assert other["score"] == pytest.approx(record["score"], abs=1e-4) and other["label"] == record["label"]
        assert other["overlay"] == record["overlay"] and other["map"] == record["map"]
    run = json.loads((tmp_path / "runtime" / "run.json").read_text())
    torch_run = json.loads((tmp_path / "torch" / "run.json").read_text())
    assert run["exported"] is True and run["threshold"] == torch_run["threshold"]
    code = main(["-q", "predict", "--detector", str(tmp_path / "onnx"), inputs, "--reference", references,
                 "--out", str(tmp_path / "refit")])  # fmt: skip
    assert code == 2 and "cannot be refitted" in capsys.readouterr().err


def test_openvino_export_matches_torch(tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is in the test extras: pip install -e '.[test]'")
    references, queries = _data()
    for method in ("patchcore", "winclip"):
        detector = tiny_detector(method).fit(references, class_name="widget")
        folder = detector.export(tmp_path / method, format="openvino")
        assert sorted(item.name for item in folder.iterdir()) == ["metadata.json", "model.bin", "model.xml"]
        exported = ExportedDetector.load(folder)
        for a, b in zip(detector.predict(queries), exported.predict(queries)):
            assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-4 and abs(a.score - b.score) <= 1e-4
    with open(folder / "model.bin", "ab") as handle:  # the weights file is covered by the hash check too
        handle.write(b"\0")
    with pytest.raises(ValueError, match="model.bin does not match metadata.json"):
        ExportedDetector.load(folder)
