"""``anomalens serve``: an HTTP API and a browser page over one detector.

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

- ``POST /v1/predict``: one or more images (multipart field ``files``). For each: score, label, threshold,
  the heatmap overlay and the raw map as base64 PNGs, and timing. Files that are not acceptable images are
  listed under ``rejected`` with the reason; if no file is acceptable the request fails with a JSON 4xx.
- ``POST /v1/references``: (re)fit the detector on uploaded normal images; with two or more and no
  ``threshold`` field, the threshold is derived leave-one-out (as in ``anomalens predict``).
- ``GET /v1/detector``: the current detector and the server's limits. ``GET /healthz``: health.
- ``GET /``: the inspection page (plain HTML, CSS and JS served by this app; nothing from the internet).

One model worker thread owns the detector. Requests are micro-batched: the worker takes the first queued
job, gathers more for up to ``max_wait_ms`` or until ``max_batch`` images, and scores them in one forward
pass, so concurrent clients share passes; uploads are read by the event loop, so a slow client holds up
nobody. Every bad request gets a JSON 4xx naming the problem: bytes and pixels are capped, the type is
sniffed from the content (PNG, JPEG, BMP, TIFF), uploaded names are only echoed back, never used as paths,
and each request has a timeout.
"""

import asyncio
import base64
import concurrent.futures
import io
import logging
import queue
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from anomalens.detector import Detector
from anomalens.engines.core import fit_and_threshold, label_text
from anomalens.io.images import ImageLoadError, load_image_bytes
from anomalens.io.outputs import heatmap_overlay, png_bytes, raw_map_bytes

logger = logging.getLogger(__name__)

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "TIFF": "image/tiff"}
WEB_DIR = Path(__file__).resolve().parent / "web"
INSTALL_HINT = "anomalens serve needs FastAPI and uvicorn: pip install 'anomalens[serve]'"


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (uploads)
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error


@dataclass
class ServerSettings:
    """Limits and batching of the server."""

    max_batch: int = 8  # images scored together in one forward pass at most
    max_wait_ms: float = 20.0  # how long the worker waits to fill a batch after the first job arrives
    max_upload_bytes: int = 20 * 2**20  # per file, and per request body (times the file count limit)
    max_pixels: int = 40_000_000  # per image (width * height)
    max_files: int = 64  # per request
    request_timeout_s: float = 60.0  # a request still waiting after this gets 504

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.max_upload_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"invalid server settings {self}")


class RejectedUpload(ValueError):
    """An upload that is not an acceptable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, name: str, status: int, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.status, self.reason = name, status, reason


def safe_name(name: str | None, index: int) -> str:
    """A display name for an upload: the last path component, printable, at most 120 characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(character for character in base if character.isprintable()).strip()
    return cleaned[:120] or f"upload-{index + 1}"


