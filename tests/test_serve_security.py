"""anomalens serve under attack: API key, Host and Origin checks, streamed body limits, validated form fields,
refits as cancellable jobs that swap the detector only on success, and error bodies without internals."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="serve is in the test extras: pip install -e '.[test]'")
from fastapi.testclient import TestClient  # noqa: E402

from anomalens.engines.access import AccessSettings, check_exposure, session_token  # noqa: E402
from anomalens.engines.serve import ServerSettings, create_app  # noqa: E402

from conftest import BrightnessConfig, BrightnessDetector, textured_image, tiny_detector  # noqa: E402

KEY = "k" * 8 + "-secret-0123"
LOCAL = "http://127.0.0.1"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _files(*items):
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


@pytest.fixture
def pngs():
    rng = np.random.default_rng(0)
    return [png(textured_image(rng, 40, 48)) for _ in range(5)]


def _fitted_patchcore(pngs):
    return tiny_detector("patchcore").fit([Image.open(io.BytesIO(data)) for data in pngs[:3]])


def test_api_key_guards_every_endpoint(pngs):
    app = create_app(_fitted_patchcore(pngs), access=AccessSettings(api_key=KEY))
    with TestClient(app, base_url=LOCAL, follow_redirects=False) as client:
        for path in ("/healthz", "/v1/detector", "/openapi.json", "/docs", "/static/app.js"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert "API key" in response.json()["error"]
        assert client.post("/v1/predict", files=_files(("a.png", pngs[3]))).status_code == 401
        assert client.get("/").status_code == 303 and client.get("/").headers["location"] == "/login"
        assert client.get("/healthz", headers={"X-API-Key": KEY + "x"}).status_code == 401
        assert client.get("/healthz", headers={"X-API-Key": KEY}).status_code == 200
        assert client.get("/healthz", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        # The page: the login form sets a session cookie derived from the key, never the key itself.
        assert client.post("/login", data={"key": "wrong"}).status_code == 401
        login = client.post("/login", data={"key": KEY})
        assert login.status_code == 303
        cookie = login.cookies.get("anomalens_session")
        assert cookie == session_token(KEY) and KEY not in cookie
        assert (
            "httponly" in login.headers["set-cookie"].lower()
            and "samesite=strict" in login.headers["set-cookie"].lower()
        )
        assert client.get("/").status_code == 200  # the client now sends the cookie
        scored = client.post("/v1/predict", files=_files(("a.png", pngs[3])), headers={"Origin": LOCAL})
        assert scored.status_code == 200


def test_binding_beyond_loopback_needs_a_key(monkeypatch):
    monkeypatch.delenv("ANOMALENS_API_KEY", raising=False)
    with pytest.raises(ValueError, match="--api-key"):
        check_exposure("0.0.0.0", AccessSettings())
    check_exposure("127.0.0.1", AccessSettings())
    check_exposure("0.0.0.0", AccessSettings(api_key=KEY))
    monkeypatch.setenv("ANOMALENS_API_KEY", KEY)
    assert AccessSettings().key == KEY and AccessSettings().api_key is None  # never copied into the options
    check_exposure("0.0.0.0", AccessSettings())
    monkeypatch.delenv("ANOMALENS_API_KEY")
    from anomalens.cli import main

    tiny = ["--method", "patchcore", "--backbone", "taef2", "--pretrained", "none", "--set", "image_size=32"]
    assert main(["serve", *tiny, "--host", "0.0.0.0"]) == 2  # refused before anything is built or bound
    with pytest.raises(ValueError, match="at least 16"):
        AccessSettings(api_key="short")


def test_cross_site_and_rebinding_requests_cannot_refit(pngs):
    detector = _fitted_patchcore(pngs)
    detector.threshold = 0.5
    app = create_app(detector)
    attack = {"threshold": "1e9"}
    with TestClient(app, base_url=LOCAL) as client:
        refs = _files(*[(f"r{i}.png", data) for i, data in enumerate(pngs[:3])])
        for headers, status in [
            ({"Origin": "http://evil.example"}, 403),
            ({"Origin": "null"}, 403),
            ({"Sec-Fetch-Site": "cross-site"}, 403),
            ({"Host": "evil.example"}, 421),  # DNS rebinding: the attacker's name resolving to 127.0.0.1
            ({"Host": "evil.example", "Origin": "http://evil.example"}, 421),
        ]:
            response = client.post("/v1/references", files=refs, data=attack, headers=headers)
            assert response.status_code == status, (headers, response.text)
        described = client.get("/v1/detector").json()
        assert described["threshold"] == 0.5 and described["generation"] == 0  # nothing changed
        same_origin = client.post("/v1/references", files=refs, data={"threshold": "2.5"}, headers={"Origin": LOCAL})
        assert same_origin.status_code == 200 and same_origin.json()["threshold"] == 2.5


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "abc", "1" * 100])
def test_thresholds_must_be_finite(pngs, value):
    app = create_app(_fitted_patchcore(pngs))
    with TestClient(app, base_url=LOCAL) as client:
        response = client.post("/v1/references", files=_files(("r.png", pngs[0])), data={"threshold": value})
        assert response.status_code == 422 and "finite number" in response.json()["error"]
        assert client.get("/v1/detector").json()["generation"] == 0


def test_class_name_is_validated(pngs):
    app = create_app(_fitted_patchcore(pngs))
    with TestClient(app, base_url=LOCAL) as client:
        response = client.post("/v1/references", files=_files(("r.png", pngs[0])), data={"class_name": "x" * 500})
        assert response.status_code == 422 and "class_name" in response.json()["error"]


def test_chunked_upload_is_cut_off_at_the_limit(pngs):
    """No Content-Length: the limit is enforced on the bytes streamed, long before the body ends (driven at the
    ASGI level, because the test client reads a streamed body whole before handing it over)."""
    import asyncio

    app = create_app(_fitted_patchcore(pngs), ServerSettings(max_request_bytes=1_000_000))
    pulled, sent = [], []
    head = b'--boundary\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'

    async def receive():
        pulled.append(1)
        if len(pulled) > 2000:  # 2000 x 64 KiB = 125 MiB if it were all read
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": head if len(pulled) == 1 else bytes(65536), "more_body": True}

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"multipart/form-data; boundary=boundary")]
    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "root_path": "",
             "http_version": "1.1", "headers": headers}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and b"1000000 bytes" in sent[1]["body"]
    assert len(pulled) < 20  # reading stopped at the limit
    with TestClient(app, base_url=LOCAL) as client:
        big = client.post("/v1/predict", content=b"x", headers={"Content-Length": "5000000"})
        assert big.status_code == 413


def _gated(detector, gate: threading.Event, calls: list):
    """Make ``detector``'s reference encoding wait for ``gate`` (copies made for a refit wait too)."""
    encode = type(detector)._encode_references

    def slow_encode(self, images):
        calls.append(len(images))
        gate.wait(10)
        return encode(self, images)

    detector._encode_references = slow_encode.__get__(detector)  # deep copies get their own bound copy
    return detector


