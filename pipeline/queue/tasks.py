"""The four tasks, thin: a message in, a stage called under the error policy, ids out.

- ``pipeline.route_batch`` (queue ``gpu``): `stages.route_batch`, shipping each shard part to
  ``librarian.<shard>``;
- ``pipeline.curate_part`` (queue ``librarian.<shard>``): `stages.curate_part`;
- ``pipeline.similar`` (queue ``query``): `stages.similar`, answered through the result
  backend;
- ``pipeline.forget`` (queue ``query``): `retract.forget`, under the stack's shard locks as a
  librarian takes them, answered through the result backend.

The runtime they run on is their pool process's own (`worker.runtime`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from celery import shared_task

from pipeline import stages
from pipeline.errors import PipelineError
from pipeline.queue import messages, worker
from pipeline.queue.app import CURATE_PART, FORGET, ROUTE_BATCH, SIMILAR, librarian_queue
from pipeline.queue.lease import beating
from pipeline.queue.policy import guarded
from pipeline.records import ShardPart
from pipeline.storage import ledger
from pipeline.storage.leases import Lease


@shared_task(bind=True, name=ROUTE_BATCH)
def route_batch(self, message: dict[str, Any]) -> dict[str, Any]:
    rt, batch = worker.runtime(), messages.message_batch(message)

    def ship(part: ShardPart) -> None:
        self.app.send_task(CURATE_PART, args=[messages.part_message(part)],
                           queue=librarian_queue(part.shard))

    with _lease(self, rt, Lease(batch.batch_id)):
        return guarded(self,
                       lambda on_attempt: stages.route_batch(rt, batch, ship, on_attempt),
                       lambda n: ledger.release_batch(rt.Session, batch.batch_id, n),
                       lambda error: ledger.fail_batch(rt.Session, batch.batch_id, error))


@shared_task(bind=True, name=CURATE_PART)
def curate_part(self, message: dict[str, Any]) -> dict[str, Any]:
    rt, part = worker.runtime(), messages.message_part(message)
    with _lease(self, rt, Lease(part.batch_id, part.shard)):
        return guarded(self, lambda on_attempt: stages.curate_part(rt, part, on_attempt),
                       lambda n: ledger.release_part(rt.Session, part.batch_id, part.shard,
                                                     n),
                       lambda error: ledger.fail_part(rt.Session, part.batch_id, part.shard,
                                                      error))


def _lease(task, rt, lease: Lease):
    """Beat for the work while the task runs; the Redis transport's delivery tag is what
    a requeue needs (RabbitMQ redelivers by itself and has none to give here)."""
    tag = (task.request.properties or {}).get("delivery_tag")
    return beating(rt.Session, lease, tag, rt.settings.lease_timeout_s)


@shared_task(name=SIMILAR, ignore_result=False, acks_late=False)
def similar(message: dict[str, Any]) -> dict[str, Any]:
    q = messages.similar_question(message)
    with _answerable():
        return stages.similar(worker.runtime(), q.text, q.vector, q.k,
                              constellation=q.constellation, min_score=q.min_score,
                              like=q.like).to_message()


@shared_task(name=FORGET, ignore_result=False, acks_late=False)
def forget(message: dict[str, Any]) -> dict[str, Any]:
    from pipeline.retract import forget as forget_

    q = messages.ForgetRequest.from_message(message)
    with _answerable():
        return forget_(worker.runtime(), q.ids, job=q.job, dry_run=q.dry_run).to_message()


@contextlib.contextmanager
def _answerable() -> Iterator[None]:
    """A `PipelineError` goes back to the asker as a plain one with the same line: the result
    backend rebuilds an exception from its message alone, which a subclass with arguments
    of its own (`LockTimeout(shard, seconds)`) would not survive."""
    try:
        yield
    except PipelineError as err:
        raise PipelineError(str(err)) from None
