"""The Ray engine: same records as the local engine, resume, failures, a two-node loopback cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import anomalens
from anomalens.cli import main

from conftest import TINY_CONFIGS, predict_local, predict_ray, tiny_detector

ray = pytest.importorskip("ray", reason="Ray is in the test extras: pip install -e '.[test]'")


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _inputs(mvtec_root, tmp_path):
    folder = tmp_path / "inputs"
    shutil.copytree(mvtec_root / "widget" / "test", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def _records(out):
    return {json.loads(line)["path"]: json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()}


@pytest.mark.heavy  # a Ray cluster
def test_ray_engine_matches_local_engine_and_resumes(local_ray, mvtec_root, tmp_path):

    references = sorted((mvtec_root / "widget" / "train" / "good").glob("*.png"))
    detector = tiny_detector("patchcore").fit(references)
    detector.threshold = 0.4
    folder = _inputs(mvtec_root, tmp_path)
    predict_local(detector, [folder], tmp_path / "local")
    saved = detector.save(tmp_path / "detector")
    summary = predict_ray(saved, [folder], tmp_path / "ray", num_workers=2, batch_size=2)
    assert (summary.scored, summary.skipped) == (6, 1)
    local, distributed = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert local.keys() == distributed.keys()
    # Float tolerance: batch composition changes float32 convolution results at ~1e-6 relative.
    for path, record in local.items():
        assert distributed[path]["score"] == pytest.approx(record["score"], rel=1e-3)
        assert distributed[path]["label"] == record["label"] and distributed[path]["map"] == record["map"]
        ray_map, local_map = np.load(tmp_path / "ray" / record["map"]), np.load(tmp_path / "local" / record["map"])
        assert np.allclose(ray_map, local_map, atol=1e-4)
    errors = [json.loads(line) for line in (tmp_path / "ray" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.png") and "corrupt" in errors[0]["error"]
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "ray" / "scores.parquet")
    assert table.num_rows == 6 and set(table.column_names) >= {"path", "score", "label", "config_hash"}
    assert len((tmp_path / "ray" / "scores.csv").read_text().splitlines()) == 7
    # Resume: drop two records, re-run into the same folder: only those two are scored again.
    lines = (tmp_path / "ray" / "scores.jsonl").read_text().splitlines()
    (tmp_path / "ray" / "scores.jsonl").write_text("\n".join(lines[:4]) + "\n")
    resumed = predict_ray(detector, [folder], tmp_path / "ray", num_workers=1, batch_size=4)
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert resumed.scored == 6 and run["resumed_from"] == 4 and run["status"] == "complete"
    assert _records(tmp_path / "ray").keys() == local.keys()
    other = tiny_detector("patchcore", seed=9).fit(references)
    with pytest.raises(ValueError, match="different detector: method and config"):
        predict_ray(other, [folder], tmp_path / "ray")
    # Same method and config, other references: the fitted state's fingerprint differs.
    refit = tiny_detector("patchcore").fit(references[:2])
    refit.threshold = 0.4
    with pytest.raises(ValueError, match=r"fitted state \(references\)"):
        predict_ray(refit, [folder], tmp_path / "ray")
    detector.threshold = 0.5
    with pytest.raises(ValueError, match=r"threshold \(0.4 then, 0.5 now\)"):
        predict_ray(detector, [folder], tmp_path / "ray")
    detector.threshold = 0.4
    # A killed run leaves half a line: it is removed before resuming, and the image is scored again.
    lines = (tmp_path / "ray" / "scores.jsonl").read_text().splitlines()
    (tmp_path / "ray" / "scores.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    resumed = predict_ray(detector, [folder], tmp_path / "ray", num_workers=1, batch_size=4)
    assert resumed.scored == 6 and json.loads((tmp_path / "ray" / "run.json").read_text())["resumed_from"] == 3
    # A damaged line before the last is no interrupted write: refused, naming the file and line.
    lines = (tmp_path / "ray" / "scores.jsonl").read_text().splitlines()
    (tmp_path / "ray" / "scores.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"scores.jsonl line 2 is not a JSON record"):
        predict_ray(detector, [folder], tmp_path / "ray")


@pytest.mark.heavy  # a Ray cluster
def test_interrupted_run_is_marked_and_resumes(local_ray, mvtec_root, tmp_path):

    detector = tiny_detector("patchcore").fit(sorted((mvtec_root / "widget" / "train" / "good").glob("*.png")))
    folder = mvtec_root / "widget" / "test"

    def stop(done):
        raise KeyboardInterrupt  # what Ctrl+C (or SIGTERM, see below) raises in the driver

    with pytest.raises(KeyboardInterrupt):
        predict_ray(detector, [folder], tmp_path / "out", batch_size=2, progress=stop)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["status"] == "interrupted"
    kept = len((tmp_path / "out" / "scores.jsonl").read_text().splitlines())
    assert 1 <= kept < 6
    resumed = predict_ray(detector, [folder], tmp_path / "out", batch_size=2)
    assert resumed.scored == 6 and json.loads((tmp_path / "out" / "run.json").read_text())["resumed_from"] == kept


@pytest.mark.heavy  # a Ray cluster
def test_ensemble_runs_on_ray_like_locally(local_ray, mvtec_root, tmp_path):
    """An ensemble ships to the actors like any detector; its records (defect regions included, which cross the
    Ray frame as JSON text) equal the local engine's."""

    members = ({"method": "patchcore", **TINY_CONFIGS["patchcore"]}, {"method": "winclip", **TINY_CONFIGS["winclip"]})
    references = sorted((mvtec_root / "widget" / "train" / "good").glob("*.png"))
    detector = anomalens.create("ensemble", members=members).fit(references, class_name="widget")
    folder = mvtec_root / "widget" / "test"
    # One image per batch on both sides: a z-scored ensemble magnifies the float noise of differing batch
    # compositions (WinCLIP's scores move ~3e-7 relative between batches of 4 and 2; fused, up to 2e-5), and Ray
    # cuts its batches along its own blocks.
    predict_ray(detector, [folder], tmp_path / "ray", batch_size=1, num_workers=2)
    predict_local(detector, [folder], tmp_path / "local", batch_size=1)
    by_path = {}
    for engine in ("ray", "local"):
        for line in (tmp_path / engine / "scores.jsonl").read_text().splitlines():
            record = json.loads(line)
            by_path.setdefault(record["path"], {})[engine] = record
    assert len(by_path) == 6
    for records in by_path.values():
        assert records["ray"]["score"] == pytest.approx(records["local"]["score"], rel=1e-5)
        assert records["ray"]["regions"] == records["local"]["regions"]