def decode_upload(name: str, data: bytes, settings: ServerSettings) -> np.ndarray:
    """Check and decode one upload: size, sniffed type, pixel count. Raises :class:`RejectedUpload`."""
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise RejectedUpload(name, 400, "empty file")
    if len(data) > settings.max_upload_bytes:
        raise RejectedUpload(name, 413, f"{len(data)} bytes exceeds the limit of {settings.max_upload_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            kind, (width, height) = probe.format, probe.size
    except (UnidentifiedImageError, OSError, ValueError):
        raise RejectedUpload(name, 415, "not an image (PNG, JPEG, BMP or TIFF), judged by its content") from None
    if kind not in ALLOWED_FORMATS:
        raise RejectedUpload(name, 415, f"image type {kind} is not accepted; send PNG, JPEG, BMP or TIFF")
    if width * height > settings.max_pixels:
        raise RejectedUpload(
            name, 413, f"{width}x{height} = {width * height} pixels exceeds the limit of {settings.max_pixels}"
        )
    try:
        return load_image_bytes(data, name)
    except ImageLoadError as error:
        raise RejectedUpload(name, 422, error.reason) from None


@dataclass
class _Job:
    kind: str  # "predict" or "fit"
    arrays: list[np.ndarray]
    future: concurrent.futures.Future
    enqueued: float = field(default_factory=time.perf_counter)
    threshold: float | None = None
    class_name: str | None = None


class ModelWorker:
    """The single thread that owns the detector and micro-batches prediction jobs."""

    def __init__(self, detector: Detector, settings: ServerSettings):
        self.detector = detector
        self.settings = settings
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0  # forward passes run, for tests and /healthz
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="anomalens-model-worker", daemon=True)
        self.thread.start()

    def submit(self, kind: str, arrays: list[np.ndarray], **options: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put(_Job(kind, arrays, future, **options))
        return future

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending or self.jobs.get()
            pending = None
            if job is None:
                return
            if job.kind == "fit":
                self._fit(job)
                continue
            batch = [job]
            images = len(job.arrays)
            deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
            while images < self.settings.max_batch:
                try:
                    candidate = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if (
                    candidate is None
                    or candidate.kind != "predict"
                    or images + len(candidate.arrays) > self.settings.max_batch
                ):
                    pending = candidate  # handled next round, in order
                    break
                batch.append(candidate)
                images += len(candidate.arrays)
            self._predict(batch)

    def _predict(self, batch: list[_Job]) -> None:
        # Claim each job; a request that timed out has cancelled its future and is dropped.
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            return
        started = time.perf_counter()
        arrays = [array for job in batch for array in job.arrays]
        try:
            with self.lock:
                results = self.detector.predict_arrays(arrays)
                self.batches += 1
        except Exception as error:  # noqa: BLE001 - reported to every waiting request
            for job in batch:
                job.future.set_exception(error)
            return
        inference_ms = (time.perf_counter() - started) * 1000
        offset = 0
        for job in batch:
            count = len(job.arrays)
            timing = {
                "queue_ms": (started - job.enqueued) * 1000,
                "inference_ms": inference_ms,
                "batch_images": len(arrays),
            }
            job.future.set_result((results[offset : offset + count], timing))
            offset += count

    def _fit(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            with self.lock:
                if job.threshold is None:
                    self.detector.threshold = None  # a refit invalidates the old threshold
                source = fit_and_threshold(self.detector, job.arrays, job.class_name, job.threshold)
            job.future.set_result(source)
        except Exception as error:  # noqa: BLE001
            job.future.set_exception(error)


def _encode_png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def result_payload(name: str, array: np.ndarray, result, timing: dict[str, float], include_maps: bool) -> dict:
    """The JSON of one scored image (labels and the 16-bit map encoded as every engine encodes them)."""
    payload: dict[str, Any] = {
        "name": name,
        "score": result.score,
        "label": label_text(result.label),
        "threshold": result.threshold,
        "width": int(array.shape[1]),
        "height": int(array.shape[0]),
        "timing": {key: round(value, 3) if isinstance(value, float) else value for key, value in timing.items()},
    }
    if include_maps:
        raw, extra = raw_map_bytes(result.anomaly_map, "png16")  # value = pixel / 65535 * map_scale_max
        payload["heatmap_png"] = _encode_png(heatmap_overlay(array, result.anomaly_map, result.threshold))
        payload["map_png"] = base64.b64encode(raw).decode("ascii")
        payload["map_scale_max"] = extra["map_scale_max"]
    return payload


class _Problem(Exception):
    """A request the server answers with a JSON 4xx/5xx: status, message, rejected files."""

    def __init__(self, status: int, message: str, rejected: list | None = None):
        super().__init__(message)
        self.status, self.message, self.rejected = status, message, rejected or []


def _error(status: int, message: str, **extra: Any):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": message, **extra})


async def read_uploads(files: list, settings: ServerSettings) -> tuple[list[tuple[str, np.ndarray]], list[dict]]:
    """Decode a request's uploads: ``(name, image)`` of the acceptable ones and the rejected ones with reasons.

    Raises:
        _Problem: No files, too many, or none acceptable.
    """
    if not files:
        raise _Problem(400, "no files: send one or more images in the multipart field 'files'")
    if len(files) > settings.max_files:
        raise _Problem(413, f"{len(files)} files exceeds the limit of {settings.max_files} per request")
    accepted, rejected = [], []
    for index, upload in enumerate(files):
        name = safe_name(upload.filename, index)
        data = await upload.read(settings.max_upload_bytes + 1)
        try:
            accepted.append((name, await asyncio.to_thread(decode_upload, name, data, settings)))
        except RejectedUpload as problem:
            rejected.append({"name": name, "status": problem.status, "error": problem.reason})
    if not accepted:
        first = rejected[0]
        raise _Problem(first["status"], f"no acceptable image: {first['name']}: {first['error']}", rejected)
    return accepted, rejected


async def _wait(future: concurrent.futures.Future, settings: ServerSettings):
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=settings.request_timeout_s)
    except TimeoutError:
        future.cancel()
        raise _Problem(504, f"the request took longer than {settings.request_timeout_s:g} s") from None


def create_app(detector: Detector, settings: ServerSettings | None = None, *, class_name: str | None = None):
    """The ASGI app serving ``detector`` (a FastAPI instance; run it with uvicorn)."""
    _require_fastapi()
    from fastapi import FastAPI

    settings = settings or ServerSettings()
    state = {
        "class_name": class_name or detector.class_name,
        "threshold_source": "detector" if detector.threshold is not None else "none",
    }
    worker = ModelWorker(detector, settings)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        worker.stop()

    app = FastAPI(
        title="anomalens",
        version=_version(),
        description="Visual anomaly detection: score images, fit on normal references. See / for the page.",
        lifespan=lifespan,
    )
    app.state.worker = worker
    _install_error_handlers(app, settings)
    _add_routes(app, detector, worker, settings, state)
    _add_page(app)
    return app


def _install_error_handlers(app, settings: ServerSettings) -> None:
    """Every error as a JSON body naming the problem; bodies over the size limit refused up front."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, problem: RequestValidationError):
        details = [f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in problem.errors()]
        return _error(422, "invalid request: " + "; ".join(details))

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(_request: Request, problem: StarletteHTTPException):
        return _error(problem.status_code, str(problem.detail))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, problem: Exception):
        logger.exception("internal error")
        return _error(500, f"internal error: {type(problem).__name__}")

    @app.exception_handler(_Problem)
    async def problem_handler(_request: Request, problem: _Problem):
        return _error(problem.status, problem.message, rejected=problem.rejected)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        limit = settings.max_upload_bytes * settings.max_files + 2**20
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
        return await call_next(request)


def _add_routes(app, detector: Detector, worker: ModelWorker, settings: ServerSettings, state: dict) -> None:
    """``/healthz``, ``/v1/detector``, ``/v1/references`` and ``/v1/predict``."""
    from fastapi import File, Form, UploadFile

    @app.get("/healthz", summary="Health")
    async def healthz() -> dict:
        return {"status": "ok", "fitted": detector.is_fitted, "queued_jobs": worker.jobs.qsize(),
                "batches": worker.batches}  # fmt: skip

    @app.get("/v1/detector", summary="The current detector and the server's limits")
    async def describe() -> dict:
        return {**detector.describe(), "threshold_source": state["threshold_source"], "zero_shot": detector.zero_shot,
                "few_shot": detector.few_shot, "limits": settings.__dict__}  # fmt: skip

    @app.post("/v1/references", summary="(Re)fit the detector on normal reference images")
    async def references(
        files: Annotated[list[UploadFile], File(description="normal images")],
        threshold: Annotated[
            float | None, Form(description="fixed threshold; default: leave-one-out with >= 2")
        ] = None,
        class_name: Annotated[str | None, Form(description="the product's name, e.g. bottle")] = None,
    ) -> dict:
        if not detector.few_shot:
            raise _Problem(400, f"method {detector.method_name!r} is zero-shot and takes no reference images")
        accepted, rejected = await read_uploads(files, settings)
        if class_name:
            state["class_name"] = class_name
        arrays = [array for _, array in accepted]
        future = worker.submit("fit", arrays, threshold=threshold, class_name=state["class_name"])
        try:
            state["threshold_source"] = await _wait(future, settings)
        except ValueError as problem:
            raise _Problem(422, str(problem)) from None
        return {**detector.describe(), "threshold_source": state["threshold_source"], "references": len(accepted),
                "rejected": rejected}  # fmt: skip

    @app.post("/v1/predict", summary="Score images")
    async def predict(
        files: Annotated[list[UploadFile], File(description="images to score")],
        include_maps: Annotated[bool, Form(description="include the heatmap overlay and raw map PNGs")] = True,
    ) -> dict:
        started = time.perf_counter()
        if not detector.is_fitted:
            raise _Problem(409, "the detector is not fitted: POST normal images to /v1/references first")
        accepted, rejected = await read_uploads(files, settings)
        future = worker.submit("predict", [array for _, array in accepted])
        try:
            results, timing = await _wait(future, settings)
        except (ValueError, RuntimeError) as problem:
            raise _Problem(422, str(problem)) from None
        total_ms = (time.perf_counter() - started) * 1000
        payloads = await asyncio.to_thread(
            lambda: [
                result_payload(name, array, result, {**timing, "total_ms": total_ms}, include_maps)
                for (name, array), result in zip(accepted, results)
            ]
        )
        return {"results": payloads, "rejected": rejected, "method": detector.method_name}


def _add_page(app) -> None:
    """The inspection page at ``/`` and its static files."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


def _version() -> str:
    from anomalens import __version__

    return __version__