def _finished(client, job_id: str) -> dict:
    """Poll a refit job until it ends (at most 10 s); its last status."""
    for _ in range(200):
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    return status


def test_refit_is_a_job_beside_scoring_and_swaps_only_on_success(pngs):
    gate, calls = threading.Event(), []
    detector = _fitted_patchcore(pngs)
    detector.threshold = 0.75
    app = create_app(detector, ServerSettings(request_timeout_s=0.2))
    refs = _files(*[(f"r{i}.png", data) for i, data in enumerate(pngs)])
    with TestClient(app, base_url=LOCAL) as client:
        _gated(app.state.worker.detector, gate, calls)
        started = client.post("/v1/references", files=refs)
        assert started.status_code == 202
        job = started.json()["job"]
        assert started.headers["location"] == f"/v1/jobs/{job['id']}" and job["status"] in ("queued", "running")
        # Scoring goes on with the old detector meanwhile; a second refit is refused.
        scored = client.post("/v1/predict", files=_files(("q.png", pngs[4])))
        assert scored.status_code == 200 and scored.json()["generation"] == 0
        assert scored.json()["results"][0]["threshold"] == 0.75
        assert client.post("/v1/references", files=refs).status_code == 409
        gate.set()
        status = _finished(client, job["id"])
        assert status["status"] == "succeeded" and status["done"] == status["total"] == 10  # 5 encoded + 5 held out
        assert status["threshold_source"] == "leave-one-out" and status["generation"] == 1
        described = client.get("/v1/detector").json()
        assert described["generation"] == 1 and described["threshold"] != 0.75
        assert client.post("/v1/predict", files=_files(("q.png", pngs[4]))).json()["generation"] == 1


