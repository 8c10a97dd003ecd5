"""Leases: the delivery working on a batch or a part, its heartbeat, and its requeues.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("batches", "batch_parts")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("delivery", sa.String(length=255), nullable=True))
            batch.add_column(sa.Column("heartbeat_at", sa.Float(), nullable=True))
            batch.add_column(sa.Column("requeues", sa.Integer(), nullable=False,
                                       server_default="0"))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("requeues")
            batch.drop_column("heartbeat_at")
            batch.drop_column("delivery")
