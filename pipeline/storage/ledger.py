"""The ledger: a job's batches and shard parts as SQL state machines.

Two ways to run share this bookkeeping, which is also what makes redelivery safe:

- a batch moves ``queued → running → routing → routed → completed | failed``; each delivery
  counts an attempt *before* any work, so a batch that kills its worker every time is marked
  failed after ``max_attempts`` instead of looping;
- routing records one `BatchPart` per shard; a part moves ``queued → running → done |
  failed`` with its own attempts; the batch completes when its last part does, and the job
  when its last batch does. Every transition is one conditional UPDATE (write first, then
  read), so two workers finishing at once complete a batch or a job exactly once, on SQLite
  and PostgreSQL alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import sessionmaker

import pipeline
from pipeline.errors import PipelineError
from pipeline.inputs import describe_bad
from pipeline.moe.config import MoEConfig
from pipeline.records import BadItem, CurateResult, Item, storable
from pipeline.storage.job_open import (  # noqa: F401 - named from the ledger too
    STOPPED,
    beat_job,
    open_job,
    resume_job,
)
from pipeline.storage.progress import (  # noqa: F401 - the ledger's reads, named from here too
    DONE_BATCH,
    Progress,
    RunRows,
    bad_item_count,
    job_outcome,
    job_status,
    progress,
    run_job_ids,
    run_knowledge,
    run_rows,
)
from pipeline.storage.run_knowledge import RunKnowledge
from pipeline.storage.sql import (
    Batch,
    BatchMetrics,
    BatchPart,
    ItemError,
    Job,
    Run,
)

# What the error columns keep: a message is cut here, an id to its column's width; both are
# made storable first (`records.storable`), so recording an error cannot itself fail.
MAX_ERROR_CHARS = 2000
ITEM_ID_CHARS = 255
REDO_BATCH = ("queued", "running", "routing")  # a delivery in these states does the work


class JobFailed(PipelineError):
    """A job with no good item, or whose every batch failed; names the job."""


@dataclass
class RoutingMetrics:
    """What routing one batch measured (host floats), recorded beside its parts; None where
    there is no figure (a batch with no item left to route)."""

    reports: int
    balance_loss: float | None
    routing_entropy: float | None
    expert_usage: dict[str, float | None]


def _finite(value: float | None) -> float | None:
    """A figure as SQL keeps it: NaN and infinity become NULL (PostgreSQL would store NaN as
    if it were a measurement, and JSON has no NaN)."""
    return None if value is None or not math.isfinite(value) else float(value)


def _item_error(job_id: str, b: BadItem) -> dict[str, Any]:
    """An `ItemError` row's values, each storable whatever the bad item held."""
    return {"job_id": job_id, "line": b.line, "field": b.field[:64],
            "item_id": None if b.item_id is None else storable(b.item_id, ITEM_ID_CHARS),
            "message": storable(b.message, MAX_ERROR_CHARS)}


@dataclass
class NewJob:
    run_id: str
    job_id: str
    batches: list[tuple[str, list[Item]]]  # (batch id, its items), in order


