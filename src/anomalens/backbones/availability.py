"""Ask each default weight source whether it still exists, without downloading it (``anomalens weights check``).

One request per source, all at once:

- a hub repo (``kind="hub"``, or an open_clip tag kept on the hub): the hub's model API at the pinned revision
  (``GET {HF_ENDPOINT}/api/models/REPO/revision/REV``), whose file list must hold every file the code reads;
- a single file, an open_clip release file or a PyPI package: ``HEAD`` on its address (through
  ``$ANOMALENS_URL_MIRROR`` when set), falling back to a one-byte ranged ``GET`` where a server refuses ``HEAD``.

Each answer becomes one :class:`SourceStatus`:

- ``OK``: the source answers as pinned (temporary redirects, as to a CDN, are followed);
- ``MOVED``: the hub renamed the repo (it redirects the API to another id), or a server answers the address with a
  permanent redirect (301 / 308); the new location is in ``detail``, and downloads still work through it;
- ``MISSING``: the host says the repo, revision or file is not there (401 / 403 / 404 / 410; the hub answers 401 for
  a deleted repo), or the repo lacks a file the code reads;
- ``ERROR``: no answer that says either (timeout, refused connection, a server error).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from anomalens.backbones.sources import SOURCES, WeightSource, hub_endpoint, mirrored

STATUSES = ("OK", "MOVED", "MISSING", "ERROR")
_GONE = (401, 403, 404, 410)
_PERMANENT = (301, 308)
_REDIRECTS = (301, 302, 303, 307, 308)
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's hub file names


@dataclass(frozen=True)
class SourceStatus:
    """What one source's host answered."""

    source: WeightSource
    status: str  # one of STATUSES
    detail: str  # the HTTP status and what the host said, the new location, or the missing files


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # every redirect is looked at by _fetch
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _request(url: str, method: str, headers: dict[str, str], timeout: float) -> tuple[int, dict, bytes]:
    """``(status, headers, body)`` of one request that follows no redirect; the body only for ``GET`` of JSON."""
    request = urllib.request.Request(url, method=method, headers={"User-Agent": "anomalens-weights-check", **headers})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            wanted = method == "GET" and "json" in response.headers.get("Content-Type", "")
            return response.status, dict(response.headers), response.read(1 << 22) if wanted else b""
    except urllib.error.HTTPError as error:  # 3xx (not followed), 4xx and 5xx
        error.close()
        return error.code, dict(error.headers or {}), b""


def _said(code: int, headers: dict) -> str:
    """``"CODE: what the host said"`` (the hub's X-Error-Message / X-Error-Code headers when it sends them)."""
    lowered = {key.lower(): value for key, value in headers.items()}
    message = lowered.get("x-error-message") or lowered.get("x-error-code") or ""
    return f"{code}: {message}" if message else str(code)


def _auth_headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN")
    if token is None:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency
            token = None
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check_url(source: WeightSource, timeout: float) -> SourceStatus:
    """Follow ``source.url`` (mirrored) hop by hop with ``HEAD``; a permanent redirect on the way is a move."""
    url, moved_to = mirrored(source.url), None
    for _ in range(8):
        code, headers, _ = _request(url, "HEAD", {}, timeout)
        if code in (403, 405, 501):  # some servers (signed CDN addresses among them) refuse HEAD: ask for one byte
            code, headers, _ = _request(url, "GET", {"Range": "bytes=0-0"}, timeout)
        if code in _REDIRECTS and headers.get("Location"):
            url = urllib.parse.urljoin(url, headers["Location"])
            if code in _PERMANENT and moved_to is None:
                moved_to = url
            continue
        if code in (200, 206):
            return SourceStatus(source, "MOVED", f"now at {moved_to}") if moved_to else SourceStatus(source, "OK", "")
        if code in _GONE:
            return SourceStatus(source, "MISSING", _said(code, headers) + (f" at {url}" if url != source.url else ""))
        return SourceStatus(source, "ERROR", _said(code, headers))
    return SourceStatus(source, "ERROR", "more than 8 redirects")


def _repo_of(api_path: str) -> str | None:
    """The repo id in a hub API path ``/api/models/ORG/NAME/revision/...``."""
    parts = urllib.parse.urlsplit(api_path).path.split("/")
    return "/".join(parts[3:5]) if len(parts) >= 5 and parts[1:3] == ["api", "models"] else None


def _check_hub(source: WeightSource, timeout: float) -> SourceStatus:
    """The hub's model API at the pinned revision: the repo (or its new name) and every file the code reads."""
    revision = source.revision or "main"
    url = f"{hub_endpoint()}/api/models/{source.repo}/revision/{urllib.parse.quote(revision, safe='')}"
    code, headers, body = _request(url, "GET", {"Accept": "application/json", **_auth_headers()}, timeout)
    moved_to = None
    if code in _REDIRECTS and headers.get("Location"):  # the hub redirects a renamed repo's API to its new name
        target = urllib.parse.urljoin(url, headers["Location"])
        moved_to = _repo_of(target)
        code, headers, body = _request(target, "GET", {"Accept": "application/json", **_auth_headers()}, timeout)
    if code in _GONE:
        return SourceStatus(source, "MISSING", _said(code, headers))
    if code != 200:
        return SourceStatus(source, "ERROR", _said(code, headers))
    try:
        listed = {entry["rfilename"] for entry in json.loads(body).get("siblings", [])}
    except (ValueError, KeyError, TypeError, AttributeError):
        return SourceStatus(source, "ERROR", f"{source.repo}@{revision}: the hub's answer is not its model JSON")
    if source.kind == "open_clip":
        lacking = [] if listed & set(_OPEN_CLIP_FILES) else [" or ".join(_OPEN_CLIP_FILES)]
    else:
        lacking = [name for name in source.files if name not in listed]
    if lacking:
        return SourceStatus(source, "MISSING", f"{source.repo}@{revision} lacks {', '.join(lacking)}")
    if moved_to and moved_to != source.repo:
        return SourceStatus(source, "MOVED", f"the hub now names {source.repo} {moved_to}")
    return SourceStatus(source, "OK", "")


def check_source(source: WeightSource, *, timeout: float = 10.0) -> SourceStatus:
    """Ask ``source``'s host whether it still serves it (metadata only, nothing downloaded)."""
    try:
        return _check_hub(source, timeout) if source.repo else _check_url(source, timeout)
    except (OSError, ValueError) as error:  # URLError, timeouts, refused connections, malformed answers
        reason = getattr(error, "reason", None) or error
        return SourceStatus(source, "ERROR", f"{type(error).__name__}: {reason}")


def check_sources(sources: Iterable[WeightSource] | None = None, *, timeout: float = 10.0) -> list[SourceStatus]:
    """:func:`check_source` for each of ``sources`` (default: every entry of the table), concurrently, in order.

    Example:
        >>> from anomalens.backbones.availability import check_sources
        >>> missing = [row for row in check_sources() if row.status == "MISSING"]  # doctest: +SKIP
    """
    chosen = list(SOURCES.values() if sources is None else sources)
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(chosen)))) as pool:
        return list(pool.map(lambda source: check_source(source, timeout=timeout), chosen))
