"""Ensembles: the fused scores and maps against members fitted, held out and normalised by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

import anomalens
from anomalens.cli import main

from conftest import TINY_CONFIGS, plant_defect, textured_image

MEMBERS = ({"method": "patchcore", **TINY_CONFIGS["patchcore"], "coreset_ratio": 1.0},
           {"method": "winclip", **TINY_CONFIGS["winclip"]})  # fmt: skip


def _member(spec: dict) -> anomalens.Detector:
    return anomalens.create(spec["method"], **{key: value for key, value in spec.items() if key != "method"})


def _data():
    rng = np.random.default_rng(5)
    references = [textured_image(rng, 40, 48) for _ in range(4)]
    queries = [textured_image(rng, 40, 48), plant_defect(textured_image(rng, 40, 48), 8, 10, 12)[0]]
    return references, queries


@pytest.mark.parametrize("normalisation", ["zscore", "minmax"])
def test_fused_results_match_members_held_out_and_normalised_by_hand(normalisation):
    references, queries = _data()
    weights = (2.0, 1.0)
    ensemble = anomalens.create("ensemble", members=MEMBERS, weights=weights, normalisation=normalisation)
    ensemble.fit(references, class_name="widget", threshold=None)
    fused_scores = np.zeros(len(queries))
    fused_maps = np.zeros((len(queries), 40, 48))
    for spec, weight in zip(MEMBERS, weights):
        held_scores, held_maps = [], []
        for index in range(len(references)):  # leave-one-out by refitting, as a user would by hand
            fold = _member(spec).fit(references[:index] + references[index + 1 :], class_name="widget", threshold=None)
            result = fold.predict(references[index])[0]
            held_scores.append(result.score)
            held_maps.append(result.anomaly_map.astype(np.float64))
        pixels = np.concatenate([item.ravel() for item in held_maps])
        if normalisation == "zscore":
            score_shift, score_scale = np.mean(held_scores), np.std(held_scores, ddof=1)
            map_shift, map_scale = pixels.mean(), pixels.std(ddof=1)
        else:
            score_shift, score_scale = min(held_scores), max(held_scores) - min(held_scores)
            map_shift, map_scale = pixels.min(), pixels.max() - pixels.min()
        member = _member(spec).fit(references, class_name="widget", threshold=None)
        for number, result in enumerate(member.predict(queries)):
            fused_scores[number] += weight * (result.score - score_shift) / score_scale / sum(weights)
            fused_maps[number] += weight * (result.anomaly_map - map_shift) / map_scale / sum(weights)
    results = ensemble.predict(queries)
    assert [result.score for result in results] == pytest.approx(fused_scores.tolist(), rel=1e-4, abs=1e-4)
    for result, expected in zip(results, fused_maps):
        assert np.allclose(result.anomaly_map, expected, rtol=1e-4, atol=1e-3)
    assert set(results[0].extras["members"]) == {"0:patchcore", "1:winclip"}


def test_ensemble_refuses_what_it_cannot_do():
    references, _ = _data()
    with pytest.raises(ValueError, match=r"needs at least 2 reference images to hold out \(got 1\)"):
        anomalens.create("ensemble", members=MEMBERS).fit(references[:1])
    with pytest.raises(ValueError, match=r"unknown method 'patchcor'; valid methods: .*patchcore"):
        anomalens.create("ensemble", members=("patchcor",))
    with pytest.raises(ValueError, match="weights=.* must be one non-negative weight per member"):
        anomalens.create("ensemble", members=MEMBERS, weights=(1.0,))
    with pytest.raises(ValueError, match="cannot itself be an ensemble"):
        anomalens.create("ensemble", members=("ensemble",))
    with pytest.raises(ValueError, match="set tiling on the members"):
        anomalens.create("ensemble", members=MEMBERS, tiling="on")


def test_ensemble_saves_loads_and_runs_from_the_command_line(capsys, mvtec_root, tmp_path):
    members = json.dumps([{"method": "patchcore", "backbone": "taef2", "pretrained": None, "image_size": 32},
                          {"method": "winclip", "backbone": "anomalens-tiny-clip", "pretrained": None}])  # fmt: skip
    saved = tmp_path / "saved"
    references = str(mvtec_root / "widget" / "train" / "good")
    code = main(["-q", "fit", "--method", "ensemble", "--set", f"members={members}", "--reference", references,
                 "--class-name", "widget", "--out", str(saved)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    meta = json.loads((saved / "config.json").read_text())
    assert [member["method"] for member in meta["config"]["members"]] == ["patchcore", "winclip"]
    assert meta["config"]["members"][0]["image_size"] == 32 and meta["threshold_source"] == "leave-one-out"
    out = tmp_path / "run"
    code = main(["-q", "predict", "--detector", str(saved), str(mvtec_root / "widget" / "test"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    restored = anomalens.load(saved)
    direct = {result.source: result.score for result in restored.predict([record["path"] for record in records])}
    for record in records:
        assert record["score"] == pytest.approx(direct[record["path"]], rel=1e-5)


def test_ensemble_is_served_like_any_detector():
    pytest.importorskip("fastapi", reason="serve is in the test extras: pip install -e '.[test]'")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from anomalens.engines.serve import ServerSettings, create_app

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    references, queries = _data()
    app = create_app(anomalens.create("ensemble", members=MEMBERS), ServerSettings())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        files = [("files", (f"r{i}.png", png(image), "image/png")) for i, image in enumerate(references)]
        assert client.post("/v1/references", files=files).json()["threshold_source"] == "leave-one-out"
        files = [("files", (f"q{i}.png", png(image), "image/png")) for i, image in enumerate(queries)]
        served = client.post("/v1/predict", files=files).json()["results"]
    local = anomalens.create("ensemble", members=MEMBERS).fit(references).predict(queries)
    assert [item["score"] for item in served] == pytest.approx([result.score for result in local], rel=1e-5)