def test_cancelled_or_timed_out_refit_changes_nothing(pngs):
    gate, calls = threading.Event(), []
    detector = _fitted_patchcore(pngs)
    detector.threshold = 0.75
    app = create_app(detector, ServerSettings(request_timeout_s=0.2, fit_timeout_s=0.5))
    refs = _files(*[(f"r{i}.png", data) for i, data in enumerate(pngs)])
    with TestClient(app, base_url=LOCAL) as client:
        _gated(app.state.worker.detector, gate, calls)
        job = client.post("/v1/references", files=refs).json()["job"]
        cancelled = client.delete(f"/v1/jobs/{job['id']}")
        gate.set()
        status = _finished(client, job["id"])
        assert cancelled.status_code == 200
        assert status["status"] == "cancelled" and "by request" in status["error"]
        described = client.get("/v1/detector").json()
        assert described["generation"] == 0 and described["threshold"] == 0.75
        # A refit that outlives fit_timeout_s is cancelled the same way.
        gate.clear()
        job = client.post("/v1/references", files=refs).json()["job"]
        time.sleep(0.7)
        gate.set()
        status = _finished(client, job["id"])
        assert status["status"] == "cancelled" and "fit timeout" in status["error"]
        assert client.get("/v1/detector").json()["generation"] == 0
        assert client.get("/v1/jobs/nope").status_code == 404


def test_scoring_errors_are_reported_per_image_without_internals():
    detector = BrightnessDetector(BrightnessConfig(fail_on_width=31)).fit()
    app = create_app(detector)
    rng = np.random.default_rng(1)
    good, bad = png(textured_image(rng, 20, 30)), png(textured_image(rng, 20, 31))
    with TestClient(app, base_url=LOCAL) as client:
        response = client.post("/v1/predict", files=_files(("good.png", good), ("bad.png", bad)))
        assert response.status_code == 200
        body = response.json()
        assert [item["name"] for item in body["results"]] == ["good.png"]
        (rejected,) = body["rejected"]
        assert rejected["name"] == "bad.png" and rejected["error"].startswith("scoring failed (error id ")
        assert "width" not in rejected["error"] and "Traceback" not in response.text
        alone = client.post("/v1/predict", files=_files(("bad.png", bad)))
        assert alone.status_code == 500 and "cannot handle" not in alone.text


def test_an_image_over_the_memory_limit_is_413_as_documented(pngs):
    """Over the pipeline-memory limit is "too large" (413), like over the pixel limit; judged from the header."""
    settings = ServerSettings(max_image_memory_bytes=100_000)  # a 40 x 48 image needs about 129 kB to score
    with TestClient(create_app(_fitted_patchcore(pngs), settings), base_url=LOCAL) as client:
        response = client.post("/v1/predict", files=_files(("big.png", pngs[0])))
        assert response.status_code == 413 and "MiB" in response.json()["error"], response.text


def test_a_saved_detector_is_served_with_the_rule_that_chose_its_threshold(pngs, tmp_path):
    """Right after start the server reports how the threshold was chosen (leave-one-out), not a stand-in."""
    import anomalens

    saved = _fitted_patchcore(pngs).save(tmp_path / "saved")
    with TestClient(create_app(anomalens.load(saved)), base_url=LOCAL) as client:
        described = client.get("/v1/detector").json()
    assert described["threshold_source"] == "leave-one-out" and described["generation"] == 0
    assert described["threshold"] == max(described["held_out_scores"])
