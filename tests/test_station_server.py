"""``serve --models``: every product behind one server, each upload recorded, reviews, the queue and the measured
false-alarm rate, the API key guard, and a database that goes away (503, never an unrecorded verdict). Oracles:
the saved detectors scoring the same images directly, hashlib, hand counts, scipy's binomial interval."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
from fastapi.testclient import TestClient  # noqa: E402

import anomalens  # noqa: E402
from anomalens.engines.access import AccessSettings  # noqa: E402
from anomalens.engines.serve import ServerSettings  # noqa: E402
from anomalens.station.history import History  # noqa: E402
from anomalens.station.inspect import Station  # noqa: E402
from anomalens.station.models import ModelStore  # noqa: E402
from anomalens.station.pool import DetectorPool  # noqa: E402
from anomalens.station.server import create_station_app  # noqa: E402
from anomalens.station.settings import InspectionSettings  # noqa: E402
from anomalens.station.store import ImageStore  # noqa: E402

from conftest import textured_image, tiny_detector  # noqa: E402

KEY = "station-key-0123456789"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _station(tmp_path, url: str, *, max_loaded: int | None = None, audit_rate: float = 0.0) -> Station:
    store = ModelStore(tmp_path / "models")
    for seed, product in enumerate(("cap", "plate")):
        rng = np.random.default_rng(seed)
        detector = tiny_detector("patchcore").fit([textured_image(rng, 40, 48) for _ in range(9)])
        store.add(product, detector.save(tmp_path / f"saved-{product}"))
    return Station(DetectorPool(store, max_loaded), History(url), ImageStore(tmp_path / "store"),
                   InspectionSettings(audit_rate=audit_rate), seed=0)  # fmt: skip


def _client(station: Station, key: str | None = None) -> TestClient:
    app = create_station_app(station, ServerSettings(max_upload_bytes=200_000), access=AccessSettings(api_key=key))
    return TestClient(app, base_url="http://127.0.0.1")


def _images(count: int, seed: int = 50) -> list[np.ndarray]:
    images = []
    for index in range(count):
        image = textured_image(np.random.default_rng(seed + index), 40, 48)
        if index % 3 == 0:
            image[8:20, 12:24] = 250  # a defect on every third
        images.append(image)
    return images


def test_every_product_behind_one_server_each_upload_recorded(tmp_path, db_url):
    station = _station(tmp_path, db_url, max_loaded=1)
    with _client(station) as client:
        listed = client.get("/v1/detectors").json()["detectors"]
        assert [item["name"] for item in listed] == ["cap", "plate"] and all(item["version"] == 1 for item in listed)
        images = _images(4)
        for product in ("cap", "plate", "cap"):  # with one loaded at a time, each switch evicts the other
            files = [("files", (f"i{index}.png", _png(image), "image/png")) for index, image in enumerate(images)]
            answer = client.post(f"/v1/detectors/{product}/predict", files=files, data={"source": "line-3"})
            assert answer.status_code == 200, answer.text
            direct = anomalens.load(tmp_path / f"saved-{product}").predict(images)
            for item, expected in zip(answer.json()["results"], direct, strict=True):
                assert item["score"] == pytest.approx(expected.score, rel=1e-4)  # batches differ: float noise
                assert item["label"] == ("anomalous" if expected.label else "normal")
            assert station.pool.loaded() == [product]
        rows = History(db_url).inspections(limit=None)
        assert len(rows) == 12 and {row["source"] for row in rows} == {"serve:line-3"}
        first = rows[-1]
        assert first["image_sha256"] == hashlib.sha256(_png(images[0])).hexdigest()
        assert client.get(f"/v1/inspections/{first['id']}/image").content == _png(images[0])
        assert client.get(f"/v1/inspections/{first['id']}/overlay").headers["content-type"] == "image/jpeg"
        cap = client.get("/v1/inspections", params={"product": "cap", "limit": 500}).json()["inspections"]
        assert len(cap) == 8 and all(item["product"] == "cap" and "image_path" not in item for item in cap)
        flagged = client.get("/v1/inspections", params={"product": "plate", "label": "anomalous"}).json()
        assert {item["id"] for item in flagged["inspections"]} == {
            row["id"] for row in rows if row["product"] == "plate" and row["label"] == "anomalous"}


def test_reviews_the_queue_and_the_measured_false_alarm_rate(tmp_path):
    from scipy.stats import binomtest

    station = _station(tmp_path, f"sqlite:///{tmp_path / 'h.db'}", audit_rate=1.0)
    with _client(station) as client:
        images = _images(9)
        files = [("files", (f"i{index}.png", _png(image), "image/png")) for index, image in enumerate(images)]
        results = client.post("/v1/detectors/cap/predict", files=files).json()["results"]
        queue = client.get("/v1/detectors/cap/queue").json()
        assert len(queue["queue"]) == 9  # all audited
        for item, image_index in zip(results, range(9), strict=True):  # the oracle: every third has the defect
            truth = "anomalous" if image_index % 3 == 0 else "normal"
            review = client.post(f"/v1/inspections/{item['id']}/review", data={"verdict": truth, "reviewer": "ana"})
            assert review.status_code == 200 and review.json()["review_verdict"] == truth
        assert client.get("/v1/detectors/cap/queue").json()["queue"] == []
        stats = client.get("/v1/detectors/cap/stats").json()
        normal = [item for index, item in enumerate(results) if index % 3 != 0]
        flagged = sum(item["label"] == "anomalous" for item in normal)
        alarms = stats["false_alarms"]
        assert (alarms["flagged"], alarms["normal"]) == (flagged, 6)
        interval = binomtest(flagged, 6).proportion_ci(0.95, method="exact")
        assert alarms["low"] == pytest.approx(interval.low) and alarms["high"] == pytest.approx(interval.high)
        assert sum(stats["histogram"]["counts"]) == 9 and stats["count"] == 9
        edges = stats["histogram"]["edges"]
        assert edges[0] <= min(item["score"] for item in results) and edges[-1] >= stats["threshold"]
        bad = client.post(f"/v1/inspections/{results[0]['id']}/review", data={"verdict": "maybe", "reviewer": "ana"})
        assert bad.status_code == 422 and "normal, anomalous" in bad.json()["error"]
        assert client.post("/v1/inspections/999999/review", data={"verdict": "normal", "reviewer": "a"}).status_code \
            == 404  # fmt: skip
        unknown = client.get("/v1/detectors/lid/queue")
        assert unknown.status_code == 404 and "cap" in unknown.json()["error"]


def test_the_api_key_guards_scoring_and_reviews(tmp_path):
    station = _station(tmp_path, f"sqlite:///{tmp_path / 'h.db'}")
    with _client(station, key=KEY) as client:
        png = _png(_images(1)[0])
        assert client.post("/v1/detectors/cap/predict", files=[("files", ("a.png", png, "image/png"))]).status_code \
            == 401  # fmt: skip
        assert client.get("/v1/inspections").status_code == 401
        assert History(f"sqlite:///{tmp_path / 'h.db'}").count() == 0  # nothing recorded without the key
        answer = client.post("/v1/detectors/cap/predict", files=[("files", ("a.png", png, "image/png"))],
                             headers={"X-API-Key": KEY})  # fmt: skip
        inspection = answer.json()["results"][0]["id"]
        denied = client.post(f"/v1/inspections/{inspection}/review", data={"verdict": "normal", "reviewer": "x"})
        assert denied.status_code == 401
        assert History(f"sqlite:///{tmp_path / 'h.db'}").inspection(inspection)["review_verdict"] is None


def test_bad_uploads_are_refused_one_by_one(tmp_path):
    station = _station(tmp_path, f"sqlite:///{tmp_path / 'h.db'}")
    with _client(station) as client:
        good = _png(_images(1)[0])
        files = [("files", ("good.png", good, "image/png")), ("files", ("bad.png", b"not an image", "image/png")),
                 ("files", ("big.png", b"\0" * 300_000, "image/png"))]  # fmt: skip
        answer = client.post("/v1/detectors/cap/predict", files=files).json()
        assert [item["name"] for item in answer["results"]] == ["good.png"]
        assert {item["name"]: item["status"] for item in answer["rejected"]} == {"bad.png": 415, "big.png": 413}
        assert History(f"sqlite:///{tmp_path / 'h.db'}").count() == 1
        for params in ({"limit": 0}, {"since": "yesterday"}, {"label": "odd"}):
            assert client.get("/v1/inspections", params=params).status_code == 422, params


def test_a_stopped_database_answers_503_and_records_nothing_half(tmp_path, postgres):
    url = postgres.database("serve503")
    station = _station(tmp_path, url)
    with _client(station) as client:
        png = _png(_images(1)[0])
        assert client.post("/v1/detectors/cap/predict", files=[("files", ("a.png", png, "image/png"))]).status_code \
            == 200  # fmt: skip
        postgres.stop()
        try:
            down = client.post("/v1/detectors/cap/predict", files=[("files", ("b.png", png, "image/png"))])
            assert down.status_code == 503 and "not recorded" in down.json()["error"]
            listing = client.get("/v1/inspections")  # reading too: a 503 naming the database, not a 500
            assert listing.status_code == 503 and "history database" in listing.json()["error"]
        finally:
            postgres.start()
        again = client.post("/v1/detectors/cap/predict", files=[("files", ("b.png", png, "image/png"))])
        assert again.status_code == 200
    assert [row["image_name"] for row in History(url).inspections(limit=None)] == ["b.png", "a.png"]


def test_retention_removes_the_oldest_files_and_the_rows_stay(tmp_path):
    station = _station(tmp_path, f"sqlite:///{tmp_path / 'h.db'}")
    station.images.keep_gb = 1e-9  # about one byte: every stored file is over the budget
    with _client(station) as client:
        files = [("files", (f"i{index}.png", _png(image), "image/png")) for index, image in enumerate(_images(3))]
        ids = [item["id"] for item in client.post("/v1/detectors/cap/predict", files=files).json()["results"]]
        stored = sorted(path for path in (tmp_path / "store").rglob("*") if path.is_file())
        assert len(stored) == 6  # three images, three overlays
        assert station.apply_retention() == 6
        assert not [path for path in (tmp_path / "store").rglob("*") if path.is_file()]
        for inspection in ids:
            row = client.get(f"/v1/inspections/{inspection}").json()
            assert row["image_kept"] is False and row["overlay_kept"] is False and row["score"] > 0
            assert client.get(f"/v1/inspections/{inspection}/image").status_code == 404
