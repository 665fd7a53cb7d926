"""Who may talk to ``anomalens serve``, and how much they may send: an ASGI middleware in front of the app.

Every request passes four checks, in this order (``docs/security.md`` states the threat model):

1. **Host** (DNS rebinding): the ``Host`` header must name this server, a loopback name or an ``allowed_hosts``
   entry. A server bound to a wildcard address (``0.0.0.0``) without ``allowed_hosts`` accepts any Host; it needs
   an API key anyway.
2. **Origin** (cross-site requests): a request carrying ``Origin`` must come from the page's own origin or an
   ``allowed_origins`` entry; ``Origin: null`` and ``Sec-Fetch-Site: cross-site`` are refused.
3. **API key**: when a key is set, every endpoint (the page, its files, the docs and ``/healthz`` included)
   needs it, as ``X-API-Key: KEY``, ``Authorization: Bearer KEY``, or the page's session cookie, which
   ``POST /login`` sets (``HttpOnly``, ``SameSite=Strict``) after checking the key. Keys are compared in
   constant time. Only ``/login`` itself is open.
4. **Body size**: the bytes actually received are counted, so a chunked upload without ``Content-Length``
   is cut off at ``max_request_bytes`` with a 413, before it is buffered or written to disk.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from dataclasses import dataclass
from typing import Any

from anomalens.checks import check_options

API_KEY_ENV = "ANOMALENS_API_KEY"
SESSION_COOKIE = "anomalens_session"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = ("/login",)  # reachable without the key: the form that asks for it


@dataclass
class AccessSettings:
    """Who may use the server."""

    api_key: str | None = None  # key every request must carry (default: $ANOMALENS_API_KEY); required off loopback
    allowed_hosts: tuple[str, ...] = ()  # extra Host names this server answers to (e.g. inspect.example.com)
    allowed_origins: tuple[str, ...] = ()  # extra origins whose pages may call the API (e.g. https://app.example.com)

    def __post_init__(self) -> None:
        if self.key is not None and len(self.key) < 16:  # not check_options: it would print the secret
            raise ValueError(f"serve option api_key (or ${API_KEY_ENV}) must be at least 16 characters long, got "
                             f"{len(self.key)}")  # fmt: skip
        check_options("serve", self, {"allowed_origins": (
            all(origin != "*" and "://" in origin for origin in self.allowed_origins),
            "full origins such as https://app.example.com")})  # fmt: skip

    @property
    def key(self) -> str | None:
        """The key in force: ``api_key``, else ``$ANOMALENS_API_KEY`` (read here, so it is never printed with the
        options or stored in a config file)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, access: AccessSettings) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if not is_loopback(host) and not access.key:
        raise ValueError(
            f"serving on {host} makes the server reachable from other machines: set an API key with --api-key KEY "
            f"or the {API_KEY_ENV} environment variable (clients send it as X-API-Key), or bind to 127.0.0.1"
        )


def session_token(api_key: str) -> str:
    """The page's cookie value: derived from the key, so the cookie never holds the key itself."""
    return hmac.new(api_key.encode(), b"anomalens page session", hashlib.sha256).hexdigest()


def key_matches(given: str | None, api_key: str) -> bool:
    """Constant-time comparison of a presented key."""
    return given is not None and hmac.compare_digest(given.encode(), api_key.encode())


def _host_name(value: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class AccessGuard:
    """ASGI middleware enforcing :class:`AccessSettings` and the request body limit on the bytes received.

    Args:
        app: The wrapped ASGI app.
        access: Key, hosts and origins.
        bound_host: The address the server listens on (decides which Host names are accepted).
        max_request_bytes: Largest request body, counted as it streams in.
    """

    def __init__(self, app: Any, access: AccessSettings, bound_host: str, max_request_bytes: int):
        self.app = app
        self.access = access
        self.max_request_bytes = max_request_bytes
        self.hosts: set[str] | None = {*LOOPBACK_NAMES, *(h.lower() for h in access.allowed_hosts)}
        wildcard = bound_host in ("0.0.0.0", "::", "")
        if wildcard and not access.allowed_hosts:
            self.hosts = None  # any Host: the key protects it
        elif not wildcard:
            self.hosts.add(_host_name(bound_host))
        self.key = access.key
        self.token = session_token(self.key) if self.key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            if refusal[0] == 401 and scope["path"] == "/" and scope["method"] == "GET":  # a person: ask for the key
                await send({"type": "http.response.start", "status": 303, "headers": [(b"location", b"/login")]})
                return await send({"type": "http.response.body", "body": b""})
            return await _send_json(send, *refusal)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_request_bytes:
            return await _send_json(send, 413, self._too_large())
        received = 0
        over = replied = False

        async def counted_receive():
            nonlocal received, over
            if over:  # the app keeps reading: tell it the body has ended
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    over = True  # stop reading here; whatever the app answers becomes a 413
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message):
            nonlocal replied
            if not over:
                return await send(message)
            if not replied:
                replied = True
                await _send_json(send, 413, self._too_large())

        await self.app(scope, counted_receive, guarded_send)
        if over and not replied:
            await _send_json(send, 413, self._too_large())

    def _too_large(self) -> str:
        return f"request body exceeds the limit of {self.max_request_bytes} bytes"

    def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        """``(status, message)`` for a request that must not reach the app, else ``None``."""
        host = _host_name(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            return 421, f"this server does not answer to host {host!r}; start it with --allowed-hosts {host}"
        origin = headers.get("origin")
        if origin is not None:
            own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()
            if origin.lower() != own and origin not in self.access.allowed_origins:
                return 403, f"cross-origin request from {origin!r} refused"
        elif headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross-site request refused"
        if self.key is None or scope["path"] in OPEN_PATHS:
            return None
        bearer = headers.get("authorization", "")
        presented = headers.get("x-api-key") or (bearer[7:] if bearer.lower().startswith("bearer ") else None)
        if key_matches(presented, self.key):
            return None
        if key_matches(_cookie(headers.get("cookie", ""), SESSION_COOKIE), self.token or ""):
            return None
        return 401, "an API key is required: send it as X-API-Key (the page asks for it at /login)"


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="anomalens"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
