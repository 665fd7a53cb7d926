"""``anomalens serve``: an HTTP API and a browser page over one detector.

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

- ``POST /v1/predict``: one or more images (multipart field ``files``). For each: score, label, threshold,
  the heatmap overlay as a base64 PNG (``include_maps``), the raw 16-bit map only when asked
  (``include_raw_map``), and timing. Files that are not acceptable images, or that fail to score, are listed
  under ``rejected`` with the reason while the others are scored; if none is acceptable the request fails with
  a JSON 4xx.
- ``POST /v1/references``: start a refit on uploaded normal images, as a job. With two or more and no
  ``threshold`` field, the threshold is derived leave-one-out (as in ``anomalens predict``). The answer is
  the finished job (200) when it ends within the request timeout, else the running job (202); follow it at
  ``GET /v1/jobs/{id}`` and cancel it with ``DELETE /v1/jobs/{id}``.
- ``GET /v1/detector``: the current detector, its ``generation`` (one more after each refit) and the
  server's limits. ``GET /healthz``: health.
- ``GET /``: the inspection page (plain HTML, CSS and JS served by this app; nothing from the internet).
  ``GET/POST /login``: the form that takes the API key for the page, when one is set.

One model worker thread owns the detector and micro-batches predictions: it takes the first queued job,
gathers more for up to ``max_wait_ms`` or until ``max_batch`` images, and scores them in one forward pass.
A refit runs in its own thread on a copy of the detector (frozen backbone weights shared), so scoring goes
on meanwhile; the copy replaces the served detector only when the fit succeeded, under the worker's lock.
A refit that runs past ``fit_timeout_s`` or is cancelled stops at its next step and changes nothing.

Every input is checked before it costs anything: the body's bytes as they stream in (see
:mod:`anomalens.engines.access`, which also checks the API key, Host and Origin), each file's bytes, its type
sniffed from the content, and its width, height, pixels and pipeline memory from the header, before decoding.
Error bodies name the file and the problem, never internals.
"""

import asyncio
import base64
import concurrent.futures
import copy
import logging
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from anomalens.checks import check_options
from anomalens.detector import Detector
from anomalens.engines.access import SESSION_COOKIE, AccessGuard, AccessSettings, key_matches, session_token
from anomalens.engines.run_folder import label_text
from anomalens.io.images import ImageLimits, ImageLoadError, load_image_bytes
from anomalens.io.outputs import heatmap_overlay, jpeg_bytes, png_bytes, raw_map_bytes
from anomalens.thresholds import ThresholdOptions, apply_threshold_options, is_finite_number, threshold_from_text

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
INSTALL_HINT = "anomalens serve needs FastAPI and uvicorn: pip install 'anomalens[serve]'"
STATUS_OF_KIND = {"empty": 400, "format": 415, "size": 413, "unreadable": 422}  # ImageLoadError.kind -> HTTP


def require_fastapi():
    """Import FastAPI and python-multipart, or raise an ``ImportError`` that says how to install them."""
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
    max_upload_bytes: int = 20 * 2**20  # per file
    max_request_bytes: int = 256 * 2**20  # per request body, counted on the bytes received
    max_pixels: int = 40_000_000  # per image (width * height), read from the header before decoding
    max_image_memory_bytes: int = 2 * 2**30  # estimated memory to decode, score and draw one image
    max_files: int = 64  # per request
    request_timeout_s: float = 60.0  # a request still waiting after this gets 504 (a refit answers 202 instead)
    fit_timeout_s: float = 1800.0  # a refit still running after this is cancelled

    def __post_init__(self) -> None:
        check_options("serve", self, {
            name: (is_finite_number(value) and (value > 0 or (value == 0 and name == "max_wait_ms")),
                   "a finite number >= 0" if name == "max_wait_ms" else "a finite number > 0")
            for name, value in asdict(self).items()
        })  # fmt: skip

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_pixels=int(self.max_pixels), max_memory_bytes=int(self.max_image_memory_bytes))


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
    """Check and decode one upload: size, sniffed type, header limits, then pixels. Raises :class:`RejectedUpload`."""
    if len(data) > settings.max_upload_bytes:
        raise RejectedUpload(name, 413, f"{len(data)} bytes exceeds the limit of {settings.max_upload_bytes} bytes")
    try:
        return load_image_bytes(data, name, settings.image_limits)
    except ImageLoadError as error:
        raise RejectedUpload(name, STATUS_OF_KIND.get(error.kind, 422), error.reason) from None