def create_job(Session: sessionmaker, items: Sequence[Item], bad: Sequence[BadItem],
               config: MoEConfig, mode: str, batch_size: int, device: str) -> NewJob:
    """Record a run, a job, its bad items and its batches; a job with no good item is
    recorded as failed and raises `JobFailed`."""
    with Session.begin() as s:
        run = Run(model_config=RunKnowledge.of(config).to_json(), code_version=pipeline.__version__,
                  device=device)
        job = Job(run=run, submitted_items=len(items) + len(bad), mode=mode,
                  status="running" if items else "failed",
                  error=None if items else "no valid item",
                  finished_at=None if items else time.time())
        s.add_all([run, job] + [ItemError(**_item_error(job.id, b)) for b in bad])
        batches = []
        for index in range(0, len(items), batch_size):
            chunk = list(items[index: index + batch_size])
            batch = Batch(job=job, index=index // batch_size, item_ids=[i.id for i in chunk])
            s.add(batch)
            batches.append((batch.id, chunk))
        run_id, job_id = run.id, job.id
    if not items:
        raise JobFailed(f"job {job_id}: no valid item: {describe_bad(bad)}")
    return NewJob(run_id, job_id, batches)


@dataclass(frozen=True)
class Claim:
    """Who takes a delivery and how many a batch or part may have (see `begin_batch`)."""

    worker: str
    device: str
    max_attempts: int


def add_batch(Session: sessionmaker, job_id: str, index: int, items: Sequence[Item],
              bad: Sequence[BadItem]) -> tuple[str | None, str]:
    """Record chunk ``index`` of a job: its bad items and, if it has good ones, its batch,
    in one transaction. Returns (batch id, status); a chunk recorded before (a resumed job)
    is not recorded again and its batch's status tells whether it still needs work; a chunk
    of bad items only gives (None, "completed")."""
    with Session.begin() as s:
        return _add_chunk(s, job_id, index, items, bad, {})


def claim_batch(Session: sessionmaker, job_id: str, index: int, items: Sequence[Item],
                bad: Sequence[BadItem], claim: Claim) -> tuple[str | None, str, int]:
    """`add_batch` and `begin_batch` in one transaction, for the in-process way, which
    routes the batch at once: (batch id, verdict, attempts), the verdict as `begin_batch`
    gives it; (None, "done", 0) for a chunk of bad items only."""
    taken = {"worker": claim.worker, "device": claim.device}
    with Session.begin() as s:
        batch_id, status = _add_chunk(s, job_id, index, items, bad,
                                      {"status": "running", "attempts": 1, **taken})
        if batch_id is None:
            return None, "done", 0
        if status == "running":  # recorded now, claimed with it
            return batch_id, "run", 1
        verdict, attempts = _claim(s, Batch, (Batch.id == batch_id,), REDO_BATCH, taken,
                                   claim.max_attempts, f"batch {batch_id}")
        if verdict != "run":
            _settle(s, batch_id)
        return batch_id, verdict, attempts


def _add_chunk(s, job_id: str, index: int, items: Sequence[Item],
               bad: Sequence[BadItem], taken: dict[str, Any]) -> tuple[str | None, str]:
    row = s.execute(select(Batch.id, Batch.status).where(
        Batch.job_id == job_id, Batch.index == index)).first()
    if row is not None:
        return row.id, "recorded" if taken else row.status
    lines = [b.line for b in bad]
    have = set(s.execute(select(ItemError.line, ItemError.field).where(
        ItemError.job_id == job_id, ItemError.line.in_(lines))).all()) if lines else set()
    s.add_all(ItemError(**_item_error(job_id, b)) for b in bad
              if (b.line, b.field[:64]) not in have)
    if not items:
        return None, "completed"
    batch = Batch(job_id=job_id, index=index, item_ids=[i.id for i in items], **taken)
    s.add(batch)
    return batch.id, taken.get("status", "queued")


def seal_job(Session: sessionmaker, job_id: str) -> str | None:
    """Every batch of the job is recorded: complete it, in the same transaction, if they are
    all done (see `try_complete_job`, whose status it returns)."""
    with Session.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(sealed=True))
        return _complete_job(s, job_id)


def fail_empty_job(Session: sessionmaker, job_id: str, first_bad: Sequence[BadItem],
                   bad: int) -> None:
    """A job whose file held no good item: failed, and `JobFailed` says why."""
    with Session.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            sealed=True, status="failed", error="no valid item", finished_at=time.time()))
        _finish_run(s, job_id)
    raise JobFailed(f"job {job_id}: no valid item: {describe_bad(first_bad, total=bad)}")


# -- batch and part transitions (the stages call them, whichever way they run) ----------
# A transition and what it may complete share one transaction: the part's (or batch's)
# conditional UPDATE first, then the batch's row (then the job's) is locked and read, so of
# two transactions finishing the last two parts at once the second to commit sees both done
# and completes the batch (PostgreSQL: FOR UPDATE; SQLite has one writer at a time anyway).
def _claim(s, model, key: tuple, redo: tuple[str, ...], claim: dict[str, Any],
           max_attempts: int, what: str) -> tuple[str, int]:
    """Claim the rows ``key`` of ``model`` and count an attempt if they are in a ``redo``
    state; the verdict, as `begin_batch` gives it, with the attempts counted."""
    changed = s.execute(update(model).where(*key, model.status.in_(redo)).values(
        attempts=model.attempts + 1, status="running", **claim)).rowcount
    attempts = s.scalar(select(model.attempts).where(*key))
    if attempts is None:
        raise PipelineError(f"{what}: not in SQL (a message for another database?)")
    if not changed:
        return "done", attempts
    if attempts > max_attempts:
        s.execute(update(model).where(*key).values(
            status="failed", error=f"gave up after {max_attempts} attempts: each "
            "delivery ended with its worker dead (killed, or out of memory?)"))
        return "gave_up", attempts
    return "run", attempts


def _count_delivery(Session: sessionmaker, model, key: tuple, redo: tuple[str, ...],
                    claim: dict[str, Any], max_attempts: int, what: str,
                    batch_id: str) -> tuple[str, int]:
    """One delivery of a batch or a part, in one transaction (see `begin_batch`)."""
    with Session.begin() as s:
        verdict, attempts = _claim(s, model, key, redo, claim, max_attempts, what)
        if verdict != "run":
            _settle(s, batch_id)
    return verdict, attempts


