"""``anomalens serve --models DIR``: one server for every product of a models directory, with a review page.

Endpoints (OpenAPI at ``/openapi.json``):

- ``GET /v1/detectors``: the products, their active versions, thresholds and whether they are loaded now.
- ``GET /v1/detectors/{name}``: one product's versions.
- ``POST /v1/detectors/{name}/predict``: score uploads (multipart ``files``) with the product's active version;
  every image is recorded in the history (the answer carries each inspection's ``id``).
- ``GET /v1/inspections``: the history, filtered (``product``, ``label``, ``reviewed``, ``verdict``, ``since``,
  ``limit``, ``offset``); ``GET /v1/inspections/{id}`` one inspection, ``.../image`` and ``.../overlay`` its
  stored files.
- ``POST /v1/inspections/{id}/review``: an inspector's verdict (``verdict`` normal / anomalous, ``reviewer``,
  ``note``).
- ``GET /v1/detectors/{name}/queue``: what to review next: the uncertain band (conformal p-values around the
  product's false-alarm rate) and the random audit sample.
- ``GET /v1/detectors/{name}/stats``: the score histogram with the threshold, and the false-alarm rate measured on
  the reviewed audit sample against the promised rate, with its 95% interval.
- ``GET /``: the review page (product picker, queue with keyboard review, inspections, statistics).

Access (API key, Host and Origin checks, body limits) is the single-detector server's
(:mod:`anomalens.engines.access`); every state change (scoring, reviews) needs the key when one is set.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations (File, Form, Request),
# which are imported inside the functions that declare the routes, at definition time.
import asyncio
import base64
import datetime as dt
import logging
import math
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from anomalens.engines.access import AccessGuard, AccessSettings
from anomalens.engines.serve import (
    STATUS_OF_KIND,
    WEB_DIR,
    Problem,
    ServerSettings,
    add_login_and_static,
    error_response,
    install_error_handlers,
    require_fastapi,
    safe_name,
)
from anomalens.io.images import ImageLoadError
from anomalens.station.history import VERDICTS
from anomalens.station.inspect import Station

logger = logging.getLogger(__name__)

MAX_LIST = 500  # inspections per page at most


def product_alpha(record: dict[str, Any], default: float) -> float:
    """The false-alarm rate a version promises: its conformal ``false_alarm_rate``, else the rate its
    leave-one-out threshold is equivalent to (``1 / (n + 1)``), else ``default``."""
    calibration = (record.get("calibration") or {}).get("threshold_calibration") or {}
    for key in ("false_alarm_rate", "equivalent_false_alarm_rate"):
        value = calibration.get(key)
        if isinstance(value, (int, float)) and 0 < value < 1:
            return float(value)
    return default


def create_station_app(station: Station, settings: ServerSettings | None = None, *,
                       access: AccessSettings | None = None, bound_host: str = "127.0.0.1",
                       default_alpha: float = 0.05, update_after: int | None = None):  # fmt: skip
    """The ASGI app of a station (see the module docstring), behind the access guard; with ``update_after``, a
    product takes its reviewed false alarms in as a new version after that many
    (:class:`~anomalens.station.feedback.UpdatePolicy`)."""
    require_fastapi()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    settings = settings or ServerSettings()
    access = access or AccessSettings()

    @asynccontextmanager
    async def lifespan(_app):
        yield
        station.pool.close()

    app = FastAPI(title="anomalens station", description="Many products, a history, a review queue.",
                  lifespan=lifespan)  # fmt: skip
    app.state.station = station
    install_error_handlers(app)
    _add_database_error_handler(app)
    _add_detector_routes(app, station, settings, default_alpha)
    _add_history_routes(app, station)
    policy = None
    if update_after is not None:
        from anomalens.station.feedback import UpdatePolicy

        policy = UpdatePolicy(update_after, station.pool.store, station.history, station.images, station.pool.device)
    app.state.update_policy = policy
    _add_review_routes(app, station, default_alpha, policy)
    _add_drift_route(app, station)
    _add_page(app, access)
    guarded = AccessGuard(app, access, bound_host, settings.max_request_bytes)
    guarded.state = app.state  # type: ignore[attr-defined]
    return guarded


def _add_database_error_handler(app) -> None:
    """A history that cannot be read or written is a 503 naming it (the client tries again), not a 500."""
    from fastapi import Request
    from sqlalchemy.exc import SQLAlchemyError

    @app.exception_handler(SQLAlchemyError)
    async def database_away(_request: Request, error: SQLAlchemyError):
        error_id = uuid.uuid4().hex[:12]
        logger.error("history database error (error id %s): %s", error_id, error)
        return error_response(503, f"the history database cannot be used now; try again (error id {error_id})")


def _product(station: Station, name: str):
    try:
        return station.pool.store.active(name)
    except ValueError as problem:
        raise Problem(404, str(problem)) from None


def _add_detector_routes(app, station: Station, settings: ServerSettings, default_alpha: float) -> None:
    from fastapi import File, Form, Request, UploadFile

    @app.get("/healthz", summary="Health")
    async def healthz() -> dict:
        return {"status": "ok", "products": station.pool.store.products(), "loaded": station.pool.loaded()}

    @app.get("/v1/detectors", summary="The products and their active versions")
    async def detectors() -> dict:
        loaded = set(station.pool.loaded())
        items = []
        for name in station.pool.store.products():
            try:
                version = station.pool.store.active(name)
            except ValueError:
                continue
            calibration = version.record.get("calibration") or {}
            items.append({"name": name, "version": version.number, "method": version.record.get("method"),
                          "threshold": calibration.get("threshold"),
                          "threshold_source": calibration.get("threshold_source"),
                          "alpha": product_alpha(version.record, default_alpha), "loaded": name in loaded,
                          "versions": len(station.pool.store.versions(name))})  # fmt: skip
        return {"detectors": items, "limits": asdict(settings)}

    @app.get("/v1/detectors/{name}", summary="One product's versions")
    async def detector(name: str) -> dict:
        _product(station, name)
        return station.pool.store.describe(name)

    @app.post("/v1/detectors/{name}/predict", summary="Score images with a product's active version (recorded)")
    async def predict(
        name: str,
        request: Request,
        files: Annotated[list[UploadFile], File(description="images to score")],
        include_maps: Annotated[bool, Form(description="include the heatmap overlay (JPEG, base64)")] = True,
        source: Annotated[str | None, Form(description="the client's name for the history (a station, a camera)")]
        = None,
    ) -> dict:
        _product(station, name)
        if not files:
            raise Problem(400, "no files: send one or more images in the multipart field 'files'")
        if len(files) > settings.max_files:
            raise Problem(413, f"{len(files)} files exceeds the limit of {settings.max_files} per request")
        client = (source or (request.client.host if request.client else "client"))[:100]
        results, rejected = [], []
        for index, upload in enumerate(files):
            item = await _inspect_upload(station, settings, name, upload, index, f"serve:{client}", include_maps)
            (results if "id" in item else rejected).append(item)
        if not results:
            first = rejected[0]
            raise Problem(first["status"], f"no image could be scored: {first['name']}: {first['error']}", rejected)
        return {"results": results, "rejected": rejected, "product": name}


async def _inspect_upload(station: Station, settings: ServerSettings, product: str, upload, index: int,
                          source: str, include_maps: bool) -> dict[str, Any]:  # fmt: skip
    """Inspect and record one upload; a rejected one is ``{"name", "index", "status", "error"}``."""
    from sqlalchemy.exc import SQLAlchemyError

    name = safe_name(upload.filename, index)
    data = await upload.read(settings.max_upload_bytes + 1)
    await upload.close()
    if len(data) > settings.max_upload_bytes:
        return {"name": name, "index": index, "status": 413,
                "error": f"{len(data)} bytes exceeds the limit of {settings.max_upload_bytes} bytes"}  # fmt: skip
    started = time.perf_counter()
    try:
        row = await asyncio.wait_for(asyncio.to_thread(station.inspect, product, data, name, source),
                                     timeout=settings.request_timeout_s)  # fmt: skip
    except ImageLoadError as problem:
        return {"name": name, "index": index, "status": STATUS_OF_KIND.get(problem.kind, 422), "error": problem.reason}
    except TimeoutError:
        raise Problem(504, f"the request took longer than {settings.request_timeout_s:g} s") from None
    except SQLAlchemyError as error:  # the verdict could not be recorded: say so, never answer as if it were
        error_id = uuid.uuid4().hex[:12]
        logger.error("history not written (error id %s): %s", error_id, error)
        raise Problem(503, f"the history database cannot be written, so {name} was not recorded; try again "
                           f"(error id {error_id})") from None  # fmt: skip
    except RuntimeError as problem:
        return {"name": name, "index": index, "status": 500, "error": str(problem)}
    item = {"index": index, "name": name, "id": row["id"], "score": row["score"], "label": row["label"],
            "threshold": row["threshold"], "p_value": row["p_value"], "regions": row["regions"],
            "version": row["version"], "audit": row["audit"], "store_error": row.get("store_error"),
            "timing": {"total_ms": round((time.perf_counter() - started) * 1000, 3)}}  # fmt: skip
    if include_maps and row.get("overlay_path"):
        item["heatmap_jpeg"] = base64.b64encode(station.images.path(row["overlay_path"]).read_bytes()).decode()
    return item


def _add_history_routes(app, station: Station) -> None:
    from fastapi.responses import FileResponse

    history = station.history

    @app.get("/v1/inspections", summary="The history, filtered")
    async def inspections(product: str | None = None, label: str | None = None, reviewed: bool | None = None,
                          verdict: str | None = None, since: str | None = None, limit: int = 100,
                          offset: int = 0) -> dict:  # fmt: skip
        if not 1 <= limit <= MAX_LIST or offset < 0:
            raise Problem(422, f"limit must be in [1, {MAX_LIST}] and offset >= 0")
        try:
            when = dt.datetime.fromisoformat(since) if since else None
            rows = await asyncio.to_thread(history.inspections, product=product, label=label, reviewed=reviewed,
                                           verdict=verdict, since=_aware(when), limit=limit, offset=offset)  # fmt: skip
        except ValueError as problem:
            raise Problem(422, str(problem)) from None
        return {"inspections": [_public(row) for row in rows]}

    @app.get("/v1/inspections/{inspection_id}", summary="One inspection")
    async def inspection(inspection_id: int) -> dict:
        return _public(await asyncio.to_thread(_row, history, inspection_id))

    @app.get("/v1/inspections/{inspection_id}/{kind}", summary="An inspection's stored image or overlay")
    async def stored(inspection_id: int, kind: str) -> FileResponse:
        if kind not in ("image", "overlay"):
            raise Problem(404, f"no {kind[:20]!r}: ask for image or overlay")
        row = await asyncio.to_thread(_row, history, inspection_id)
        relative = row.get(f"{kind}_path")
        if not relative or not station.images.path(relative).is_file():
            raise Problem(404, f"inspection {inspection_id}'s {kind} is not kept (retention, or not stored)")
        return FileResponse(station.images.path(relative))



def _add_review_routes(app, station: Station, default_alpha: float, policy=None) -> None:
    from fastapi import Form

    history = station.history

    @app.post("/v1/inspections/{inspection_id}/review", summary="An inspector's verdict")
    async def review(inspection_id: int, verdict: Annotated[str, Form(description="normal or anomalous")],
                     reviewer: Annotated[str, Form(max_length=100, description="who reviewed")],
                     note: Annotated[str | None, Form(max_length=2000)] = None) -> dict:  # fmt: skip
        if verdict not in VERDICTS:
            raise Problem(422, f"verdict {verdict[:20]!r} must be one of {', '.join(VERDICTS)}")
        try:
            row = await asyncio.to_thread(history.review, inspection_id, verdict, reviewer, note,
                                          station.settings.webhook)  # fmt: skip
        except ValueError as problem:
            raise Problem(404 if "no inspection" in str(problem) else 422, str(problem)) from None
        if policy is not None and verdict == "normal" and row["label"] == "anomalous":
            await asyncio.to_thread(policy.reviewed, row["product"])
        return _public(row)

    @app.get("/v1/detectors/{name}/queue", summary="What to review next")
    async def queue(name: str, alpha: float | None = None, band: float = 2.0, limit: int = 50) -> dict:
        version = _product(station, name)
        chosen = alpha if alpha is not None else product_alpha(version.record, default_alpha)
        if not (0 < chosen < 1 and band >= 1 and 1 <= limit <= MAX_LIST):
            raise Problem(422, f"alpha must be in (0, 1), band >= 1 and limit in [1, {MAX_LIST}]")
        rows = await asyncio.to_thread(history.queue, name, chosen, band=band, limit=limit)
        return {"alpha": chosen, "band": [chosen / band, chosen * band], "queue": [_public(row) for row in rows]}

    @app.get("/v1/detectors/{name}/stats", summary="Score histogram and the measured false-alarm rate")
    async def stats(name: str, bins: int = 30) -> dict:
        version = _product(station, name)
        if not 2 <= bins <= 200:
            raise Problem(422, "bins must be in [2, 200]")
        alpha = product_alpha(version.record, default_alpha)
        scores = await asyncio.to_thread(history.scores, name)
        alarms = await asyncio.to_thread(history.false_alarms, name, alpha, version.number)
        every = await asyncio.to_thread(history.false_alarms, name, alpha)
        threshold = (version.record.get("calibration") or {}).get("threshold")
        return {"product": name, "version": version.number, "count": len(scores), "threshold": threshold,
                "histogram": _histogram(scores, threshold, bins), "false_alarms": asdict(alarms),
                "false_alarms_all_versions": asdict(every)}  # fmt: skip


def _add_drift_route(app, station: Station) -> None:
    from anomalens.station.drift import version_delta

    @app.get("/v1/detectors/{name}/drift", summary="The drift test of the active version: its martingale and alarm")
    async def drift(name: str) -> dict:
        version = _product(station, name)
        return await asyncio.to_thread(station.drift.series, name, version.number, version_delta(version.record))


def _histogram(scores: list[float], threshold: float | None, bins: int) -> dict[str, list[float]]:
    if not scores:
        return {"edges": [], "counts": []}
    values = np.asarray(scores, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if threshold is not None and math.isfinite(threshold):
        low, high = min(low, threshold), max(high, threshold)
    counts, edges = np.histogram(values, bins=bins, range=(low, high if high > low else low + 1.0))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _row(history, inspection_id: int) -> dict[str, Any]:
    try:
        return history.inspection(inspection_id)
    except ValueError as problem:
        raise Problem(404, str(problem)) from None


def _aware(moment: dt.datetime | None) -> dt.datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=dt.timezone.utc)
    return moment


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """An inspection as the API shows it: times in ISO 8601, whether its files are kept, no store paths."""
    item = {key: value for key, value in row.items() if key not in ("image_path", "overlay_path")}
    for key in ("created_at", "reviewed_at"):
        if item.get(key) is not None:
            item[key] = item[key].isoformat()
    item["image_kept"], item["overlay_kept"] = bool(row.get("image_path")), bool(row.get("overlay_path"))
    return item


def _add_page(app, access: AccessSettings) -> None:
    from fastapi.responses import FileResponse

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(Path(WEB_DIR) / "station.html", media_type="text/html")

    add_login_and_static(app, access)


__all__ = ["create_station_app", "product_alpha"]
