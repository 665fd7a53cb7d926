"""anomalens serve: the API through the ASGI test client, a schema-driven fuzz run, hardening."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="serve is in the test extras: pip install -e '.[test]'")
from fastapi.testclient import TestClient  # noqa: E402

from anomalens.engines.access import AccessSettings  # noqa: E402
from anomalens.engines.serve import ServerSettings, create_app, safe_name  # noqa: E402

from conftest import plant_defect, textured_image, tiny_detector  # noqa: E402


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    references = [png(textured_image(rng, 40, 48)) for _ in range(3)]
    normal = png(textured_image(rng, 40, 48))
    defective = png(plant_defect(textured_image(rng, 40, 48), 10, 10, 14)[0])
    return references, normal, defective


@pytest.fixture
def client():
    app = create_app(tiny_detector("patchcore"), ServerSettings(max_upload_bytes=200_000, max_pixels=100_000))
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield test_client


def _files(*items):
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def test_fit_then_predict(client, images):
    references, normal, defective = images
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["fitted"] is False
    response = client.post("/v1/predict", files=_files(("a.png", normal)))
    assert response.status_code == 409 and "POST normal images to /v1/references" in response.json()["error"]
    fitted = client.post("/v1/references", files=_files(*[(f"r{i}.png", data) for i, data in enumerate(references)]))
    assert fitted.status_code == 200
    body = fitted.json()
    assert body["fitted"] and body["references"] == 3 and body["threshold_source"] == "leave-one-out"
    result = client.post("/v1/predict", files=_files(("ok.png", normal), ("bad.png", defective)),
                         data={"include_raw_map": "true"}).json()  # fmt: skip
    assert [r["name"] for r in result["results"]] == ["ok.png", "bad.png"]
    ok, bad = result["results"]
    assert bad["score"] > ok["score"] and bad["threshold"] == body["threshold"]
    assert ok["label"] in ("normal", "anomalous") and {"queue_ms", "inference_ms", "total_ms"} <= set(ok["timing"])
    heatmap = Image.open(io.BytesIO(base64.b64decode(bad["heatmap_jpeg"])))  # JPEG by default: cheap to encode
    raw = np.asarray(Image.open(io.BytesIO(base64.b64decode(bad["map_png"]))))
    assert heatmap.format == "JPEG" and heatmap.size == (48, 40) and "heatmap_png" not in bad
    assert raw.dtype == np.uint16 and raw.max() == 65535
    as_png = client.post("/v1/predict", files=_files(("bad.png", defective)), data={"heatmap_format": "png"}).json()
    lossless = np.asarray(Image.open(io.BytesIO(base64.b64decode(as_png["results"][0]["heatmap_png"]))))
    assert lossless.shape == (40, 48, 3) and "heatmap_jpeg" not in as_png["results"][0]
    # the JPEG is the same overlay up to compression
    assert np.abs(np.asarray(heatmap, dtype=np.float32) - lossless).mean() < 4.0
    refused = client.post("/v1/predict", files=_files(("bad.png", defective)), data={"heatmap_format": "gif"})
    assert refused.status_code == 422 and "'gif' is not one of jpeg, png" in refused.json()["error"]
    described = client.get("/v1/detector").json()
    assert described["method"] == "patchcore" and described["limits"]["max_pixels"] == 100_000
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "anomalens" in page.text and "/static/app.js" in page.text
    assert "https://" not in page.text and "http://" not in client.get("/static/app.js").text


def test_bad_requests_get_json_4xx(client, images):
    references, normal, _ = images
    client.post("/v1/references", files=_files(*[(f"r{i}.png", data) for i, data in enumerate(references)]))
    cases = [
        (_files(("notes.png", b"definitely not an image")), 415, "not a recognised image format"),
        (_files(("empty.png", b"")), 400, "empty file"),
        (_files(("huge.png", png(np.zeros((400, 400, 3), np.uint8)))), 413, "pixels exceeds the limit"),
        (_files(("big.png", b"\x89PNG" + bytes(250_000))), 413, "bytes exceeds the limit"),
        (_files(("anim.gif", _gif())), 415, "GIF is not accepted"),
    ]
    for files, status, text in cases:
        response = client.post("/v1/predict", files=files)
        assert response.status_code == status, response.text
        assert text in response.json()["error"]
    assert client.post("/v1/predict").status_code == 422
    assert "files" in client.post("/v1/predict").json()["error"]
    mixed = client.post("/v1/predict", files=_files(("good.png", normal), ("../../etc/passwd", b"junk")))
    assert mixed.status_code == 200
    assert mixed.json()["rejected"] == [
        {"name": "passwd", "index": 1, "status": 415, "error": mixed.json()["rejected"][0]["error"]}
    ]
    assert client.get("/healthz").json()["status"] == "ok"  # still alive after all of it


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="GIF")
    return buffer.getvalue()


def test_concurrent_requests_share_forward_passes(images):
    references, normal, defective = images
    detector = tiny_detector("patchcore")
    app = create_app(detector, ServerSettings(max_batch=8, max_wait_ms=200))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        client.post("/v1/references", files=_files(*[(f"r{i}.png", data) for i, data in enumerate(references)]))
        before = client.get("/healthz").json()["batches"]
        responses = []

        def send(index):
            responses.append(
                client.post("/v1/predict", files=_files((f"{index}.png", normal if index % 2 else defective)))
            )

        threads = [threading.Thread(target=send, args=(index,)) for index in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(response.status_code == 200 for response in responses)
        batches = client.get("/healthz").json()["batches"] - before
        assert batches < 6  # at least two requests were scored in one pass
        assert max(r.json()["results"][0]["timing"]["batch_images"] for r in responses) >= 2


def test_request_timeout_is_504(images):
    references, normal, _ = images
    detector = tiny_detector("patchcore").fit([Image.open(io.BytesIO(references[0]))])
    app = create_app(detector, ServerSettings(request_timeout_s=0.05))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        app.state.worker.lock.acquire()  # the model is busy
        try:
            response = client.post("/v1/predict", files=_files(("a.png", normal)))
        finally:
            app.state.worker.lock.release()
        assert response.status_code == 504 and "longer than 0.05 s" in response.json()["error"]


def test_upload_names_are_never_paths():
    assert safe_name("../../etc/passwd", 0) == "passwd"
    assert safe_name("C:\\Windows\\evil.png", 0) == "evil.png"
    assert safe_name("", 3) == "upload-4" and safe_name("a\x00b.png", 0) == "ab.png"
    assert len(safe_name("x" * 500, 0)) == 120


@pytest.mark.heavy
def test_schema_driven_fuzz_finds_no_server_error(images):
    """Schemathesis generates requests from the OpenAPI spec; none may produce a 5xx (bounded run)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    references, _, _ = images
    detector = tiny_detector("patchcore").fit([Image.open(io.BytesIO(references[0]))])
    app = create_app(
        detector,
        ServerSettings(max_upload_bytes=100_000, max_pixels=50_000),
        access=AccessSettings(allowed_hosts=("testserver",)),
    )  # the host name Starlette's client sends
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []

    def make_check(strategy):
        @given(strategy)
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))
            content_type = response.headers.get("content-type") or [""]
            content_type = content_type[0] if isinstance(content_type, list) else content_type
            assert content_type.startswith(("application/json", "text/html")), content_type

        return check

    with TestClient(app, base_url="http://127.0.0.1"):
        for operation in schema.get_all_operations():
            make_check(operation.ok().as_strategy())()
    assert not failures, failures
