"""The history: inspections, review events, hot-folder claims, the webhook outbox.

Revision ID: 0001
Revises:
Created: 2026-12-06

The tables are written out here, not imported from :mod:`anomalens.station.history`: a migration is a frozen record
of one schema version, and must not change when the code's tables change later.
``tests/test_station.py::test_the_migrations_build_exactly_the_schema_the_code_uses`` compares the migrated
database with the code's tables (Alembic's own comparison), so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", TIME, nullable=False),
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
        sa.Column("audit", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("review_verdict", sa.String(16)), sa.Column("reviewer", sa.String(100)),
        sa.Column("reviewed_at", TIME), sa.Column("review_note", sa.Text),
    )  # fmt: skip
    op.create_index("ix_inspections_product_created", "inspections", ["product", "created_at"])
    op.create_index("ix_inspections_sha256", "inspections", ["image_sha256"])
    op.create_table(
        "review_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", sa.Integer, sa.ForeignKey("inspections.id"), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False), sa.Column("reviewer", sa.String(100), nullable=False),
        sa.Column("note", sa.Text), sa.Column("created_at", TIME, nullable=False),
    )  # fmt: skip
    op.create_table(
        "file_claims",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("product", sa.String(64), nullable=False), sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False), sa.Column("claimed_at", TIME, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("inspection_id", sa.Integer, sa.ForeignKey("inspections.id")), sa.Column("reason", sa.Text),
        sa.UniqueConstraint("product", "sha256", name="uq_file_claims_product_sha256"),
    )  # fmt: skip
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("url", sa.String(1024), nullable=False), sa.Column("event", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TIME, nullable=False),
        sa.Column("locked_until", TIME), sa.Column("locked_by", sa.String(200)),
        sa.Column("delivered_at", TIME), sa.Column("last_error", sa.Text),
    )  # fmt: skip
    op.create_index("ix_outbox_due", "webhook_outbox", ["delivered_at", "next_attempt_at"])


def downgrade() -> None:
    for index, table in (("ix_outbox_due", "webhook_outbox"), ("ix_inspections_sha256", "inspections"),
                         ("ix_inspections_product_created", "inspections")):  # fmt: skip
        op.drop_index(index, table_name=table)
    for table in ("webhook_outbox", "file_claims", "review_events", "inspections"):
        op.drop_table(table)