@dataclass
class _Job:
    arrays: list[np.ndarray]
    future: concurrent.futures.Future
    enqueued: float = field(default_factory=time.perf_counter)


class FitCancelled(Exception):
    """Raised from a refit's progress callback to stop it."""


@dataclass
class RefitJob:
    """A refit running beside scoring; ``public()`` is its JSON."""

    id: str
    references: int
    options: ThresholdOptions
    class_name: str | None
    status: str = "queued"  # queued, running, succeeded, failed, cancelled
    done: int = 0
    total: int = 0
    error: str | None = None
    threshold_source: str | None = None
    generation: int | None = None  # the detector generation it produced
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    finished_event: threading.Event = field(default_factory=threading.Event)

    def public(self) -> dict[str, Any]:
        keys = ("id", "status", "references", "done", "total", "error", "threshold_source", "generation")
        seconds = (self.finished or time.time()) - self.created
        return {**{key: getattr(self, key) for key in keys}, "seconds": round(seconds, 3)}


def refit_copy(detector: Detector) -> Detector:
    """A copy of ``detector`` to fit while the original keeps serving: frozen weights (backbones) are shared,
    everything a fit or a prediction may change (buffers, trainable adapters) is copied."""
    shared = {id(parameter): parameter for parameter in detector.parameters() if not parameter.requires_grad}
    return copy.deepcopy(detector, memo=shared)