def begin_batch(Session: sessionmaker, batch_id: str, worker: str, device: str,
                max_attempts: int) -> tuple[str, int]:
    """Count a delivery of the batch: ``("run", attempt)`` to do the work, ``("done", n)``
    when an earlier delivery already routed it, ``("gave_up", n)`` when it has had its
    ``max_attempts`` and is now marked failed. For ``done`` and ``gave_up`` the batch and
    job are settled here, so a delivery after a crash between two steps finishes them."""
    return _count_delivery(Session, Batch, (Batch.id == batch_id,), REDO_BATCH,
                           {"worker": worker, "device": device}, max_attempts,
                           f"batch {batch_id}", batch_id)


def release_batch(Session: sessionmaker, batch_id: str, attempt: int) -> None:
    """Give back this delivery's attempt (number ``attempt``) when an outage, not the batch,
    interrupted it: the task is retried, and the batch is not counted as poison."""
    with Session.begin() as s:
        s.execute(update(Batch).where(Batch.id == batch_id, Batch.attempts == attempt,
                                      Batch.status.in_(("running", "routing")))
                  .values(attempts=Batch.attempts - 1))


def release_part(Session: sessionmaker, batch_id: str, shard: str, attempt: int) -> None:
    with Session.begin() as s:
        s.execute(update(BatchPart).where(
            BatchPart.batch_id == batch_id, BatchPart.shard == shard,
            BatchPart.attempts == attempt, BatchPart.status == "running")
            .values(attempts=BatchPart.attempts - 1))


def record_routing(Session: sessionmaker, batch_id: str, routed: RoutingMetrics,
                   shards: dict[str, int], timings: dict[str, float],
                   bad: Sequence[BadItem] = (), job_id: str | None = None,
                   claim: Claim | None = None) -> list[str] | None:
    """Store a routed batch's metrics, its items that failed (``bad``, of job ``job_id``) and
    one part per shard (``shards``: report counts), in one transaction.

    Returns the shards whose librarian task is still to be sent (all, unless this is a
    redelivery: then those never marked dispatched), or None when the batch is no longer
    this delivery's to route (another delivery moved it on). With ``claim`` (the in-process
    way, which curates the parts at once) the parts are claimed here as `begin_part` would,
    and the shards returned are those to curate now (a part past its attempts is failed)."""
    with Session.begin() as s:
        mine = s.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "running")
                         .values(status="routing", timings=timings)).rowcount
        if not mine:
            return None
        if bad:
            _record_item_errors(s, job_id, bad)
        s.merge(BatchMetrics(batch_id=batch_id, balance_loss=_finite(routed.balance_loss),
                             routing_entropy=_finite(routed.routing_entropy),
                             expert_usage={e: _finite(u)
                                           for e, u in routed.expert_usage.items()},
                             reports=routed.reports,
                             new_insights=0, merged=0, dedup_rate=0.0))
        existing = {p.shard: p.dispatched for p in s.execute(
            select(BatchPart.shard, BatchPart.dispatched).where(
                BatchPart.batch_id == batch_id))}
        taken = ({} if claim is None else
                 {"status": "running", "attempts": 1, "worker": claim.worker,
                  "dispatched": True})
        s.add_all(BatchPart(batch_id=batch_id, shard=shard, reports=n,
                            **{"attempts": 0, **taken})
                  for shard, n in shards.items() if shard not in existing)
        if claim is None:
            return [shard for shard in shards if not existing.get(shard)]
        return [shard for shard in shards if shard not in existing or _claim(
            s, BatchPart, (BatchPart.batch_id == batch_id, BatchPart.shard == shard),
            ("queued", "running"), {"worker": claim.worker}, claim.max_attempts,
            f"batch {batch_id} shard {shard!r}")[0] == "run"]


def _record_item_errors(s, job_id: str | None, bad: Sequence[BadItem]) -> None:
    if job_id is None:  # an item error row belongs to a job
        raise ValueError(f"{len(bad)} bad item(s) given without the id of their job")
    rows = [_item_error(job_id, b) for b in bad]
    have = set(s.execute(select(ItemError.item_id, ItemError.field).where(
        ItemError.job_id == job_id,
        ItemError.item_id.in_([r["item_id"] for r in rows]))).all())
    fresh = {(r["item_id"], r["field"]): r for r in rows
             if (r["item_id"], r["field"]) not in have}
    s.add_all(ItemError(**r) for r in fresh.values())


