"""A local job's process (host, pid, start time) and heartbeat, the key that finds it again
when its file is run again, and whether all its batches are recorded yet.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 20:42:18

Jobs recorded before this revision had all their batches from the start: ``sealed`` is true
for them (the server default). Their process is unknown (NULL), so none is ever shown as
interrupted or resumed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sealed", sa.Boolean(), server_default=sa.true(),
                                   nullable=False))
        batch.add_column(sa.Column("owner_host", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("owner_pid", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("owner_start", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("resume_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("resume_command", sa.Text(), nullable=True))
        batch.create_index(batch.f("ix_jobs_resume_key"), ["resume_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(batch.f("ix_jobs_resume_key"))
        for column in ("resume_command", "resume_key", "heartbeat_at", "owner_start",
                       "owner_pid", "owner_host", "sealed"):
            batch.drop_column(column)
