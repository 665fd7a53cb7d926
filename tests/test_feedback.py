"""Learning from the inspector: incremental memory growth against brute force (torch.cdist and a one-at-a-time
greedy loop written here), ``Detector.update`` on every memory method, recalibration against a hand-computed
conformal rank, and reviews into a new version (CLI, server policy, rollback restoring exactly)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

import anomalens
from anomalens.nn.memory import NearestNeighbourMemory, project
from anomalens.station.feedback import sort_reviews, update_from_reviews
from anomalens.station.history import History
from anomalens.station.inspect import Station
from anomalens.station.models import ModelStore
from anomalens.station.pool import DetectorPool
from anomalens.station.settings import InspectionSettings
from anomalens.station.store import ImageStore

from conftest import textured_image, tiny_detector


def _coverage(points: torch.Tensor, bank: torch.Tensor) -> float:
    """Brute force: the largest distance from a point to its nearest bank entry."""
    return float(torch.cdist(points.double(), bank.double()).min(1).values.max())


def _greedy_continuation(bank: torch.Tensor, new: torch.Tensor, radius: float) -> list[int]:
    """The greedy k-center rule continued one pick at a time, written out: the new point farthest from the bank
    (and the picks so far) is added while it lies beyond ``radius``."""
    chosen: list[int] = []
    current = bank.double()
    while True:
        distances = torch.cdist(new.double(), current).min(1).values
        best = int(distances.argmax())
        if not float(distances[best]) > radius:
            return chosen
        chosen.append(best)
        current = torch.cat([current, new[best : best + 1].double()])


# ---------------------------------------------------------------------------------------------------- memory
def test_the_coverage_radius_is_the_brute_force_one_and_extend_keeps_it():
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(1500, 16, generator=generator)
    memory = NearestNeighbourMemory().fit(old, coreset_ratio=0.1, generator=torch.Generator().manual_seed(1))
    radius = memory.coverage_radius
    assert radius == pytest.approx(_coverage(old, memory.bank), rel=1e-5)
    bank_before = memory.bank.clone()
    new = torch.randn(300, 16, generator=generator) * 1.4 + 0.5
    update = memory.extend(new)
    expected = _greedy_continuation(bank_before, new, radius)
    assert update.added == len(expected) > 0 and not update.bounded
    assert torch.equal(memory.bank[: len(bank_before)], bank_before)  # nothing the detector knew is lost
    assert torch.allclose(memory.bank[len(bank_before) :], new[expected])  # the same picks, in the same order
    everything = torch.cat([old, new])
    assert _coverage(everything, memory.bank) <= radius * (1 + 1e-5)  # the guarantee holds for old and new
    assert update.radius_before == update.radius_after == pytest.approx(radius)


def test_an_update_equals_a_refit_up_to_the_coverage_bound():
    """Both banks are subsets of all features that cover them within their radius, so every query's nearest
    distance differs between them by at most the larger radius (triangle inequality), checked by brute force."""
    generator = torch.Generator().manual_seed(2)
    old, new = torch.randn(1200, 12, generator=generator), torch.randn(400, 12, generator=generator) + 1.0
    incremental = NearestNeighbourMemory().fit(old, coreset_ratio=0.1, generator=torch.Generator().manual_seed(3))
    incremental.extend(new)
    refit = NearestNeighbourMemory().fit(torch.cat([old, new]), coreset_ratio=len(incremental) / 1600,
                                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    bound = max(incremental.coverage_radius, refit.coverage_radius)
    everything = torch.cat([old, new])
    for memory in (incremental, refit):
        assert _coverage(everything, memory.bank) <= memory.coverage_radius * (1 + 1e-5)
    queries = torch.randn(500, 12, generator=generator) * 1.5
    near_incremental = torch.cdist(queries.double(), incremental.bank.double()).min(1).values
    near_refit = torch.cdist(queries.double(), refit.bank.double()).min(1).values
    assert float((near_incremental - near_refit).abs().max()) <= bound * (1 + 1e-5)
    assert len(incremental) <= 2.5 * len(refit)  # the update does not balloon the memory


def test_max_memory_bounds_the_bank_and_the_radius_says_what_was_left_out():
    generator = torch.Generator().manual_seed(4)
    old = torch.randn(800, 8, generator=generator)
    memory = NearestNeighbourMemory().fit(old, coreset_ratio=0.1, generator=torch.Generator().manual_seed(5))
    new = torch.randn(400, 8, generator=generator) * 3
    update = memory.extend(new, max_memory=len(memory) + 10)
    assert len(memory) == update.size_after == update.size_before + 10 and update.bounded
    assert update.radius_after == pytest.approx(_coverage(torch.cat([old, new]), memory.bank), rel=1e-5)
    with pytest.raises(ValueError, match="max_memory=0 must be an integer >= 1"):
        memory.extend(new, max_memory=0)
    with pytest.raises(ValueError, match=r"new memory features must be \(N, 8\)"):
        memory.extend(torch.zeros(3, 5))


def test_a_projected_selection_measures_its_radius_in_the_projection():
    generator = torch.Generator().manual_seed(6)
    wide = torch.randn(900, 200, generator=generator)
    memory = NearestNeighbourMemory().fit(wide, coreset_ratio=0.1, projection_dim=32,
                                          generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert memory.projection.shape == (200, 32)
    projected = wide @ memory.projection / math.sqrt(32)  # the Johnson-Lindenstrauss map, by hand
    assert torch.allclose(project(wide, memory.projection), projected)
    assert memory.coverage_radius == pytest.approx(_coverage(projected, projected_bank := projected[
        torch.cdist(memory.bank, wide).argmin(1)]), rel=1e-4)  # fmt: skip
    memory.extend(torch.randn(100, 200, generator=generator) * 2)
    assert len(projected_bank) < len(memory)


def test_a_memory_saved_before_radii_were_kept_loads_and_bounds_its_radius():
    generator = torch.Generator().manual_seed(8)
    old = torch.randn(600, 6, generator=generator)
    fitted = NearestNeighbourMemory().fit(old, coreset_ratio=0.2, generator=torch.Generator().manual_seed(9))
    legacy = {"bank": fitted.bank.clone()}  # what a file written before this release holds
    loaded = NearestNeighbourMemory()
    loaded.load_state_dict(legacy)
    assert loaded.coverage_radius is None and torch.equal(loaded.bank, fitted.bank)
    gaps = torch.cdist(loaded.bank, loaded.bank) + torch.eye(len(loaded.bank)) * 1e9
    smallest_gap = float(gaps.min())
    assert fitted.coverage_radius <= smallest_gap  # each greedy pick lay at least the final radius from the others
    update = loaded.extend(torch.randn(50, 6, generator=generator) * 2)
    assert update.radius_before == pytest.approx(smallest_gap, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- detectors
def _normal(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [textured_image(rng, 32, 32) for _ in range(count)]


def _odd_normal(seed: int, count: int) -> list[np.ndarray]:
    """Normal parts of a new supplier: brighter and smoother, so the references do not cover them."""
    return [np.clip(image // 2 + 120, 0, 255).astype(np.uint8) for image in _normal(seed, count)]


@pytest.mark.parametrize("method", ["patchcore", "winclip", "clipfusion", "ensemble"])
def test_update_takes_new_normals_in_and_recalibrates_by_the_same_rule(method):
    detector = tiny_detector(method, coreset_ratio=1.0) if method == "patchcore" else tiny_detector(method)
    detector.fit(_normal(0, 12), false_alarm_rate=0.1)
    new, calibration = _odd_normal(1, 3), _odd_normal(2, 5) + _normal(3, 5)
    before = [result.score for result in detector.predict(new)]
    report = detector.update(new, calibration)
    after = [result.score for result in detector.predict(new)]
    assert report.memory_size_after > report.memory_size_before and report.images == 3
    assert all(late <= early + 1e-6 for early, late in zip(before, after))  # nearest neighbours only got nearer
    # the conformal rule by hand: the ceil((m + 1)(1 - alpha))-th smallest held-out score
    held = sorted(result.score for result in detector.predict(calibration))
    assert detector.threshold == pytest.approx(held[math.ceil(11 * 0.9) - 1], rel=1e-6)
    assert detector.calibration.record["recalibrated"] is True and detector.calibration.record["n_held_out"] == 10
    assert report.threshold_after == detector.threshold and report.recalibrated


def test_an_ensemble_update_re_estimates_its_common_scale_on_the_calibration_images():
    detector = tiny_detector("ensemble").fit(_normal(0, 12), false_alarm_rate=0.1)
    calibration = _odd_normal(2, 5) + _normal(3, 5)
    detector.update(_odd_normal(1, 2), calibration)
    for number, member in enumerate(detector.members):  # z-scores: mean and sample std of each member's scores
        scores = np.array([result.score for result in member.predict(calibration)], dtype=np.float64)
        assert detector.score_stats[number].tolist() == pytest.approx([scores.mean(), scores.std(ddof=1)], rel=1e-5)
    fused = sorted(result.score for result in detector.predict(calibration))
    assert detector.threshold == pytest.approx(fused[math.ceil(11 * 0.9) - 1], rel=1e-5)  # on the new scale


def test_an_added_image_scores_within_the_coverage_radius():
    """PatchCore's image score (Eq. 7) is at most its largest patch distance, and every patch of a taken-in image
    lies within the coverage radius of the memory."""
    detector = tiny_detector("patchcore", coreset_ratio=0.3).fit(_normal(0, 8))
    report = detector.update(_odd_normal(1, 2))
    radius = report.memories["memory"].radius_after
    assert radius > 0 and all(result.score <= radius * (1 + 1e-5) for result in detector.predict(_odd_normal(1, 2)))


def test_update_refuses_what_it_cannot_do():
    zero_shot = tiny_detector("dual_image_clip").fit()
    with pytest.raises(ValueError, match="cannot be updated incrementally: it is zero-shot"):
        zero_shot.update(_normal(0, 1))
    detector = tiny_detector("patchcore").fit(_normal(0, 12), false_alarm_rate=0.1)
    with pytest.raises(ValueError, match="needs at least 9 held-out normal images, got 3"):
        detector.update(_normal(1, 1), _normal(2, 3))
    with pytest.raises(ValueError, match="at least one new normal image"):
        detector.update([])
    kept = detector.threshold
    report = detector.update(_odd_normal(3, 1))  # no calibration images: the threshold stays, and it says so
    assert detector.threshold == kept and not report.recalibrated and "threshold kept" in report.notes[0]


def test_an_updated_detector_saves_and_loads_its_grown_memory(tmp_path):
    detector = tiny_detector("patchcore").fit(_normal(0, 5))
    detector.update(_odd_normal(1, 2))
    loaded = anomalens.load(detector.save(tmp_path / "d"))
    assert torch.equal(loaded.memory.bank, detector.memory.bank)
    assert loaded.memory.coverage_radius == detector.memory.coverage_radius
    probe = _normal(5, 2)
    assert [r.score for r in loaded.predict(probe)] == [r.score for r in detector.predict(probe)]


# ---------------------------------------------------------------------------------------------------- the station
def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _line(tmp_path, db_url, audit_rate: float):
    models = ModelStore(tmp_path / "models")
    detector = tiny_detector("patchcore").fit(_normal(0, 12), false_alarm_rate=0.1)
    models.add("part", detector.save(tmp_path / "v1"))
    station = Station(DetectorPool(models), History(db_url), ImageStore(tmp_path / "models" / "store"),
                      InspectionSettings(audit_rate=audit_rate), seed=0)  # fmt: skip
    return models, station


def _inspect_all(station, images, prefix):
    return [station.inspect("part", _png(image), f"{prefix}{index}.png", "test") for index, image in enumerate(images)]


def test_reviews_become_a_new_version_and_rollback_restores_the_old_exactly(tmp_path, db_url):
    models, station = _line(tmp_path, db_url, audit_rate=0.0)
    try:
        odd = _inspect_all(station, _odd_normal(10, 6), "odd")  # a new supplier's normal parts: flagged
        flagged = [row for row in odd if row["label"] == "anomalous"]
        assert len(flagged) >= 3
        station.settings.audit_rate = 1.0  # then the audit sample: normal parts of both suppliers
        audit = _inspect_all(station, _normal(11, 6) + _odd_normal(12, 6), "audit")
        for row in flagged:
            station.history.review(row["id"], "normal", "ines")
        for row in audit:
            station.history.review(row["id"], "normal", "ines")
        parts = sort_reviews(station.history, station.images, models.active("part"))
        assert {row["id"] for row in parts.false_alarms} == {row["id"] for row in flagged}
        assert {row["id"] for row in parts.calibration} == {row["id"] for row in audit}
        v1 = anomalens.load(models.active("part").path)
        version, record = update_from_reviews(models, station.history, station.images, "part")
        assert version.number == 2 and models.active("part").number == 2
        update = version.record["update"]
        assert update["images"] == len(flagged) and update["calibration_images"] == 12 and update["recalibrated"]
        assert update["memory_size_after"] > update["memory_size_before"]
        assert version.record["feedback"]["taken_in_sha256"] == sorted(row["image_sha256"] for row in flagged)
        assert version.record["source"] == "update" and version.record["drift"]["delta"] == 0.01
        v2 = anomalens.load(version.path)
        odd_images = _odd_normal(10, 6)
        scores_v2 = [result.score for result in v2.predict(odd_images)]
        assert sum(score > v2.threshold for score in scores_v2) < len(flagged)  # fewer false alarms now
        held = sorted(result.score for result in v2.predict(_normal(11, 6) + _odd_normal(12, 6)))
        assert v2.threshold == pytest.approx(held[math.ceil(13 * 0.9) - 1], rel=1e-6)  # conformal rank by hand
        with pytest.raises(ValueError, match="no reviewed false alarms .* version 2 has not taken in"):
            update_from_reviews(models, station.history, station.images, "part")  # nothing new
        assert models.rollback("part").number == 1
        restored = anomalens.load(models.active("part").path)
        assert restored.fingerprint() == v1.fingerprint() and restored.threshold == v1.threshold
        assert [r.score for r in restored.predict(odd_images)] == [r.score for r in v1.predict(odd_images)]
    finally:
        station.pool.close()


def test_too_few_audit_parts_refuse_to_recalibrate_unless_told_to_keep(tmp_path, capsys):
    from anomalens.cli import main

    db = f"sqlite:///{tmp_path / 'h.db'}"
    models, station = _line(tmp_path, db, audit_rate=0.0)
    try:
        rows = [row for row in _inspect_all(station, _odd_normal(20, 4), "odd") if row["label"] == "anomalous"]
        station.history.review(rows[0]["id"], "normal", "ines")
        with pytest.raises(ValueError, match="needs 9 audit-sample parts confirmed normal .* got 0"):
            update_from_reviews(models, station.history, station.images, "part")
        command = ["models", "update", "part", "--from-reviews", "--models", str(models.root), "--db", db]
        assert main(command) == 2 and "--keep-threshold" in capsys.readouterr().err
        assert main([*command, "--keep-threshold"]) == 0
        assert "part@2 is active: 1 image(s) taken in" in capsys.readouterr().out
        version = models.active("part")
        assert not version.record["update"]["recalibrated"] and version.record["update"]["threshold_after"] == \
            version.record["update"]["threshold_before"]
        assert "threshold kept" in version.record["update"]["notes"][0]
    finally:
        station.pool.close()


def test_models_update_on_the_command_line(tmp_path, capsys):
    from anomalens.cli import main

    models = tmp_path / "models"
    detector = tiny_detector("patchcore").fit(_normal(0, 12), false_alarm_rate=0.1)
    store = ModelStore(models)
    store.add("part", detector.save(tmp_path / "v1"))
    for folder, images in (("new", _odd_normal(1, 3)), ("held", _normal(2, 5) + _odd_normal(3, 5))):
        (tmp_path / folder).mkdir()
        for index, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / folder / f"{index}.png")
    (tmp_path / "new" / "broken.png").write_bytes(b"not an image")  # reported and skipped
    code = main(["models", "update", "part", "--models", str(models), "--images", str(tmp_path / "new"),
                 "--calibration", str(tmp_path / "held")])  # fmt: skip
    assert code == 0
    assert "part@2 is active: 3 image(s) taken in" in capsys.readouterr().out
    record = json.loads((store.active("part").path / "version.json").read_text())
    assert record["update"]["calibration_images"] == 10 and len(record["feedback"]["taken_in_now_sha256"]) == 3
    by_hashlib = sorted(hashlib.sha256(path.read_bytes()).hexdigest() for path in (tmp_path / "new").glob("?.png"))
    assert record["feedback"]["taken_in_sha256"] == by_hashlib  # the lineage's set, for later --from-reviews
    assert main(["models", "update", "part", "--models", str(models)]) == 2  # neither source given
    assert "exactly one of --from-reviews and --images DIR" in capsys.readouterr().err


def test_the_server_publishes_an_update_after_n_reviewed_false_alarms(tmp_path):
    from fastapi.testclient import TestClient

    from anomalens.station.server import create_station_app

    models, station = _line(tmp_path, f"sqlite:///{tmp_path / 'h.db'}", audit_rate=0.0)
    station.settings.audit_rate = 1.0
    audit = _inspect_all(station, _normal(31, 10), "audit")
    station.settings.audit_rate = 0.0
    flagged = [row for row in _inspect_all(station, _odd_normal(30, 6), "odd") if row["label"] == "anomalous"]
    assert len(flagged) >= 2
    app = create_station_app(station, update_after=2)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for row in audit:
            assert client.post(f"/v1/inspections/{row['id']}/review", data={"verdict": "normal",
                                                                           "reviewer": "ines"}).status_code == 200
        client.post(f"/v1/inspections/{flagged[0]['id']}/review", data={"verdict": "normal", "reviewer": "ines"})
        time.sleep(0.5)
        assert models.active("part").number == 1  # one false alarm: not yet
        client.post(f"/v1/inspections/{flagged[1]['id']}/review", data={"verdict": "normal", "reviewer": "ines"})
        deadline = time.monotonic() + 60
        while models.active("part").number == 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        active = models.active("part")
        assert active.number == 2 and active.record["update"]["images"] == 2
        assert active.record["note"] == "automatic: 2 reviewed false alarms"
        assert client.get("/v1/detectors/part").json()["active"] == 2
