"""Leases on queued work: who is working on a batch or a part, and whether it is alive.

A delivery that starts a batch or a part records the broker's delivery tag on its row and
then beats (`beat`) while it works. A row that is still in a working state but whose
heartbeat is older than the lease timeout belongs to a worker that died whole (a dead pool
process alone is requeued by Celery at once). `lapsed` finds such rows and `claim` takes one,
compare-and-set on the requeue count, so that of several workers looking at the same moment
exactly one hands its message back to the broker; the redelivery then counts an attempt as
any other (`ledger.begin_batch`), so a message that kills every worker still ends failed
after ``max_attempts``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import sessionmaker

from pipeline.storage.sql import Batch, BatchPart

# The states in which a delivery is working on the row (see `ledger`).
WORKING_BATCH = ("running", "routing")
WORKING_PART = ("running",)


@dataclass(frozen=True)
class Lease:
    """A batch (``shard`` None) or one of its shard parts, as a lease names it."""

    batch_id: str
    shard: str | None = None

    def __str__(self) -> str:
        return f"batch {self.batch_id}" + (f" shard {self.shard!r}" if self.shard else "")


@dataclass(frozen=True)
class Lapsed:
    lease: Lease
    delivery: str
    worker: str | None
    silent_s: float
    requeues: int


def _table(lease: Lease):
    if lease.shard is None:
        return Batch, (Batch.id == lease.batch_id,), WORKING_BATCH
    return BatchPart, (BatchPart.batch_id == lease.batch_id,
                       BatchPart.shard == lease.shard), WORKING_PART


def hold(Session: sessionmaker, lease: Lease, delivery: str | None) -> bool:
    """Record that ``delivery`` is the one taking ``lease`` (before it claims the row, so
    that a worker killed at any moment after has left the tag its requeue needs)."""
    model, key, working = _table(lease)
    with Session.begin() as s:
        return bool(s.execute(update(model).where(
            *key, model.status.in_(("queued", *working)))
            .values(delivery=delivery)).rowcount)


def beat(Session: sessionmaker, lease: Lease, delivery: str | None) -> bool:
    """Say that ``delivery`` is alive and working on ``lease``; False when the row is not in
    a working state (done, failed, or not yet begun)."""
    model, key, working = _table(lease)
    with Session.begin() as s:
        return bool(s.execute(update(model).where(*key, model.status.in_(working)).values(
            delivery=delivery, heartbeat_at=time.time())).rowcount)


def _last_heard(model):
    # A row whose delivery has begun but not yet beaten was last heard at its claim.
    return func.coalesce(model.heartbeat_at, model.updated_at)


def lapsed(Session: sessionmaker, timeout_s: float, now: float | None = None,
           limit: int = 100) -> list[Lapsed]:
    """Working rows with a delivery tag whose worker has been silent over ``timeout_s``."""
    now = time.time() if now is None else now
    found: list[Lapsed] = []
    with Session() as s:
        for model, working in ((Batch, WORKING_BATCH), (BatchPart, WORKING_PART)):
            heard = _last_heard(model)
            rows = s.execute(select(model, heard).where(
                model.status.in_(working), model.delivery.is_not(None),
                heard < now - timeout_s).limit(limit)).all()
            for row, last in rows:
                lease = (Lease(row.id) if model is Batch
                         else Lease(row.batch_id, row.shard))
                found.append(Lapsed(lease, row.delivery, row.worker, now - last,
                                    row.requeues))
    return found


def claim(Session: sessionmaker, item: Lapsed, timeout_s: float,
          now: float | None = None) -> bool:
    """Take the lapsed lease to requeue it: True for exactly one caller, and only while it
    is still lapsed (its worker did not come back in between)."""
    now = time.time() if now is None else now
    model, key, working = _table(item.lease)
    with Session.begin() as s:
        return bool(s.execute(update(model).where(
            *key, model.status.in_(working), model.requeues == item.requeues,
            or_(model.heartbeat_at.is_(None), model.heartbeat_at < now - timeout_s),
            _last_heard(model) < now - timeout_s,
        ).values(requeues=model.requeues + 1, heartbeat_at=now)).rowcount)
