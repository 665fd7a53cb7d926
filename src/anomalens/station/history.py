"""The station's history: every inspection, review and webhook event in a real database (SQLAlchemy).

SQLite (in WAL mode, beside the models directory) is the embedded default; PostgreSQL is a URL away
(``--db postgresql+psycopg://user@host/db``). The schema is managed by Alembic (:mod:`anomalens.station.migrations`):
opening a history upgrades it to the newest schema, under a lock, so several processes may start at once.

Tables:

- ``inspections``: one row per scored image: time, product, detector version and fingerprint, source, the image's
  SHA-256 and where its bytes and overlay are kept (:mod:`anomalens.station.store`), score, label, threshold,
  conformal p-value, defect regions, whether it was drawn for the random audit, and its review (verdict, reviewer,
  time, note).
- ``review_events``: every review given, in order (a later one replaces the verdict, this keeps the trail).
- ``file_claims``: a hot folder's files by product and content hash, so each is scored exactly once.
- ``webhook_outbox``: events to deliver, written in the same transaction as the inspection or review they report.

The false-alarm rate a line measures is estimated from the audit sample only: inspections drawn at random when they
were recorded, whatever their score, then reviewed. The review queue also holds the uncertain band (p-values near
the promised rate), which is chosen by score and would bias the estimate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

INSTALL_HINT = "the station's history needs SQLAlchemy and Alembic: pip install 'anomalens[station]'"
VERDICTS = ("normal", "anomalous")
LABELS = ("normal", "anomalous")
HISTORY_FILE = "history.db"


def _sqlalchemy():
    try:
        import alembic  # noqa: F401
        import sqlalchemy
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return sqlalchemy


def database_url(url: str) -> str:
    """A history URL as SQLAlchemy takes it: ``sqlite:///PATH`` as given; ``postgresql://`` and ``postgres://``
    through psycopg 3 (``postgresql+psycopg://``), the driver the ``station`` extra installs.

    Raises:
        ValueError: Another kind of database (the message names the two supported).
        ImportError: PostgreSQL without psycopg installed (the message gives the install command).
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in ("sqlite", "postgresql", "postgres", "postgresql+psycopg"):
        shown = url.split("@")[-1] if "@" in url else url
        raise ValueError(f"history database URL {shown!r} must be sqlite:///PATH or postgresql://USER@HOST/DB")
    if scheme == "sqlite":
        return url
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ImportError("a PostgreSQL history needs psycopg 3: pip install 'anomalens[station]'") from None
    return f"postgresql+psycopg://{rest}"


def now() -> dt.datetime:
    """The current time, UTC, as the history stores it."""
    return dt.datetime.now(dt.timezone.utc)


def _tables(sa):
    """The schema as SQLAlchemy Core tables (the migrations create exactly these)."""
    metadata = sa.MetaData()
    inspections = sa.Table(
        "inspections", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("product", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer), sa.Column("fingerprint", sa.String(32)), sa.Column("method", sa.String(64)),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False), sa.Column("image_name", sa.String(255)),
        sa.Column("image_path", sa.String(512)), sa.Column("overlay_path", sa.String(512)),
        sa.Column("store_error", sa.Text),
        sa.Column("width", sa.Integer), sa.Column("height", sa.Integer),
        sa.Column("score", sa.Float, nullable=False), sa.Column("threshold", sa.Float),
        sa.Column("label", sa.String(16)), sa.Column("p_value", sa.Float), sa.Column("pixel_threshold", sa.Float),
        sa.Column("regions", sa.Text),
        sa.Column("audit", sa.Boolean, nullable=False, default=False),
        sa.Column("review_verdict", sa.String(16)), sa.Column("reviewer", sa.String(100)),
        sa.Column("reviewed_at", sa.DateTime(timezone=True)), sa.Column("review_note", sa.Text),
        sa.Index("ix_inspections_product_created", "product", "created_at"),
        sa.Index("ix_inspections_sha256", "image_sha256"),
    )  # fmt: skip
    review_events = sa.Table(
        "review_events", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", sa.Integer, sa.ForeignKey("inspections.id"), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False), sa.Column("reviewer", sa.String(100), nullable=False),
        sa.Column("note", sa.Text), sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )  # fmt: skip
    file_claims = sa.Table(
        "file_claims", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("product", sa.String(64), nullable=False), sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("inspection_id", sa.Integer, sa.ForeignKey("inspections.id")), sa.Column("reason", sa.Text),
        sa.UniqueConstraint("product", "sha256", name="uq_file_claims_product_sha256"),
    )  # fmt: skip
    outbox = sa.Table(
        "webhook_outbox", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("url", sa.String(1024), nullable=False), sa.Column("event", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True)), sa.Column("locked_by", sa.String(200)),
        sa.Column("delivered_at", sa.DateTime(timezone=True)), sa.Column("last_error", sa.Text),
        sa.Index("ix_outbox_due", "delivered_at", "next_attempt_at"),
    )  # fmt: skip
    drift_alarms = sa.Table(
        "drift_alarms", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("product", sa.String(64), nullable=False), sa.Column("version", sa.Integer, nullable=False),
        sa.Column("stream", sa.String(16), nullable=False),
        sa.Column("inspection_id", sa.Integer, sa.ForeignKey("inspections.id"), nullable=False),
        sa.Column("observations", sa.Integer, nullable=False), sa.Column("martingale", sa.Float, nullable=False),
        sa.Column("delta", sa.Float, nullable=False),
        sa.UniqueConstraint("product", "version", "stream", name="uq_drift_alarms_product_version_stream"),
    )  # fmt: skip
    return metadata, inspections, review_events, file_claims, outbox, drift_alarms


