"""Forgets: which sources (or which job's) were taken back, when, and what that changed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "forgets",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("source_ids", sa.JSON(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_forgets_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forgets")),
    )
    op.create_index(op.f("ix_forgets_job_id"), "forgets", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_forgets_job_id"), table_name="forgets")
    op.drop_table("forgets")