def record_item_errors(Session: sessionmaker, job_id: str, bad: Sequence[BadItem]) -> None:
    """Items that failed inside a batch (encode, route, curate): recorded as bad items of
    the job, once each however often the batch is delivered (an item's (id, field) is
    recorded once)."""
    with Session.begin() as s:
        _record_item_errors(s, job_id, bad)


def mark_dispatched(Session: sessionmaker, batch_id: str, shards: Sequence[str]) -> None:
    """The librarian tasks of these parts are on the broker."""
    if shards:
        with Session.begin() as s:
            _dispatched(s, batch_id, shards)


def _dispatched(s, batch_id: str, shards: Sequence[str]) -> None:
    s.execute(update(BatchPart).where(BatchPart.batch_id == batch_id,
                                      BatchPart.shard.in_(list(shards)))
              .values(dispatched=True))


def mark_routed(Session: sessionmaker, batch_id: str, dispatched: Sequence[str] = ()
                ) -> None:
    """The batch's parts are all sent (``dispatched``: those this delivery sent): routed, and
    completed at once if every part has finished already."""
    with Session.begin() as s:
        if dispatched:
            _dispatched(s, batch_id, dispatched)
        s.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "routing")
                  .values(status="routed"))
        _settle(s, batch_id)


def fail_batch(Session: sessionmaker, batch_id: str, error: str) -> None:
    with Session.begin() as s:
        s.execute(update(Batch).where(Batch.id == batch_id, Batch.status.not_in(DONE_BATCH))
                  .values(status="failed", error=storable(error, MAX_ERROR_CHARS)))
        _settle(s, batch_id)


def begin_part(Session: sessionmaker, batch_id: str, shard: str, worker: str,
               max_attempts: int) -> tuple[str, int]:
    """As `begin_batch`, for one shard part."""
    return _count_delivery(
        Session, BatchPart, (BatchPart.batch_id == batch_id, BatchPart.shard == shard),
        ("queued", "running"), {"worker": worker}, max_attempts,
        f"batch {batch_id} shard {shard!r}", batch_id)


@dataclass
class PartOutcome:
    """What curating one part came to: its result (None: it failed, with ``error``)."""

    shard: str
    result: CurateResult | None
    seconds: float = 0.0
    error: str | None = None


def _finish(s, batch_id: str, outcome: PartOutcome) -> None:
    """The part's transition: ``running → done``, or ``→ failed`` with its error."""
    key = (BatchPart.batch_id == batch_id, BatchPart.shard == outcome.shard)
    if outcome.result is not None:
        founded, joined = outcome.result.outcome()
        s.execute(update(BatchPart).where(*key, BatchPart.status == "running").values(
            status="done", new_insights=founded, merged=joined, seconds=outcome.seconds))
    else:
        s.execute(update(BatchPart).where(*key, BatchPart.status.not_in(("done", "failed")))
                  .values(status="failed", error=storable(outcome.error or "failed",
                                                          MAX_ERROR_CHARS)))


def finish_parts(Session: sessionmaker, batch_id: str, outcomes: Sequence[PartOutcome],
                 bad: Sequence[BadItem] = (), job_id: str | None = None) -> None:
    """Record the parts' outcomes and their reports that failed alone (``bad``), and complete
    the batch (and its job) if these were its last parts, all in one transaction."""
    with Session.begin() as s:  # a write first: SQLite takes its write lock there
        for outcome in outcomes:
            _finish(s, batch_id, outcome)
        if bad:  # before the job can complete, so that it counts them
            _record_item_errors(s, job_id, bad)
        s.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "routing")
                  .values(status="routed"))  # in-process: every part was handed over
        _settle(s, batch_id)


def finish_part(Session: sessionmaker, batch_id: str, shard: str, result: CurateResult,
                seconds: float, bad: Sequence[BadItem] = (), job_id: str | None = None
                ) -> None:
    """A librarian's part is done: one transaction, which completes the batch (and job)
    when this UPDATE makes the last part done."""
    with Session.begin() as s:
        _finish(s, batch_id, PartOutcome(shard, result, seconds))
        if bad:
            _record_item_errors(s, job_id, bad)
        _settle(s, batch_id)


def fail_part(Session: sessionmaker, batch_id: str, shard: str, error: str) -> None:
    with Session.begin() as s:
        _finish(s, batch_id, PartOutcome(shard, None, error=error))
        _settle(s, batch_id)


def settle_batch(Session: sessionmaker, batch_id: str) -> None:
    """Complete the batch if it can be, then its job if it can be. Idempotent, and safe to
    call from any delivery: a crash between two transactions can be finished by the next
    caller, so nothing is left stuck."""
    with Session.begin() as s:
        _settle(s, batch_id)


