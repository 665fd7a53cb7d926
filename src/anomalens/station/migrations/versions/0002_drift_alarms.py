"""Drift alarms: one row per product version and stream whose conformal test martingale reached its level.

Revision ID: 0002
Revises: 0001
Created: 2026-12-06

A frozen copy of the table (see 0001's docstring); the schema test compares it with the code's.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_alarms",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("product", sa.String(64), nullable=False), sa.Column("version", sa.Integer, nullable=False),
        sa.Column("stream", sa.String(16), nullable=False),
        sa.Column("inspection_id", sa.Integer, sa.ForeignKey("inspections.id"), nullable=False),
        sa.Column("observations", sa.Integer, nullable=False), sa.Column("martingale", sa.Float, nullable=False),
        sa.Column("delta", sa.Float, nullable=False),
        sa.UniqueConstraint("product", "version", "stream", name="uq_drift_alarms_product_version_stream"),
    )  # fmt: skip


def downgrade() -> None:
    op.drop_table("drift_alarms")