@dataclass(frozen=True)
class FalseAlarms:
    """The false-alarm rate measured on reviewed audit-sample inspections, against the promised rate."""

    flagged: int  # audited inspections confirmed normal that the detector flagged
    normal: int  # audited inspections confirmed normal
    rate: float | None  # flagged / normal
    low: float | None  # Clopper-Pearson 95% interval
    high: float | None
    alpha: float | None  # the promised rate (the detector's, when it was conformal)


class History:
    """One history database (see the module docstring).

    Args:
        url: A SQLAlchemy URL: ``sqlite:///path/history.db`` or ``postgresql+psycopg://user@host:port/db``.
        upgrade: Bring the schema to the newest version on opening (the default).

    Example:
        >>> history = History(History.default_url("models/"))  # doctest: +SKIP
        >>> history.inspections(product="bottle", label="anomalous", limit=10)  # doctest: +SKIP
    """

    def __init__(self, url: str, *, upgrade: bool = True, wait_s: float | None = 0.0):
        sa = _sqlalchemy()
        self.url = database_url(str(url))
        self.sa = sa
        self.sqlite = self.url.startswith("sqlite")
        self.engine = sa.create_engine(self.url, pool_pre_ping=True, **({"connect_args": {"timeout": 60}}
                                                                       if self.sqlite else {}))  # fmt: skip
        if self.sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        (self.metadata, self.inspections_table, self.reviews_table, self.claims_table, self.outbox_table,
         self.drift_table) = _tables(sa)  # fmt: skip
        if upgrade:
            self._upgrade_when_reachable(wait_s)

    @property
    def where(self) -> str:
        """The database, for messages: the URL without user and password."""
        return self.url.split("@")[-1] if "@" in self.url else self.url

    def _upgrade_when_reachable(self, wait_s: float | None) -> None:
        """:meth:`upgrade`; a database server that cannot be reached is tried again (1 s, 2 s, 4 s ... 30 s apart)
        for up to ``wait_s`` seconds (``None``: until it answers; the long-running ``serve`` and ``watch`` wait, so
        a line that boots before its database still starts). An SQLite file is never waited for.

        Raises:
            HistoryUnavailable: Still unreachable when the wait is over (one line, no credentials).
        """
        deadline = None if wait_s is None else time.monotonic() + wait_s
        delay = 1.0
        while True:
            try:
                self.upgrade()
                return
            except self.sa.exc.OperationalError as error:
                reason = str(error.orig if error.orig is not None else error).strip().splitlines()[0]
                if self.sqlite or (deadline is not None and time.monotonic() + delay > deadline):
                    raise HistoryUnavailable(f"history database {self.where} cannot be reached: {reason}") from None
                logger.error("history database %s cannot be reached (%s); trying again in %.0f s", self.where,
                             reason, delay)  # fmt: skip
                time.sleep(delay)
                delay = min(30.0, delay * 2)

    @staticmethod
    def default_url(models: str | os.PathLike) -> str:
        """The embedded default: ``sqlite:///MODELS/history.db``."""
        return f"sqlite:///{Path(models).resolve() / HISTORY_FILE}"

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ schema
    def upgrade(self) -> None:
        """Bring the schema to the newest migration (Alembic), holding a lock so concurrent starts take turns."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).resolve().parent / "migrations"))
        with self._schema_lock(), self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def schema_version(self) -> str | None:
        """The Alembic revision the database is at."""
        sa = self.sa
        with self.engine.connect() as connection:
            if not sa.inspect(connection).has_table("alembic_version"):
                return None
            return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    @contextlib.contextmanager
    def _schema_lock(self) -> Iterator[None]:
        if self.sqlite:
            database = self.engine.url.database
            path = Path(database).with_suffix(".lock") if database and database != ":memory:" else None
            if path is None:
                yield
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        with self.engine.connect() as connection:  # PostgreSQL: a session-level advisory lock
            connection.execute(self.sa.text("SELECT pg_advisory_lock(4242001)"))
            try:
                yield
            finally:
                connection.execute(self.sa.text("SELECT pg_advisory_unlock(4242001)"))
                connection.commit()

    # ------------------------------------------------------------------ recording
    def record(self, inspection: dict[str, Any], *, claim: tuple[str, str, str] | None = None,
               webhooks: Sequence[str] = ()) -> int:  # fmt: skip
        """Write one inspection, in one transaction with the ``claim`` it completes (a watched file's ``(product,
        sha256, owner)``) and one outbox event per webhook URL, so a crash records all of it or none. Returns its id.

        Raises:
            ClaimLost: The claim is no longer this owner's (another watcher completed it): nothing is written.
        """
        sa = self.sa
        row = {"created_at": now(), "audit": False, **inspection}
        if isinstance(row.get("regions"), (list, dict)):
            row["regions"] = json.dumps(row["regions"])
        claims = self.claims_table
        with self.engine.begin() as connection:
            if claim is not None:
                product, sha256, owner = claim
                mine = connection.execute(sa.update(claims).where(
                    claims.c.product == product, claims.c.sha256 == sha256, claims.c.owner == owner,
                    claims.c.status == "claimed").values(status="done"))  # fmt: skip
                if mine.rowcount != 1:
                    raise ClaimLost(f"{product}/{sha256[:12]}: the claim is no longer {owner}'s")
            inspection_id = connection.execute(sa.insert(self.inspections_table).values(**row)).inserted_primary_key[0]
            if claim is not None:
                connection.execute(sa.update(claims).where(claims.c.product == claim[0], claims.c.sha256 == claim[1])
                                   .values(inspection_id=inspection_id))  # fmt: skip
            payload = {"event": "inspection", "id": inspection_id, **_public(row)}
            self._enqueue(connection, webhooks, "inspection", payload)
        return int(inspection_id)

    def _enqueue(self, connection, urls: Sequence[str], event: str, payload: dict[str, Any]) -> None:
        text = json.dumps(payload, default=_json_default)
        for url in urls:
            connection.execute(self.sa.insert(self.outbox_table).values(
                created_at=now(), url=url, event=event, payload=text, attempts=0, next_attempt_at=now()))  # fmt: skip

    # ------------------------------------------------------------------ exactly once (hot folders)
    def claim(self, product: str, sha256: str, owner: str, lease_s: float = 600.0) -> str:
        """Claim a watched file by content before scoring it: ``"new"`` (yours to score), ``"done"`` (scored
        before: do not score again), ``"failed"`` (refused before) or ``"busy"`` (another live watcher holds it).

        A claim that was never completed (its watcher died before recording) is taken over at once when its owner
        was a process of this host that is gone, else after ``lease_s``. ``owner`` is ``HOST:PID:...``.
        """
        sa, table = self.sa, self.claims_table
        with self.engine.begin() as connection:
            mine = sa.select(table).where(table.c.product == product, table.c.sha256 == sha256)
            existing = connection.execute(mine).mappings().first()
            if existing is None:
                try:
                    with connection.begin_nested():
                        connection.execute(sa.insert(table).values(product=product, sha256=sha256, owner=owner,
                                                                   claimed_at=now(), status="claimed"))  # fmt: skip
                    return "new"
                except sa.exc.IntegrityError:  # claimed by another watcher between our read and our insert
                    return "busy"
            if existing["status"] in ("done", "failed"):
                return str(existing["status"])
            stale = _aware(existing["claimed_at"]) < now() - dt.timedelta(seconds=lease_s) or _dead(existing["owner"])
            if existing["owner"] == owner or stale:
                taken = connection.execute(sa.update(table).where(
                    table.c.id == existing["id"], table.c.status == "claimed",
                    table.c.claimed_at == existing["claimed_at"]).values(owner=owner, claimed_at=now()))  # fmt: skip
                return "new" if taken.rowcount == 1 else "busy"
            return "busy"

    def fail_claim(self, product: str, sha256: str, reason: str) -> None:
        """Mark a claimed file refused (unreadable, unscorable), with the reason."""
        sa, table = self.sa, self.claims_table
        with self.engine.begin() as connection:
            connection.execute(sa.update(table).where(table.c.product == product, table.c.sha256 == sha256).values(
                status="failed", reason=reason[:2000]))  # fmt: skip

    def claims(self, product: str | None = None) -> list[dict[str, Any]]:
        """Every file claim (for reconciling a folder against the history)."""
        return self._every_row(self.claims_table, product, dict)

    def _every_row(self, table, product: str | None, convert) -> list[dict[str, Any]]:
        """Every row of ``table`` (of one product), in id order, each through ``convert``."""
        query = self.sa.select(table).order_by(table.c.id)
        if product is not None:
            query = query.where(table.c.product == product)
        with self.engine.connect() as connection:
            return [convert(row) for row in connection.execute(query).mappings()]

    # ------------------------------------------------------------------ reading
    def inspections(self, *, product: str | None = None, since: dt.datetime | None = None,
                    until: dt.datetime | None = None, label: str | None = None, reviewed: bool | None = None,
                    verdict: str | None = None, limit: int | None = 200, offset: int = 0,
                    newest_first: bool = True) -> list[dict[str, Any]]:  # fmt: skip
        """Inspections filtered by product, time, label, review state and verdict."""
        sa, table = self.sa, self.inspections_table
        query = sa.select(table)
        if product is not None:
            query = query.where(table.c.product == product)
        if since is not None:
            query = query.where(table.c.created_at >= since)
        if until is not None:
            query = query.where(table.c.created_at < until)
        if label is not None:
            query = query.where(table.c.label == _checked(label, LABELS, "label"))
        if reviewed is not None:
            query = query.where(table.c.review_verdict.isnot(None) if reviewed else table.c.review_verdict.is_(None))
        if verdict is not None:
            query = query.where(table.c.review_verdict == _checked(verdict, VERDICTS, "verdict"))
        order = table.c.id.desc() if newest_first else table.c.id.asc()
        query = query.order_by(order).offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as connection:
            return [_row(row) for row in connection.execute(query).mappings()]

    def inspection(self, inspection_id: int) -> dict[str, Any]:
        """One inspection (a ``ValueError`` naming the id if there is none)."""
        sa, table = self.sa, self.inspections_table
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(table).where(table.c.id == inspection_id)).mappings().first()
        if row is None:
            raise ValueError(f"no inspection {inspection_id!r}")
        return _row(row)

    def count(self, product: str | None = None) -> int:
        sa, table = self.sa, self.inspections_table
        query = sa.select(sa.func.count()).select_from(table)
        if product is not None:
            query = query.where(table.c.product == product)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar())

    def products(self) -> list[str]:
        """Products that have inspections."""
        sa, table = self.sa, self.inspections_table
        with self.engine.connect() as connection:
            return sorted(row[0] for row in connection.execute(sa.select(table.c.product).distinct()))

    # ------------------------------------------------------------------ reviews
    def review(self, inspection_id: int, verdict: str, reviewer: str, note: str | None = None,
               webhooks: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
        """An inspector's verdict on an inspection (replacing an earlier one; every verdict stays in
        ``review_events``), with a webhook event per URL in the same transaction. Returns the updated row.

        Raises:
            ValueError: An unknown inspection, a verdict that is not normal / anomalous, an empty reviewer.
        """
        sa = self.sa
        _checked(verdict, VERDICTS, "verdict")
        if not isinstance(reviewer, str) or not reviewer.strip() or len(reviewer) > 100:
            raise ValueError("reviewer must name the inspector: 1-100 characters")
        if note is not None and len(note) > 2000:
            raise ValueError(f"review note of {len(note)} characters exceeds the limit of 2000")
        table = self.inspections_table
        when = now()
        with self.engine.begin() as connection:
            updated = connection.execute(sa.update(table).where(table.c.id == inspection_id).values(
                review_verdict=verdict, reviewer=reviewer.strip(), reviewed_at=when, review_note=note))  # fmt: skip
            if updated.rowcount != 1:
                raise ValueError(f"no inspection {inspection_id!r}")
            connection.execute(sa.insert(self.reviews_table).values(
                inspection_id=inspection_id, verdict=verdict, reviewer=reviewer.strip(), note=note, created_at=when))
            row = connection.execute(sa.select(table).where(table.c.id == inspection_id)).mappings().first()
            self._enqueue(connection, webhooks, "review", {"event": "review", "id": inspection_id,
                                                           **_public(dict(row))})  # fmt: skip
        return _row(row)

    def review_events(self, inspection_id: int) -> list[dict[str, Any]]:
        sa, table = self.sa, self.reviews_table
        with self.engine.connect() as connection:
            query = sa.select(table).where(table.c.inspection_id == inspection_id).order_by(table.c.id)
            return [dict(row) for row in connection.execute(query).mappings()]

    def queue(self, product: str, alpha: float, *, band: float = 2.0, limit: int = 50) -> list[dict[str, Any]]:
        """Unreviewed inspections of ``product`` an inspector should look at, oldest first: the uncertain band
        (conformal p-value in ``[alpha / band, alpha * band]``) and the random audit sample.

        Raises:
            ValueError: ``alpha`` outside (0, 1) or ``band`` below 1.
        """
        if not 0 < alpha < 1:
            raise ValueError(f"queue alpha={alpha!r} must be in (0, 1)")
        if not band >= 1:
            raise ValueError(f"queue band={band!r} must be >= 1 (the band is [alpha / band, alpha * band])")
        sa, table = self.sa, self.inspections_table
        uncertain = table.c.p_value.between(alpha / band, alpha * band)
        query = (sa.select(table).where(table.c.product == product, table.c.review_verdict.is_(None),
                                        sa.or_(uncertain, table.c.audit.is_(True)))
                 .order_by(table.c.id).limit(limit))  # fmt: skip
        with self.engine.connect() as connection:
            return [_row(row) for row in connection.execute(query).mappings()]

    def false_alarms(self, product: str, alpha: float | None = None, version: int | None = None) -> FalseAlarms:
        """The false-alarm rate on the reviewed audit sample: of audited inspections confirmed normal, the share
        the detector flagged, with its Clopper-Pearson 95% interval (``None`` without such inspections); only
        one detector version's inspections with ``version``."""
        sa, table = self.sa, self.inspections_table
        query = sa.select(table.c.label).where(table.c.product == product, table.c.audit.is_(True),
                                               table.c.review_verdict == "normal")  # fmt: skip
        if version is not None:
            query = query.where(table.c.version == version)
        with self.engine.connect() as connection:
            labels = [row[0] for row in connection.execute(query)]
        flagged, normal = sum(label == "anomalous" for label in labels), len(labels)
        if not normal:
            return FalseAlarms(0, 0, None, None, None, alpha)
        low, high = clopper_pearson(flagged, normal)
        return FalseAlarms(flagged, normal, flagged / normal, low, high, alpha)

    def scores(self, product: str, limit: int = 10_000) -> list[float]:
        """The latest ``limit`` scores of ``product`` (for a histogram)."""
        sa, table = self.sa, self.inspections_table
        query = sa.select(table.c.score).where(table.c.product == product).order_by(table.c.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [float(row[0]) for row in connection.execute(query)]

    # ------------------------------------------------------------------ drift
    def stream_scores(self, product: str, version: int, after_id: int = 0, passing: bool = True,
                      limit: int | None = None) -> list[tuple[int, float]]:  # fmt: skip
        """``(id, score)`` of the inspections of one product version after ``after_id`` (only the passing ones with
        ``passing``), in id order: the order every process sees, the drift tests' streams."""
        sa, table = self.sa, self.inspections_table
        query = (sa.select(table.c.id, table.c.score).where(table.c.product == product, table.c.version == version,
                 table.c.id > after_id).order_by(table.c.id))  # fmt: skip
        if passing:
            query = query.where(table.c.label == "normal")
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as connection:
            return [(int(row[0]), float(row[1])) for row in connection.execute(query)]

    def raise_drift_alarm(self, product: str, version: int, stream: str, inspection_id: int, observations: int,
                          martingale: float, delta: float, webhooks: Sequence[str] = ()) -> bool:  # fmt: skip
        """Record the drift alarm of a product version's stream (``delta``: that test's share), with a webhook
        event per URL in the same transaction; ``False`` if it was recorded already (by this or another process:
        once per version and stream)."""
        sa = self.sa
        row = {"raised_at": now(), "product": product, "version": version, "stream": stream,
               "inspection_id": inspection_id, "observations": observations, "martingale": float(martingale),
               "delta": float(delta)}  # fmt: skip
        try:
            with self.engine.begin() as connection:
                connection.execute(sa.insert(self.drift_table).values(**row))
                self._enqueue(connection, webhooks, "drift", {"event": "drift", **row})
        except sa.exc.IntegrityError:
            return False
        logger.warning("drift alarm: %s version %d, %s parts: martingale %.3g >= %.3g after %d parts", product,
                       version, stream, martingale, 1 / delta, observations)  # fmt: skip
        return True

    def drift_alarms(self, product: str | None = None) -> list[dict[str, Any]]:
        """Every drift alarm recorded (of one product), oldest first."""
        return self._every_row(self.drift_table, product, _row)

    # ------------------------------------------------------------------ the outbox
    def due_events(self, owner: str, lease_s: float = 60.0, limit: int = 20) -> list[dict[str, Any]]:
        """Undelivered events whose next attempt is due, leased to ``owner`` for ``lease_s`` (two dispatchers
        never send the same event at once)."""
        sa, table = self.sa, self.outbox_table
        moment = now()
        taken = []
        with self.engine.begin() as connection:
            candidates = connection.execute(sa.select(table).where(
                table.c.delivered_at.is_(None), table.c.next_attempt_at <= moment,
                sa.or_(table.c.locked_until.is_(None), table.c.locked_until < moment)).order_by(table.c.id)
                .limit(limit)).mappings().all()  # fmt: skip
            for row in candidates:
                leased = connection.execute(sa.update(table).where(
                    table.c.id == row["id"], table.c.delivered_at.is_(None),
                    sa.or_(table.c.locked_until.is_(None), table.c.locked_until < moment)).values(
                    locked_until=moment + dt.timedelta(seconds=lease_s), locked_by=owner))  # fmt: skip
                if leased.rowcount == 1:
                    taken.append(dict(row))
        return taken

    def delivered(self, event_id: int) -> None:
        sa, table = self.sa, self.outbox_table
        with self.engine.begin() as connection:
            connection.execute(sa.update(table).where(table.c.id == event_id).values(
                delivered_at=now(), locked_until=None, last_error=None))  # fmt: skip

    def delivery_failed(self, event_id: int, error: str, retry_in_s: float) -> None:
        sa, table = self.sa, self.outbox_table
        with self.engine.begin() as connection:
            connection.execute(sa.update(table).where(table.c.id == event_id).values(
                attempts=table.c.attempts + 1, last_error=error[:2000], locked_until=None,
                next_attempt_at=now() + dt.timedelta(seconds=retry_in_s)))  # fmt: skip

    def events(self, delivered: bool | None = None) -> list[dict[str, Any]]:
        sa, table = self.sa, self.outbox_table
        query = sa.select(table).order_by(table.c.id)
        if delivered is not None:
            query = query.where(table.c.delivered_at.isnot(None) if delivered else table.c.delivered_at.is_(None))
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    # ------------------------------------------------------------------ retention
    def forget_images(self, paths: Sequence[str]) -> None:
        """Clear the stored-image fields of rows whose files the retention policy removed (the rows stay)."""
        sa, table = self.sa, self.inspections_table
        with self.engine.begin() as connection:
            for path in paths:
                connection.execute(sa.update(table).where(table.c.image_path == path).values(image_path=None))
                connection.execute(sa.update(table).where(table.c.overlay_path == path).values(overlay_path=None))


class HistoryUnavailable(ConnectionError):
    """The history database cannot be reached (an ``OSError``: the command line prints it as one line)."""


class ClaimLost(RuntimeError):
    """A watched file's claim passed to another watcher before its verdict was written (nothing was written)."""


def _dead(owner: str) -> bool:
    """Whether a claim's owner (``HOST:PID:...``) was a process of this host that no longer runs."""
    import socket

    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        return False
    return False


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion."""
    from scipy.stats import beta

    tail = (1 - confidence) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    return low, high


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (a server and watchers at once)
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _checked(value: str, valid: Sequence[str], name: str) -> str:
    if value not in valid:
        raise ValueError(f"{name} {value!r} must be one of {', '.join(valid)}")
    return value


def _aware(moment: dt.datetime) -> dt.datetime:
    """SQLite hands datetimes back without their zone; the history stores UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)


def _row(row) -> dict[str, Any]:
    item = dict(row)
    for key in ("created_at", "reviewed_at"):
        if item.get(key) is not None:
            item[key] = _aware(item[key])
    if isinstance(item.get("regions"), str):
        item["regions"] = json.loads(item["regions"])
    return item


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """What a webhook carries of a row (the stored file paths stay on the station)."""
    hidden = ("image_path", "overlay_path", "store_error")
    item = {key: value for key, value in row.items() if key not in hidden}
    if isinstance(item.get("regions"), str):
        item["regions"] = json.loads(item["regions"])
    return item


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return _aware(value).isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
