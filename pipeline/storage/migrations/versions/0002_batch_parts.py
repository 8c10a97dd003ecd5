"""Batch parts (one librarian task per batch and shard) and the job's mode.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 09:40:00
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
        "batch_parts",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("shard", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("dispatched", sa.Boolean(), nullable=False),
        sa.Column("reports", sa.Integer(), nullable=False),
        sa.Column("new_insights", sa.Integer(), nullable=False),
        sa.Column("merged", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"],
                                name=op.f("fk_batch_parts_batch_id_batches")),
        sa.PrimaryKeyConstraint("batch_id", "shard", name=op.f("pk_batch_parts")),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("mode", sa.String(length=16), nullable=False,
                                   server_default="local"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("mode")
    op.drop_table("batch_parts")