def _settle(s, batch_id: str) -> None:
    """`settle_batch` inside the caller's transaction."""
    job_id = s.scalar(select(Batch.job_id).where(Batch.id == batch_id).with_for_update())
    if job_id is None:
        return
    _complete_batch(s, batch_id)
    # Whether or not this call completed the batch: a batch failed outright (poison, given
    # up after its attempts) is finished without passing through `_complete_batch`, and may
    # be the job's last one.
    _complete_job(s, job_id)


def try_complete_batch(Session: sessionmaker, batch_id: str) -> bool:
    """Complete a routed batch whose parts are all finished; True for the one caller that
    does it (a conditional UPDATE: exactly once, whoever calls first)."""
    with Session.begin() as s:
        s.execute(select(Batch.id).where(Batch.id == batch_id).with_for_update())
        return _complete_batch(s, batch_id)


def _complete_batch(s, batch_id: str) -> bool:
    """`try_complete_batch` in the caller's transaction, the batch's row locked by it."""
    parts = s.execute(select(BatchPart.shard, BatchPart.status, BatchPart.error,
                             BatchPart.seconds, BatchPart.new_insights, BatchPart.merged,
                             BatchPart.reports).where(BatchPart.batch_id == batch_id)).all()
    if any(p.status not in ("done", "failed") for p in parts):
        return False
    failed = [p for p in parts if p.status == "failed"]
    status = "failed" if failed else "completed"
    error = "; ".join(f"shard {p.shard}: {p.error}" for p in failed) or None
    timings = s.scalar(select(Batch.timings).where(Batch.id == batch_id)) or {}
    won = s.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "routed")
                    .values(status=status, error=error, timings={
                        **timings, "curate": sum(p.seconds for p in parts)})).rowcount
    if not won:
        return False
    inserted = sum(p.new_insights for p in parts)
    merged = sum(p.merged for p in parts)
    reports = sum(p.reports for p in parts)
    s.execute(update(BatchMetrics).where(BatchMetrics.batch_id == batch_id).values(
        new_insights=inserted, merged=merged,
        dedup_rate=merged / reports if reports else 0.0))
    return True


def try_complete_job(Session: sessionmaker, job_id: str) -> str | None:
    """Finish a job whose batches are all finished: ``completed``, ``completed_with_errors``
    (bad items or failed batches), or ``failed`` (no batch succeeded). Returns the status
    for the one caller that finishes it."""
    with Session.begin() as s:
        return _complete_job(s, job_id)


def _complete_job(s, job_id: str) -> str | None:
    """`try_complete_job` in the caller's transaction (which locks the job's row first)."""
    sealed = s.scalar(select(Job.sealed).where(Job.id == job_id, Job.status == "running")
                      .with_for_update())
    if not sealed:
        return None
    counts = dict(s.execute(select(Batch.status, func.count()).where(
        Batch.job_id == job_id).group_by(Batch.status)).all())
    if not counts or set(counts) - set(DONE_BATCH):
        return None
    bad = s.scalar(select(func.count()).select_from(ItemError).where(
        ItemError.job_id == job_id))
    failed, total = counts.get("failed", 0), sum(counts.values())
    if failed == total:
        status, error = "failed", f"all {total} batches failed"
    elif failed or bad:
        status = "completed_with_errors"
        error = ", ".join(part for part in (f"{failed} of {total} batches failed" if failed
                                            else "", f"{bad} bad items" if bad else "")
                          if part)
    else:
        status, error = "completed", None
    won = s.execute(update(Job).where(Job.id == job_id, Job.status == "running",
                                      Job.sealed.is_(True))
                    .values(status=status, error=error, finished_at=time.time())).rowcount
    if won:
        _finish_run(s, job_id)
    return status if won else None


def _finish_run(s, job_id: str) -> None:
    run_id = s.scalar(select(Job.run_id).where(Job.id == job_id))
    s.execute(update(Run).where(Run.id == run_id).values(status="finished",
                                                         finished_at=time.time()))


def fail_job(Session: sessionmaker, job_id: str, error: str) -> None:
    with Session.begin() as s:
        if s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(
                status="failed", error=storable(error, MAX_ERROR_CHARS),
                finished_at=time.time())).rowcount:
            _finish_run(s, job_id)


def fail_unsent(Session: sessionmaker, batch_ids: Sequence[str]) -> None:
    """Batches whose message never reached the broker."""
    with Session.begin() as s:
        s.execute(update(Batch).where(Batch.id.in_(list(batch_ids))).values(
            status="failed", error="never sent: submission interrupted"))
