"""Signed webhooks: each verdict and review is POSTed as JSON to the configured URLs, from the history's outbox.

An event is written to the outbox in the same transaction as the inspection or review it reports, so nothing is
lost while a receiver is down: :class:`Dispatcher` delivers due events, retrying with exponential back-off
(1 s, 2 s, 4 s, ... up to ``max_backoff_s``). Delivery is at least once; ``X-Anomalens-Delivery`` (the event's
id) lets a receiver drop a repeat.

Each request carries::

    X-Anomalens-Event: inspection | review
    X-Anomalens-Delivery: 17
    X-Anomalens-Timestamp: 1765000000
    X-Anomalens-Signature: sha256=HEX      HMAC-SHA256 of "TIMESTAMP.BODY" with the shared secret

The secret is ``$ANOMALENS_WEBHOOK_SECRET`` (never an option, so it is not in process lists or config files); a
receiver checks it with :func:`verify`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
import urllib.error
import urllib.request

from anomalens.station.history import History

logger = logging.getLogger(__name__)

SECRET_ENV = "ANOMALENS_WEBHOOK_SECRET"
SIGNATURE_HEADER = "X-Anomalens-Signature"
TIMESTAMP_HEADER = "X-Anomalens-Timestamp"


def webhook_secret() -> bytes:
    """The shared secret from ``$ANOMALENS_WEBHOOK_SECRET``.

    Raises:
        ValueError: Unset or shorter than 16 characters.
    """
    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < 16:
        raise ValueError(f"webhooks need a shared secret of at least 16 characters in {SECRET_ENV} "
                         f"(got {len(secret)} characters)")  # fmt: skip
    return secret.encode()


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=HEX``: the HMAC-SHA256 of ``TIMESTAMP.BODY``."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, tolerance_s: float = 300.0) -> bool:
    """What a receiver checks: the signature matches and the timestamp is recent (a replayed request is refused).

    Example:
        >>> secret = b"0123456789abcdef"
        >>> verify(secret, "100", b"{}", sign(secret, "100", b"{}"), tolerance_s=1e12)
        True
    """
    try:
        fresh = abs(time.time() - float(timestamp)) <= tolerance_s
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a receiver's redirect is a failed delivery, not a new target
        return None


class Dispatcher:
    """Delivers the outbox's due events (see the module docstring).

    Args:
        history: The history holding the outbox.
        secret: The shared secret (:func:`webhook_secret`).
        owner: This dispatcher's name (events are leased to it while it sends them).
        timeout_s: Seconds to wait for a receiver.
        max_backoff_s: The longest wait between attempts.
    """

    def __init__(self, history: History, secret: bytes, owner: str, *, timeout_s: float = 10.0,
                 max_backoff_s: float = 300.0):  # fmt: skip
        self.history = history
        self.secret = secret
        self.owner = owner
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self._opener = urllib.request.build_opener(_NoRedirects)

    def deliver_due(self) -> int:
        """Send every due event once; returns how many were delivered."""
        delivered = 0
        for event in self.history.due_events(self.owner, lease_s=self.timeout_s * 2 + 5):
            error = self._send(event)
            if error is None:
                self.history.delivered(event["id"])
                delivered += 1
            else:
                retry = min(self.max_backoff_s, 2.0 ** event["attempts"])
                self.history.delivery_failed(event["id"], error, retry)
                logger.warning("webhook %s event %d failed (%s); next attempt in %.0f s", event["url"], event["id"],
                               error, retry)  # fmt: skip
        return delivered

    def _send(self, event: dict) -> str | None:
        body = event["payload"].encode()
        timestamp = str(int(time.time()))
        request = urllib.request.Request(event["url"], data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "anomalens-webhooks",
            "X-Anomalens-Event": event["event"], "X-Anomalens-Delivery": str(event["id"]),
            TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(self.secret, timestamp, body)})  # fmt: skip
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            error.close()
            return f"HTTP {error.code}"
        except (OSError, ValueError) as error:  # refused, unreachable, timed out, a malformed URL
            return f"{type(error).__name__}: {getattr(error, 'reason', error)}"

    def run(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Deliver due events until ``stop`` is set (a database error is logged and retried, never fatal)."""
        while not stop.is_set():
            try:
                self.deliver_due()
            except Exception as error:  # noqa: BLE001 - the database may be away for a while: keep trying
                logger.error("webhook dispatcher: %s", error)
            stop.wait(interval_s)
