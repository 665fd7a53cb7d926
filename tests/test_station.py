"""The station's parts: versioned models, the detector pool, the history (on SQLite and a real PostgreSQL server),
the image store, and one inspection end to end. Oracles: hashlib, a hand-computed conformal p-value, scipy's exact
binomial interval, direct scoring with the saved detector."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

import anomalens
from anomalens.station.history import ClaimLost, History, clopper_pearson
from anomalens.station.inspect import Station
from anomalens.station.models import ModelStore, check_product_name
from anomalens.station.pool import DetectorPool
from anomalens.station.settings import InspectionSettings
from anomalens.station.store import ImageStore

from conftest import textured_image, tiny_detector


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _saved(tmp_path, name: str, seed: int = 0, references: int = 5):
    rng = np.random.default_rng(seed)
    detector = tiny_detector("patchcore").fit([textured_image(rng, 40, 48) for _ in range(references)])
    return detector, detector.save(tmp_path / name)


# ---------------------------------------------------------------------------------------------------- models
def test_versions_pointer_rollback_and_removal(tmp_path):
    store = ModelStore(tmp_path / "models")
    first, first_dir = _saved(tmp_path, "a", seed=1)
    _, second_dir = _saved(tmp_path, "b", seed=2)
    references = [tmp_path / "ref.png"]
    references[0].write_bytes(b"reference bytes")
    one = store.add("bottle", first_dir, references=references, note="first")
    two = store.add("bottle", second_dir)
    assert store.active("bottle").number == two.number == 2 and store.products() == ["bottle"]
    assert one.record["fingerprint"] == first.fingerprint() and one.record["note"] == "first"
    assert one.record["references_sha256"] == [hashlib.sha256(b"reference bytes").hexdigest()]
    assert one.record["calibration"]["threshold"] == first.threshold
    assert store.rollback("bottle").number == 1  # the version before the active one
    assert anomalens.load(store.active("bottle").path).fingerprint() == first.fingerprint()  # restored exactly
    assert store.rollback("bottle", 2).number == 2
    with pytest.raises(ValueError, match="version 2 of 'bottle' is active"):
        store.remove("bottle", 2)
    store.remove("bottle", 1)
    assert [version.number for version in store.versions("bottle")] == [2]
    with pytest.raises(ValueError, match="has no version older than the active 2"):
        store.rollback("bottle")
    store.remove("bottle")
    assert store.products() == []
    with pytest.raises(ValueError, match="unknown product 'bottle'.*products: none"):
        store.active("bottle")


@pytest.mark.parametrize("name", ["../escape", "Bottle", "a/b", "", "x" * 65, ".hidden", "a..b"])
def test_product_names_are_plain_folder_names(name):
    with pytest.raises(ValueError, match="product name .* must be 1-64 characters"):
        check_product_name(name)


def test_concurrent_adds_get_distinct_versions(tmp_path):
    store = ModelStore(tmp_path / "models")
    _, saved = _saved(tmp_path, "a")
    numbers, errors = [], []

    def add():
        try:
            numbers.append(store.add("part", saved).number)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=add) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(numbers) == [1, 2, 3, 4, 5, 6]
    assert [version.number for version in store.versions("part")] == [1, 2, 3, 4, 5, 6]


def test_a_damaged_detector_is_refused_before_it_becomes_a_version(tmp_path):
    store = ModelStore(tmp_path / "models")
    _, saved = _saved(tmp_path, "a")
    (saved / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="does not match config.json"):
        store.add("part", saved)
    assert not (tmp_path / "models" / "part" / "ACTIVE").exists()


# ---------------------------------------------------------------------------------------------------- the pool
def test_pool_loads_lazily_evicts_lru_and_never_evicts_in_flight(tmp_path):
    store = ModelStore(tmp_path / "models")
    for name, seed in (("one", 1), ("two", 2), ("three", 3)):
        store.add(name, _saved(tmp_path, name, seed)[1])
    pool = DetectorPool(store, max_loaded=1)
    try:
        assert pool.loaded() == []
        with pool.use("one") as held:  # a request in flight on "one"
            with pool.use("two"):
                assert pool.loaded() == ["one", "two"]  # over budget while "one" is in use, never evicted
            assert pool.loaded() == ["one"] or pool.loaded() == ["two"]
            assert held.worker.thread.is_alive()
        with pool.use("three"):
            pass
        assert pool.loaded() == ["three"] and pool.stats.evictions >= 2
        # scores equal the saved detector's own (the oracle: load and predict directly)
        image = textured_image(np.random.default_rng(9), 40, 48)
        direct = anomalens.load(store.active("two").path).predict([image])[0].score
        with pool.use("two") as entry:
            pooled = entry.worker.submit([image]).result(timeout=60)[0][0].score
        assert pooled == pytest.approx(direct, rel=1e-6)
    finally:
        pool.close()


def test_pool_follows_a_rollback(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.add("part", _saved(tmp_path, "a", seed=1)[1])
    store.add("part", _saved(tmp_path, "b", seed=2)[1])
    pool = DetectorPool(store)
    try:
        with pool.use("part") as entry:
            assert entry.version.number == 2
        store.rollback("part")
        with pool.use("part") as entry:
            assert entry.version.number == 1 and entry.detector.fingerprint() == store.active("part").record[
                "fingerprint"]  # fmt: skip
    finally:
        pool.close()


# ---------------------------------------------------------------------------------------------------- the history
def _inspection(**extra):
    return {"product": "bottle", "source": "test", "image_sha256": "a" * 64, "score": 1.0, **extra}


def test_history_records_filters_and_migrates(db_url):
    history = History(db_url)
    assert history.schema_version() == "0002"
    first = history.record(_inspection(score=3.0, label="anomalous", regions=[{"box": [1, 2, 3, 4]}]))
    history.record(_inspection(product="plate", score=0.5, label="normal"))
    assert history.inspection(first)["regions"] == [{"box": [1, 2, 3, 4]}]
    assert [row["id"] for row in history.inspections(product="bottle")] == [first]
    assert [row["product"] for row in history.inspections(label="normal")] == ["plate"]
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    assert history.inspections(since=future) == [] and len(history.inspections(until=future)) == 2
    assert history.count() == 2 and history.products() == ["bottle", "plate"]
    History(db_url).close()  # a second opening finds the schema current (the migration runs once)
    with pytest.raises(ValueError, match="label 'odd' must be one of normal, anomalous"):
        history.inspections(label="odd")
    history.close()


def test_database_urls_are_checked_and_postgresql_goes_through_psycopg(postgres):
    from anomalens.station.history import database_url

    plain = postgres.url.replace("postgresql+psycopg://", "postgresql://")
    assert database_url(plain) == postgres.url
    assert History(plain).count() >= 0  # a plain postgresql:// URL opens
    for bad in ("mysql://root:secret@db/line", "history.db", "sqlite:"):
        with pytest.raises(ValueError, match="must be sqlite:///PATH or postgresql://") as raised:
            database_url(bad)
        assert "secret" not in str(raised.value)


def test_the_migrations_build_exactly_the_schema_the_code_uses(db_url):
    """The migration keeps its own frozen copy of the tables (as migrations must); Alembic's own comparison of the
    migrated database with the code's tables finds no difference, so the two cannot drift apart unnoticed."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    history = History(db_url)
    with history.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), history.metadata)
    assert differences == []
    history.close()


