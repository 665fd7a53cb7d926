"""``anomalens history``: the station's inspections listed or exported (table, CSV, JSON, Parquet)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any

from anomalens.io.outputs import atomic_write_bytes, atomic_write_text
from anomalens.station.history import History

COLUMNS = ("id", "created_at", "product", "version", "fingerprint", "method", "source", "image_name", "image_sha256",
           "width", "height", "score", "threshold", "label", "p_value", "pixel_threshold", "regions", "audit",
           "review_verdict", "reviewer", "reviewed_at", "review_note", "image_path", "overlay_path",
           "store_error")  # fmt: skip
TABLE = (("id", "id"), ("created_at", "time (UTC)"), ("product", "product"), ("version", "v"), ("score", "score"),
         ("label", "label"), ("p_value", "p"), ("review_verdict", "review"), ("source", "source"),
         ("image_name", "image"))  # (column, heading) of the plain table
MAX_CELL = 40  # a longer cell keeps its end, after "…"


def parse_time(text: str | None, option: str) -> dt.datetime | None:
    """An ISO 8601 time (UTC when it names no zone), or a ``ValueError`` naming the option."""
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"history option {option}={text!r} must be an ISO 8601 time, e.g. 2026-12-05T08:00") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)


def history_rows(history: History, options: Any) -> list[dict[str, Any]]:
    """The inspections ``options`` (:class:`anomalens.cli.parser.HistoryOptions`) select, newest first."""
    return history.inspections(product=options.product, label=options.label, reviewed=options.reviewed,
                               verdict=options.verdict, since=parse_time(options.since, "since"),
                               until=parse_time(options.until, "until"), limit=options.limit)  # fmt: skip


def _plain(row: dict[str, Any], *, nested: bool = False) -> dict[str, Any]:
    """A row with ISO 8601 times; the regions as JSON text (CSV, Parquet) or as they are (``nested``: JSON)."""
    item = {column: row.get(column) for column in COLUMNS}
    for key in ("created_at", "reviewed_at"):
        if item[key] is not None:
            item[key] = item[key].isoformat()
    if item["regions"] is not None and not nested:
        item["regions"] = json.dumps(item["regions"])
    return item


def write_history(rows: list[dict[str, Any]], options: Any) -> str | None:
    """Render ``rows`` in ``options.format``; written to ``options.out`` (atomically) if given, else returned."""
    plain = [_plain(row, nested=options.format == "json") for row in rows]
    if options.format == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("history --format parquet needs pyarrow: pip install 'anomalens[station]' "
                              "(or pip install pyarrow)") from None

        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({column: [row[column] for row in plain] for column in COLUMNS}), sink)
        atomic_write_bytes(options.out, sink.getvalue().to_pybytes())
        return None
    if options.format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in plain)
        text = buffer.getvalue()
    elif options.format == "json":
        text = json.dumps(plain, indent=1) + "\n"
    else:
        text = _table(rows)
    if options.out:
        atomic_write_text(options.out, text)
        return None
    return text


def _table(rows: list[dict[str, Any]]) -> str:
    """The plain table: one line per inspection, columns as wide as their widest cell."""
    cells = [[heading for _, heading in TABLE]]
    for row in rows:
        cells.append([_cell(column, row.get(column)) for column, _ in TABLE])
    widths = [max(len(line[index]) for line in cells) for index in range(len(TABLE))]
    numeric = {"id", "version", "score", "p_value"}
    lines = []
    for line in cells:
        lines.append("  ".join(text.rjust(width) if column in numeric else text.ljust(width)
                               for (column, _), text, width in zip(TABLE, line, widths, strict=True)).rstrip())
    if not rows:
        lines.append("(no inspections match)")
    return "\n".join(lines) + "\n"


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= MAX_CELL else "…" + text[-(MAX_CELL - 1):]
