"""Batch metrics that came out NaN or infinite are recorded as NULL, not refused.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 18:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = ("balance_loss", "routing_entropy")


def upgrade() -> None:
    with op.batch_alter_table("batch_metrics") as batch:
        for column in COLUMNS:
            batch.alter_column(column, existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    # A NULL cannot be put back as a number: such rows read as 0.0, as an empty run does.
    for column in COLUMNS:
        op.execute(sa.text(f"UPDATE batch_metrics SET {column} = 0.0 WHERE {column} IS NULL"))
    with op.batch_alter_table("batch_metrics") as batch:
        for column in COLUMNS:
            batch.alter_column(column, existing_type=sa.Float(), nullable=False)