class ModelWorker:
    """Owns the served detector: one thread micro-batches predictions, another runs at most one refit."""

    def __init__(self, detector: Detector, settings: ServerSettings):
        self.detector = detector
        self.settings = settings
        self.generation = 0  # +1 each time a refit replaces the detector
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.refits: dict[str, RefitJob] = {}
        self.batches = 0  # forward passes run, for tests and /healthz
        self.lock = threading.Lock()  # held while scoring and while swapping the detector
        self.thread = threading.Thread(target=self._run, name="anomalens-model-worker", daemon=True)
        self.thread.start()

    def submit(self, arrays: list[np.ndarray]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put(_Job(arrays, future))
        return future

    def stop(self) -> None:
        for job in self.refits.values():
            job.cancel.set()
        self.jobs.put(None)
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------ scoring
    def _run(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending or self.jobs.get()
            pending = None
            if job is None:
                return
            batch, images = [job], len(job.arrays)
            deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
            while images < self.settings.max_batch:
                try:
                    candidate = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if candidate is None or images + len(candidate.arrays) > self.settings.max_batch:
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
        with self.lock:
            results = self._score(arrays)
            self.batches += 1
            generation = self.generation
        inference_ms = (time.perf_counter() - started) * 1000
        offset = 0
        for job in batch:
            count = len(job.arrays)
            timing = {"queue_ms": (started - job.enqueued) * 1000, "inference_ms": inference_ms,
                      "batch_images": len(arrays)}  # fmt: skip
            job.future.set_result((results[offset : offset + count], timing, generation))
            offset += count

    def _score(self, arrays: list[np.ndarray]) -> list:
        """Results for ``arrays``; if the batch fails, image by image, so one image cannot sink the others.
        A failed image's result is the error id it was logged under."""
        try:
            return self.detector.predict_arrays(arrays)
        except Exception:  # noqa: BLE001 - logged with an id; the client sees only the id
            if len(arrays) == 1:
                error_id = uuid.uuid4().hex[:12]
                logger.exception("scoring failed (error id %s)", error_id)
                return [error_id]
        return [result for array in arrays for result in self._score([array])]

    # ------------------------------------------------------------------ refits
    def start_refit(self, arrays: list[np.ndarray], options: ThresholdOptions, class_name: str | None) -> RefitJob:
        """Start a refit in its own thread. Raises ``RuntimeError`` if one is running."""
        with self.lock:
            running = [job for job in self.refits.values() if job.status in ("queued", "running")]
            if running:
                raise RuntimeError(f"refit {running[0].id} is still running; wait for it or cancel it")
            job = RefitJob(uuid.uuid4().hex[:12], len(arrays), options, class_name)
            for old in sorted(self.refits.values(), key=lambda item: item.created)[:-20]:  # keep the last 20
                del self.refits[old.id]
            self.refits[job.id] = job
        threading.Thread(target=self._refit, args=(job, arrays), name=f"anomalens-refit-{job.id}", daemon=True).start()
        return job

    def _refit(self, job: RefitJob, arrays: list[np.ndarray]) -> None:
        deadline = time.monotonic() + self.settings.fit_timeout_s
        job.status = "running"

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total
            if job.cancel.is_set():
                raise FitCancelled("cancelled by request")
            if time.monotonic() > deadline:
                raise FitCancelled(f"cancelled after the fit timeout of {self.settings.fit_timeout_s:g} s")

        try:
            with self.lock:  # a consistent copy: nothing is scoring (and adapting) meanwhile
                candidate = refit_copy(self.detector)
            source = apply_threshold_options(candidate, arrays, job.class_name, job.options, progress)
            progress(job.done, job.total)  # a cancel that came during the last step still counts
            with self.lock:
                if job.cancel.is_set():
                    raise FitCancelled("cancelled by request")
                self.detector = candidate
                self.generation += 1
                job.generation, job.threshold_source, job.status = self.generation, source, "succeeded"
        except FitCancelled as stop:
            job.status, job.error = "cancelled", str(stop)
        except ValueError as problem:  # the references or options do not suit the method: the user's to fix
            job.status, job.error = "failed", str(problem)
        except Exception:  # noqa: BLE001 - logged with the job id; the client sees only that
            logger.exception("refit %s failed", job.id)
            job.status, job.error = "failed", f"internal error (logged under refit {job.id})"
        finally:
            job.finished = time.time()
            job.finished_event.set()


HEATMAP_FORMATS = ("jpeg", "png")
PNG_LEVEL = 1  # zlib level of the served PNGs: lossless either way, 2.5x faster than PIL's default 6


def _encode_heatmap(overlay: np.ndarray, heatmap_format: str) -> str:
    encoded = jpeg_bytes(overlay) if heatmap_format == "jpeg" else png_bytes(overlay, PNG_LEVEL)
    return base64.b64encode(encoded).decode("ascii")


def result_payload(name: str, array: np.ndarray, result, timing: dict[str, float], include_maps: bool,
                   include_raw_map: bool = False, scale: tuple[float, float] | None = None,
                   heatmap_format: str = "jpeg") -> dict:  # fmt: skip
    """The JSON of one scored image (labels and the 16-bit map encoded as every engine encodes them); the heatmap
    is drawn on the detector's fixed colour scale ``scale`` (:meth:`~anomalens.thresholds.Calibration.map_scale_for`)
    and sent as ``heatmap_jpeg`` (quality 90, the default: encoding a 900 x 900 overlay as PNG took as long as
    scoring it) or ``heatmap_png``."""
    if heatmap_format not in HEATMAP_FORMATS:
        raise ValueError(f"heatmap_format={heatmap_format!r} is not one of {', '.join(HEATMAP_FORMATS)}")
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
        overlay = heatmap_overlay(array, result.anomaly_map, scale, mask=result.defect_mask())
        payload[f"heatmap_{heatmap_format}"] = _encode_heatmap(overlay, heatmap_format)
    if include_raw_map:
        raw, extra = raw_map_bytes(result.anomaly_map, "png16", PNG_LEVEL)  # value = pixel / 65535 * map_scale_max
        payload["map_png"] = base64.b64encode(raw).decode("ascii")
        payload["map_scale_max"] = extra["map_scale_max"]
    return payload


class Problem(Exception):
    """A request the server answers with a JSON 4xx/5xx: status, message, rejected files."""

    def __init__(self, status: int, message: str, rejected: list | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.rejected, self.extra = status, message, rejected or [], extra


def error_response(status: int, message: str, **extra: Any):
    """A JSON error body: ``{"error": message, ...}``."""
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": message, **extra})


async def read_uploads(files: list, settings: ServerSettings) -> tuple[list[tuple[str, np.ndarray, int]], list[dict]]:
    """Decode a request's uploads: ``(name, image, index)`` of the acceptable ones (``index``: the file's position
    in the request, which tells files of the same name apart) and the rejected ones with reasons.

    Raises:
        Problem: No files, too many, or none acceptable.
    """
    if not files:
        raise Problem(400, "no files: send one or more images in the multipart field 'files'")
    if len(files) > settings.max_files:
        raise Problem(413, f"{len(files)} files exceeds the limit of {settings.max_files} per request")
    accepted, rejected = [], []
    for index, upload in enumerate(files):
        name = safe_name(upload.filename, index)
        data = await upload.read(settings.max_upload_bytes + 1)
        try:
            accepted.append((name, await asyncio.to_thread(decode_upload, name, data, settings), index))
        except RejectedUpload as problem:
            rejected.append({"name": name, "index": index, "status": problem.status, "error": problem.reason})
        finally:
            await upload.close()
    if not accepted:
        first = rejected[0]
        raise Problem(first["status"], f"no acceptable image: {first['name']}: {first['error']}", rejected)
    return accepted, rejected


async def wait_for(future: concurrent.futures.Future, settings: ServerSettings):
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=settings.request_timeout_s)
    except TimeoutError:
        future.cancel()
        raise Problem(504, f"the request took longer than {settings.request_timeout_s:g} s") from None


def form_threshold(value: str | None) -> ThresholdOptions:
    """A form's ``threshold`` as threshold options: empty/absent (the default rule), ``auto``, a rule name such as
    ``leave-one-out``, ``none`` or a finite number (:func:`anomalens.thresholds.threshold_from_text`)."""
    if value is None or not value.strip():
        return ThresholdOptions()
    try:
        return threshold_from_text(value)
    except ValueError as problem:
        raise Problem(422, str(problem)) from None


def parse_class_name(value: str | None) -> str | None:
    """A form's ``class_name``: at most 100 printable characters."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if len(text) > 100 or not text.isprintable():
        raise Problem(422, f"class_name must be at most 100 printable characters, got {len(text)} characters")
    return text


def create_app(detector: Detector, settings: ServerSettings | None = None, *, class_name: str | None = None,
               access: AccessSettings | None = None, bound_host: str = "127.0.0.1"):  # fmt: skip
    """The ASGI app serving ``detector``: FastAPI behind :class:`~anomalens.engines.access.AccessGuard`.

    Args:
        detector: The detector to serve (fitted, or fitted later through ``/v1/references``).
        settings: Limits and batching.
        class_name: The product's name, for language-guided methods.
        access: API key, hosts and origins (default: no key, loopback only).
        bound_host: The address the server listens on, for the Host check.
    """
    require_fastapi()
    from fastapi import FastAPI

    settings = settings or ServerSettings()
    access = access or AccessSettings()
    state = {"class_name": class_name or detector.class_name}
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
    install_error_handlers(app)
    _add_status_routes(app, worker, settings)
    _add_refit_routes(app, worker, settings, state)
    _add_predict_route(app, worker, settings)
    _add_page(app, access)
    guarded = AccessGuard(app, access, bound_host, settings.max_request_bytes)
    guarded.state = app.state  # type: ignore[attr-defined]  (tests reach the worker through it)
    return guarded


def install_error_handlers(app) -> None:
    """Every error as a JSON body naming the problem, never internals."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, problem: RequestValidationError):
        details = [f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in problem.errors()]
        return error_response(422, "invalid request: " + "; ".join(details)[:2000])

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(_request: Request, problem: StarletteHTTPException):
        return error_response(problem.status_code, str(problem.detail))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, problem: Exception):
        error_id = uuid.uuid4().hex[:12]
        logger.error("internal error (error id %s)", error_id, exc_info=problem)
        return error_response(500, f"internal error (logged under error id {error_id})")

    @app.exception_handler(Problem)
    async def problem_handler(_request: Request, problem: Problem):
        return error_response(problem.status, problem.message, rejected=problem.rejected, **problem.extra)


def _describe(worker: ModelWorker) -> dict:
    """The served detector's description: its calibration's own source (a saved detector keeps the rule that chose
    its threshold), the generation and what it accepts."""
    detector = worker.detector
    return {**detector.describe(), "generation": worker.generation, "zero_shot": detector.zero_shot,
            "few_shot": detector.few_shot}  # fmt: skip


def _add_status_routes(app, worker: ModelWorker, settings: ServerSettings) -> None:
    """``/healthz`` and ``/v1/detector``."""

    @app.get("/healthz", summary="Health")
    async def healthz() -> dict:
        return {"status": "ok", "fitted": worker.detector.is_fitted, "queued_jobs": worker.jobs.qsize(),
                "batches": worker.batches, "generation": worker.generation}  # fmt: skip

    @app.get("/v1/detector", summary="The current detector and the server's limits")
    async def detector_info() -> dict:
        return {**_describe(worker), "limits": asdict(settings)}


def _add_refit_routes(app, worker: ModelWorker, settings: ServerSettings, state: dict) -> None:
    """``/v1/references`` (a refit, as a job) and ``/v1/jobs/{id}`` (follow or cancel it)."""
    from fastapi import File, Form, UploadFile
    from fastapi.responses import JSONResponse

    @app.post("/v1/references", summary="Refit the detector on normal reference images (a job)")
    async def references(
        files: Annotated[list[UploadFile], File(description="normal images")],
        threshold: Annotated[
            str | None, Form(description="auto (default: leave-one-out with >= 2), leave-one-out, a finite number "
                                         "or none")  # fmt: skip
        ] = None,
        class_name: Annotated[str | None, Form(description="the product's name, e.g. bottle")] = None,
        wait: Annotated[bool, Form(description="answer when the refit ends (up to the request timeout)")] = True,
    ):
        if not worker.detector.few_shot:
            raise Problem(400, f"method {worker.detector.method_name!r} is zero-shot and takes no reference images")
        options, name = form_threshold(threshold), parse_class_name(class_name)
        accepted, rejected = await read_uploads(files, settings)
        try:
            job = worker.start_refit([array for _, array, _ in accepted], options, name or state["class_name"])
        except RuntimeError as busy:
            raise Problem(409, str(busy)) from None
        if wait:
            await asyncio.to_thread(job.finished_event.wait, settings.request_timeout_s)
        body = {"job": job.public(), "references": len(accepted), "rejected": rejected}
        if job.status == "succeeded":
            if name:
                state["class_name"] = name
            return {**_describe(worker), **body}
        if job.status in ("failed", "cancelled"):
            status = 409 if job.status == "cancelled" else 500 if job.error.startswith("internal") else 422
            raise Problem(status, f"refit {job.status}: {job.error}", rejected, job=job.public())
        return JSONResponse(status_code=202, content=body, headers={"Location": f"/v1/jobs/{job.id}"})

    def find_job(job_id: str) -> RefitJob:
        if job_id not in worker.refits:
            raise Problem(404, f"no refit job {job_id[:40]!r} (jobs are kept for the last 20 refits)")
        return worker.refits[job_id]

    @app.get("/v1/jobs/{job_id}", summary="A refit job's status and progress")
    async def job_status(job_id: str) -> dict:
        return find_job(job_id).public()

    @app.delete("/v1/jobs/{job_id}", summary="Cancel a refit; the served detector stays as it was")
    async def cancel_job(job_id: str) -> dict:
        job = find_job(job_id)
        job.cancel.set()
        await asyncio.to_thread(job.finished_event.wait, 10.0)
        return job.public()


def _add_predict_route(app, worker: ModelWorker, settings: ServerSettings) -> None:
    """``/v1/predict``: score uploads, micro-batched by the model worker."""
    from fastapi import File, Form, UploadFile

    @app.post("/v1/predict", summary="Score images")
    async def predict(
        files: Annotated[list[UploadFile], File(description="images to score")],
        include_maps: Annotated[bool, Form(description="include the heatmap overlay PNG")] = True,
        include_raw_map: Annotated[bool, Form(description="include the raw 16-bit map PNG")] = False,
        heatmap_format: Annotated[
            str, Form(description="the overlay's encoding: jpeg (heatmap_jpeg, default) or png (heatmap_png)")
        ] = "jpeg",
    ) -> dict:
        started = time.perf_counter()
        if heatmap_format not in HEATMAP_FORMATS:
            raise Problem(422, f"heatmap_format={heatmap_format[:20]!r} is not one of {', '.join(HEATMAP_FORMATS)}")
        if not worker.detector.is_fitted:
            raise Problem(409, "the detector is not fitted: POST normal images to /v1/references first")
        accepted, rejected = await read_uploads(files, settings)
        results, timing, generation = await wait_for(worker.submit([array for _, array, _ in accepted]), settings)
        total_ms = (time.perf_counter() - started) * 1000
        scored = []
        for (name, array, index), result in zip(accepted, results):
            if isinstance(result, str):  # the error id of an image that failed to score
                rejected.append({"name": name, "index": index, "status": 500,
                                 "error": f"scoring failed (error id {result})"})  # fmt: skip
            else:
                scored.append((name, array, index, result))
        if not scored:
            raise Problem(500, "no image could be scored", rejected)
        detector = worker.detector
        scale, _ = detector.calibration.map_scale_for(zero_shot=detector.zero_shot)
        payloads = await asyncio.to_thread(
            lambda: [
                {"index": index, **result_payload(name, array, result, {**timing, "total_ms": total_ms},
                                                  include_maps, include_raw_map, scale, heatmap_format)}
                for name, array, index, result in scored
            ]
        )  # fmt: skip
        return {"results": payloads, "rejected": rejected, "method": detector.method_name, "generation": generation}


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>anomalens: API key</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head><body>
<main style="font-family: system-ui, sans-serif; max-width: 28rem; margin: 4rem auto">
<h1>anomalens</h1><p>This server needs its API key.</p>{message}
<form method="post" action="/login"><label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Open</button></form></main></body></html>"""


def _add_page(app, access: AccessSettings) -> None:
    """The inspection page at ``/``, its static files, and ``/login`` when an API key is set."""
    from fastapi.responses import FileResponse

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    add_login_and_static(app, access)


def add_login_and_static(app, access: AccessSettings) -> None:
    """``/login`` (the form that takes the API key, when one is set) and ``/static`` (the pages' files)."""
    from fastapi import Form
    from fastapi.responses import HTMLResponse, RedirectResponse
    from fastapi.staticfiles import StaticFiles

    @app.get("/login", include_in_schema=False)
    async def login_form() -> HTMLResponse:
        return HTMLResponse(LOGIN_PAGE.format(message=""))

    api_key = access.key

    @app.post("/login", include_in_schema=False)
    async def login(key: Annotated[str, Form(max_length=1024)]):
        if api_key is None:
            return RedirectResponse("/", status_code=303)
        if not key_matches(key, api_key):
            await asyncio.sleep(1.0)  # slows guessing
            return HTMLResponse(LOGIN_PAGE.format(message="<p role='alert'>Wrong key.</p>"), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_token(api_key), httponly=True, samesite="strict")
        return response

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


def _version() -> str:
    from anomalens import __version__

    return __version__