def test_sigterm_becomes_an_interrupt():
    import signal

    from anomalens.engines.run_folder import terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_cli_interrupt_exits_130_without_traceback(monkeypatch, capsys, mvtec_root, tmp_path):
    import anomalens.cli.commands as commands

    def interrupted(options, quiet):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "cmd_predict", interrupted)
    code = main(["-q", "predict", "--method", "patchcore", str(mvtec_root), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 130 and "interrupted" in captured.err and "Traceback" not in captured.err


@pytest.mark.heavy  # a Ray cluster
def test_cli_engine_ray(local_ray, capsys, mvtec_root, tmp_path):
    tiny = ["--method", "patchcore", "--backbone", "taef2", "--pretrained", "none", "--set", "image_size=32"]
    references = str(mvtec_root / "widget" / "train" / "good")
    args = ["-q", "predict", *tiny, str(mvtec_root / "widget" / "test"), "--reference", references]
    assert main([*args, "--engine", "ray", "--num-workers", "2", "--out", str(tmp_path / "out")]) == 0
    assert "scored 6 image(s)" in capsys.readouterr().out
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["engine"] == "ray" and run["threshold_source"] == "leave-one-out"


def test_missing_ray_says_how_to_install(monkeypatch, capsys, mvtec_root, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main(["-q", "predict", "--method", "patchcore", str(mvtec_root), "--engine", "ray", "--out", str(tmp_path)])
    assert code == 2 and "pip install 'anomalens[ray]'" in capsys.readouterr().err


def _ray_command(*args, env, timeout=120):
    return subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def loopback_cluster():
    """A head node and a second worker node on 127.0.0.1, each with its own temp dir; always stopped."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port = 6390 + os.getpid() % 200
    head_dir, worker_dir = tempfile.mkdtemp(prefix="ray-head-"), tempfile.mkdtemp(prefix="ray-worker-")
    try:
        head_options = ["--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"]
        head = _ray_command(
            "start", "--head", *head_options, f"--temp-dir={head_dir}", "--disable-usage-stats", env=env
        )
        assert head.returncode == 0, head.stderr[-2000:]
        worker_options = [f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1"]
        worker = _ray_command("start", *worker_options, env=env)
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _ray_command("stop", "--force", env=env, timeout=60)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


@pytest.mark.heavy  # a Ray cluster
def test_two_node_cluster_on_loopback(loopback_cluster, mvtec_root, tmp_path):

    references = sorted((mvtec_root / "widget" / "train" / "good").glob("*.png"))
    detector = tiny_detector("patchcore").fit(references)
    saved = detector.save(tmp_path / "detector")
    deadline = time.time() + 60
    while True:  # wait for both nodes to register
        ray.init(address=loopback_cluster, log_to_driver=False)
        if len([node for node in ray.nodes() if node["Alive"]]) == 2 or time.time() > deadline:
            break
        ray.shutdown()
        time.sleep(1)
    assert len([node for node in ray.nodes() if node["Alive"]]) == 2
    summary = predict_ray(saved, [mvtec_root / "widget" / "test"], tmp_path / "out", num_workers=2, batch_size=1)
    assert summary.scored == 6 and summary.skipped == 0
    expected = {result.source: result.score for result in detector.predict(summary_paths(tmp_path / "out"))}
    for path, record in _records(tmp_path / "out").items():
        assert record["score"] == pytest.approx(expected[path], rel=1e-3)


def summary_paths(out):
    return sorted(_records(out))


def test_uri_inputs_are_listed_and_read(mvtec_root):
    from anomalens.engines.ray import _read, list_inputs

    folder = mvtec_root / "widget" / "test"
    pairs = list_inputs([folder.as_uri()])
    local = list_inputs([folder])
    assert [name for _, name in pairs] == [name for _, name in local] and len(pairs) == 6
    assert all(path.startswith("file://") for path, _ in pairs)
    assert _read(pairs[0][0]).shape == (40, 48, 3)
    with pytest.raises(ValueError, match="does not exist"):
        list_inputs([(folder / "nowhere").as_uri()])


def test_uri_reads_are_bounded(tmp_path, monkeypatch):
    """A remote file is read at most MAX_FILE_BYTES + 1 bytes, like a local one: larger is refused, named."""
    import anomalens.engines.ray as engine

    (tmp_path / "big.png").write_bytes(b"\x89PNG" + bytes(5000))
    monkeypatch.setattr(engine, "MAX_FILE_BYTES", 1000)
    from anomalens.io.images import ImageLoadError

    with pytest.raises(ImageLoadError, match="big.png: file exceeds the limit of 1000 bytes"):
        engine._read((tmp_path / "big.png").as_uri())