def test_claims_are_exclusive_under_racing_watchers(db_url):
    history = History(db_url)
    answers = []
    barrier = threading.Barrier(6)

    def race(owner):
        barrier.wait()
        answers.append(history.claim("bottle", "b" * 64, f"host:{owner}:x"))

    threads = [threading.Thread(target=race, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == ["busy"] * 5 + ["new"]
    owner = next(row["owner"] for row in history.claims())
    other = "host:99:x" if owner != "host:99:x" else "host:98:x"
    with pytest.raises(ClaimLost):  # only the claim's owner may complete it
        history.record(_inspection(image_sha256="b" * 64), claim=("bottle", "b" * 64, other))
    assert history.count() == 0
    history.record(_inspection(image_sha256="b" * 64), claim=("bottle", "b" * 64, owner))
    assert history.claim("bottle", "b" * 64, other) == "done" and history.count() == 1
    history.close()


def test_a_dead_owners_claim_is_taken_over_at_once(db_url):
    import socket
    import subprocess
    import sys

    history = History(db_url)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{socket.gethostname()}:{finished.stdout.strip()}:folder"  # a process that has exited
    assert history.claim("bottle", "c" * 64, dead) == "new"
    assert history.claim("bottle", "c" * 64, f"{socket.gethostname()}:{os.getpid()}:folder") == "new"
    history.close()


def test_reviews_queue_and_measured_false_alarms(db_url):
    history = History(db_url)
    ids = {}
    # p-values around alpha = 0.1 (band 2: [0.05, 0.2]), audited or not; labels as the detector gave them
    for name, p_value, label, audit in [("in-band", 0.1, "normal", False), ("far", 0.9, "normal", False),
                                        ("audit-pass", 0.9, "normal", True), ("audit-flag", 0.01, "anomalous", True),
                                        ("audit-flag-2", 0.02, "anomalous", True), ("edge", 0.05, "normal", False)]:
        ids[name] = history.record(_inspection(p_value=p_value, label=label, audit=audit, image_name=name))
    queued = {row["image_name"] for row in history.queue("bottle", 0.1, band=2.0)}
    assert queued == {"in-band", "edge", "audit-pass", "audit-flag", "audit-flag-2"}
    reviewed = history.review(ids["audit-flag"], "normal", "ann", note="glare")  # a false alarm, overruled
    assert reviewed["review_verdict"] == "normal" and reviewed["reviewer"] == "ann"
    history.review(ids["audit-flag"], "normal", "bob")
    assert [event["reviewer"] for event in history.review_events(ids["audit-flag"])] == ["ann", "bob"]
    history.review(ids["audit-pass"], "normal", "ann")
    history.review(ids["audit-flag-2"], "anomalous", "ann")  # a true defect: not a false alarm
    history.review(ids["in-band"], "normal", "ann")  # not audited: not in the estimate
    alarms = history.false_alarms("bottle", 0.1)
    assert (alarms.flagged, alarms.normal, alarms.rate) == (1, 2, 0.5)
    from scipy.stats import binomtest

    exact = binomtest(1, 2).proportion_ci(confidence_level=0.95, method="exact")
    assert (alarms.low, alarms.high) == pytest.approx((exact.low, exact.high))
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0
    assert "in-band" not in {row["image_name"] for row in history.queue("bottle", 0.1)}  # reviewed: out
    with pytest.raises(ValueError, match="verdict 'maybe' must be one of normal, anomalous"):
        history.review(ids["far"], "maybe", "ann")
    with pytest.raises(ValueError, match="no inspection 99999"):
        history.review(99999, "normal", "ann")
    history.close()


def test_outbox_leases_events_to_one_dispatcher(db_url):
    history = History(db_url)
    history.record(_inspection(), webhooks=["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"])
    first = history.due_events("one")
    assert len(first) == 2 and history.due_events("two") == []  # leased
    history.delivery_failed(first[0]["id"], "HTTP 500", retry_in_s=0.0)
    history.delivered(first[1]["id"])
    again = history.due_events("two")
    assert [event["id"] for event in again] == [first[0]["id"]] and again[0]["attempts"] == 1
    payload = json.loads(first[0]["payload"])
    assert payload["event"] == "inspection" and "image_path" not in payload
    history.close()


# ---------------------------------------------------------------------------------------------------- the store
def test_store_keeps_by_content_and_prunes_by_age_and_size(tmp_path):
    store = ImageStore(tmp_path / "store", keep_days=1.0, keep_gb=1500 / 2**30)  # 1,500 bytes
    paths = [store.put_image(hashlib.sha256(bytes([index])).hexdigest(), bytes([index]) * 600) for index in range(4)]
    assert store.put_image(hashlib.sha256(b"\x00").hexdigest(), b"\x00" * 600) == paths[0]  # once
    now = time.time()
    os.utime(store.path(paths[0]), (now - 3 * 86_400, now - 3 * 86_400))  # three days old
    for index, path in enumerate(paths[1:], start=1):
        os.utime(store.path(path), (now - 100 + index, now - 100 + index))
    removed = store.prune(now)
    assert removed == [paths[0], paths[1]]  # the old one; then the oldest until 1,200 <= 1,500 bytes
    assert all(store.path(path).exists() for path in paths[2:])
    with pytest.raises(ValueError, match="not a path inside the image store"):
        store.path("../../etc/passwd")


# ---------------------------------------------------------------------------------------------------- inspections
def test_an_inspection_is_scored_recorded_and_kept(tmp_path, db_url):
    store = ModelStore(tmp_path / "models")
    detector, saved = _saved(tmp_path, "a", references=9)
    store.add("part", saved)
    station = Station(DetectorPool(store), History(db_url), ImageStore(tmp_path / "store"),
                      InspectionSettings(audit_rate=1.0), seed=0)  # fmt: skip
    try:
        image = textured_image(np.random.default_rng(4), 40, 48)
        image[10:20, 10:20] = 255  # a bright defect
        data = _png(image)
        row = station.inspect("part", data, "part.png", "test")
        direct = detector.predict([image])[0]
        assert row["score"] == pytest.approx(direct.score, rel=1e-6) and row["version"] == 1
        held = detector.calibration.held_out_scores
        assert row["p_value"] == (1 + sum(score >= row["score"] for score in held)) / (len(held) + 1)  # by hand
        assert row["image_sha256"] == hashlib.sha256(data).hexdigest() and row["audit"] is True
        assert station.images.path(row["image_path"]).read_bytes() == data
        assert Image.open(station.images.path(row["overlay_path"])).format == "JPEG"
        recorded = station.history.inspection(row["id"])
        assert recorded["label"] == ("anomalous" if direct.label else "normal") and recorded["audit"] is True
    finally:
        station.pool.close()


def test_a_full_disk_costs_the_image_never_the_verdict(tmp_path):
    import subprocess

    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({mounted.stderr.decode().strip()})")
    try:
        (full / "filler").write_bytes(b"\0" * 12_000)
        store = ModelStore(tmp_path / "models")
        store.add("part", _saved(tmp_path, "a")[1])
        station = Station(DetectorPool(store), History(f"sqlite:///{tmp_path / 'h.db'}"), ImageStore(full / "store"))
        big = np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)  # ~120 kB as PNG
        row = station.inspect("part", _png(big), "big.png", "test")
        recorded = station.history.inspection(row["id"])
        assert "No space left on device" in recorded["store_error"] and recorded["image_path"] is None
        assert recorded["score"] == row["score"] and recorded["label"] in ("normal", "anomalous")
        station.pool.close()
    finally:
        subprocess.run(["umount", str(full)], check=False)
