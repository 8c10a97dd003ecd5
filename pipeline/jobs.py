"""Jobs: a file of items, split into batches, run through the stages, recorded in SQL.

Two ways to run one code path. `run_local` (the embedded default, ``moe-pipeline run``) calls
the stages in this process; `submit` (``moe-pipeline submit``) records the job and queues one
GPU task per batch for the Celery workers (`pipeline.workers`). Both go through the same
bookkeeping below, which is also what makes redelivery safe:

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

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import func, select, update
from sqlalchemy.orm import sessionmaker

import pipeline
from pipeline import stages
from pipeline.config import MoEConfig, Settings, default_config
from pipeline.errors import PipelineError
from pipeline.inputs import BadItem, Item, read_items
from pipeline.librarian import CurateResult, Librarian
from pipeline.locks import LockTimeout, shard_locks
from pipeline.moe import checkpoint
from pipeline.moe.system import MixtureOfExpertsSystem
from pipeline.reports import stable_id
from pipeline.storage.graph import GraphUnavailable
from pipeline.storage.local_graph import open_graph
from pipeline.storage.sql import (
    Batch,
    BatchMetrics,
    BatchPart,
    ItemError,
    Job,
    Run,
    session_factory,
)

DONE_BATCH = ("completed", "failed")
REDO_BATCH = ("queued", "running", "routing")  # a delivery in these states does the work


class JobFailed(PipelineError):
    """A job with no good item, or whose every batch failed; names the job."""


def model_config(settings: Settings) -> MoEConfig:
    """The config of the model the settings name (read without loading weights)."""
    if settings.model_path:
        return checkpoint.read_config(settings.model_path)
    return default_config()


def config_fingerprint(config: MoEConfig) -> str:
    import json

    return stable_id("config", json.dumps(config.to_dict(), sort_keys=True), length=16)


def model_fingerprint(settings: Settings, config: MoEConfig) -> str:
    """What makes two processes draft the same reports: the config, the weights (the
    checkpoint's bytes, or the seed of the built-in model) and the text encoder."""
    import hashlib

    if settings.model_path:
        digest = hashlib.sha256()
        for path in sorted(Path(settings.model_path).glob("*.safetensors")):
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        weights = digest.hexdigest()
    else:
        weights = f"seed={settings.seed}"
    encoder = Path(settings.text_model).name if settings.text_model else "bundled-minilm"
    return stable_id("model", config_fingerprint(config), weights, encoder, length=16)


def load_system(settings: Settings, device: str | None = None) -> MixtureOfExpertsSystem:
    """The served model: the checkpoint at ``MOE_MODEL_PATH``, or the default model built
    from ``seed`` (the same weights in every process, so a redelivered batch gives the same
    reports wherever it runs)."""
    if settings.model_path:
        system = MixtureOfExpertsSystem.from_pretrained(settings.model_path)
    else:
        torch.manual_seed(settings.seed)
        system = MixtureOfExpertsSystem(default_config())
    return system.to(device or settings.torch_device()).eval()


def constellation_map(config: MoEConfig) -> dict[str, list[str]]:
    names = config.expert_names()
    return {name: [names[e] for e in members] for name, members in
            config.constellation_members()}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class JobSummary:
    job_id: str
    run_id: str
    status: str
    items: int
    bad_items: int
    reports: int
    inserted: int
    merged: int
    seconds: float


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
        run = Run(model_config=config.to_dict(), code_version=pipeline.__version__,
                  device=device)
        job = Job(run=run, submitted_items=len(items) + len(bad), mode=mode,
                  status="running" if items else "failed",
                  error=None if items else "no valid item",
                  finished_at=None if items else time.time())
        s.add_all([run, job] + [ItemError(job=job, item_id=b.item_id, line=b.line,
                                          field=b.field, message=b.message) for b in bad])
        batches = []
        for index in range(0, len(items), batch_size):
            chunk = list(items[index: index + batch_size])
            batch = Batch(job=job, index=index // batch_size, item_ids=[i.id for i in chunk])
            s.add(batch)
            batches.append((batch.id, chunk))
        run_id, job_id = run.id, job.id
    if not items:
        raise JobFailed(f"job {job_id}: no valid item ({len(bad)} bad; see "
                        f"`moe-pipeline status {job_id}`)")
    return NewJob(run_id, job_id, batches)


# -- batch and part transitions (shared by run_local and the Celery tasks) ----------------
def _count_delivery(Session: sessionmaker, model, key: tuple, redo: tuple[str, ...],
                    claim: dict[str, Any], max_attempts: int, what: str,
                    batch_id: str) -> tuple[str, int]:
    """One delivery of a batch or a part (``model`` rows matching ``key``): claim it and count
    an attempt if it is in a ``redo`` state, then give the verdict (see `begin_batch`)."""
    with Session.begin() as s:
        changed = s.execute(update(model).where(*key, model.status.in_(redo)).values(
            attempts=model.attempts + 1, status="running", **claim)).rowcount
        attempts = s.scalar(select(model.attempts).where(*key))
        if attempts is None:
            raise PipelineError(f"{what}: not in SQL (a message for another database?)")
        verdict = "run"
        if not changed:
            verdict = "done"
        elif attempts > max_attempts:
            s.execute(update(model).where(*key).values(
                status="failed", error=f"gave up after {max_attempts} attempts: each "
                "delivery ended with its worker dead (killed, or out of memory?)"))
            verdict = "gave_up"
    if verdict != "run":
        settle_batch(Session, batch_id)
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


def record_routing(Session: sessionmaker, batch_id: str, routed: stages.Routed,
                   shards: dict[str, int], timings: dict[str, float]) -> list[str] | None:
    """Store a routed batch's metrics and one part per shard (``shards``: report counts).

    Returns the shards whose librarian task is still to be sent (all, unless this is a
    redelivery: then those never marked dispatched), or None when the batch is no longer
    this delivery's to route (another delivery moved it on)."""
    with Session.begin() as s:
        mine = s.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "running")
                         .values(status="routing", timings=timings)).rowcount
        if not mine:
            return None
        s.merge(BatchMetrics(batch_id=batch_id, balance_loss=routed.balance_loss,
                             routing_entropy=routed.routing_entropy,
                             expert_usage=routed.expert_usage, reports=len(routed.reports),
                             new_insights=0, merged=0, dedup_rate=0.0))
        existing = {p.shard: p for p in s.scalars(
            select(BatchPart).where(BatchPart.batch_id == batch_id))}
        s.add_all(BatchPart(batch_id=batch_id, shard=shard, reports=n, attempts=0)
                  for shard, n in shards.items() if shard not in existing)
    return [shard for shard in shards
            if shard not in existing or not existing[shard].dispatched]


def mark_dispatched(Session: sessionmaker, batch_id: str, shards: Sequence[str]) -> None:
    """The librarian tasks of these parts are on the broker."""
    if shards:
        with Session.begin() as s:
            s.execute(update(BatchPart).where(BatchPart.batch_id == batch_id,
                                              BatchPart.shard.in_(list(shards)))
                      .values(dispatched=True))


def mark_routed(Session: sessionmaker, batch_id: str) -> None:
    with Session.begin() as s:
        s.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "routing")
                  .values(status="routed"))
    settle_batch(Session, batch_id)


def fail_batch(Session: sessionmaker, batch_id: str, error: str) -> None:
    with Session.begin() as s:
        s.execute(update(Batch).where(Batch.id == batch_id, Batch.status.not_in(DONE_BATCH))
                  .values(status="failed", error=error[:2000]))
    settle_batch(Session, batch_id)


def begin_part(Session: sessionmaker, batch_id: str, shard: str, worker: str,
               max_attempts: int) -> tuple[str, int]:
    """As `begin_batch`, for one shard part."""
    return _count_delivery(
        Session, BatchPart, (BatchPart.batch_id == batch_id, BatchPart.shard == shard),
        ("queued", "running"), {"worker": worker}, max_attempts,
        f"batch {batch_id} shard {shard!r}", batch_id)


def finish_part(Session: sessionmaker, batch_id: str, shard: str, result: CurateResult,
                seconds: float) -> None:
    founded, joined = result.outcome()
    with Session.begin() as s:
        s.execute(update(BatchPart).where(
            BatchPart.batch_id == batch_id, BatchPart.shard == shard,
            BatchPart.status == "running").values(
                status="done", new_insights=founded, merged=joined, seconds=seconds))
    settle_batch(Session, batch_id)


def fail_part(Session: sessionmaker, batch_id: str, shard: str, error: str) -> None:
    with Session.begin() as s:
        s.execute(update(BatchPart).where(
            BatchPart.batch_id == batch_id, BatchPart.shard == shard,
            BatchPart.status.not_in(("done", "failed"))).values(
                status="failed", error=error[:2000]))
    settle_batch(Session, batch_id)


def settle_batch(Session: sessionmaker, batch_id: str) -> None:
    """Complete the batch if it can be, then its job if it can be. Idempotent, and safe to
    call from any delivery: every step between two transactions can be finished by the
    next caller, so a crash between them leaves nothing stuck."""
    try_complete_batch(Session, batch_id)
    with Session() as s:
        job_id = s.scalar(select(Batch.job_id).where(Batch.id == batch_id))
    if job_id is not None:
        try_complete_job(Session, job_id)


def try_complete_batch(Session: sessionmaker, batch_id: str) -> bool:
    """Complete a routed batch whose parts are all finished; True for the one caller that
    does it (a conditional UPDATE: exactly once, whoever calls first)."""
    with Session() as s:
        parts = s.scalars(select(BatchPart).where(BatchPart.batch_id == batch_id)).all()
        if any(p.status not in ("done", "failed") for p in parts):
            return False
    failed = [p for p in parts if p.status == "failed"]
    status = "failed" if failed else "completed"
    error = "; ".join(f"shard {p.shard}: {p.error}" for p in failed) or None
    with Session.begin() as s:
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
    with Session() as s:
        counts = dict(s.execute(select(Batch.status, func.count()).where(
            Batch.job_id == job_id).group_by(Batch.status)).all())
        bad = s.scalar(select(func.count()).select_from(ItemError).where(
            ItemError.job_id == job_id))
    if not counts or set(counts) - set(DONE_BATCH):
        return None
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
    with Session.begin() as s:
        won = s.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                        .values(status=status, error=error, finished_at=time.time())).rowcount
        if won:
            _finish_run(s, job_id)
    return status if won else None


def _finish_run(s, job_id: str) -> None:  # noqa: ANN001
    run_id = s.scalar(select(Job.run_id).where(Job.id == job_id))
    s.execute(update(Run).where(Run.id == run_id).values(status="finished",
                                                         finished_at=time.time()))


def fail_job(Session: sessionmaker, job_id: str, error: str) -> None:
    with Session.begin() as s:
        if s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(
                status="failed", error=error[:2000], finished_at=time.time())).rowcount:
            _finish_run(s, job_id)


# -- the queued run ------------------------------------------------------------------------
def submit(source: str | Path | list[dict[str, Any]], settings: Settings | None = None,
           batch_size: int | None = None) -> NewJob:
    """Record a job and queue one GPU task per batch; returns at once (see `wait`).

    The broker is checked before anything is recorded, so an unreachable one is one clear
    error and no job is left behind that no worker will ever see.
    """
    from pipeline.workers.app import ROUTE_BATCH, make_app
    from pipeline.workers.gpu import batch_message

    settings = settings or Settings()
    batch_size = batch_size or settings.batch_size
    app = make_app(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as err:  # kombu raises its own or the transport's error
        raise PipelineError(f"broker {settings.broker_url()} unreachable: {err}") from err
    items, bad = read_items(source)
    Session = session_factory(settings.sql_url())
    config = model_config(settings)
    job = create_job(Session, items, bad, config, "queued", batch_size, "queued")
    fingerprint = model_fingerprint(settings, config)
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for batch_id, chunk in job.batches:
                app.send_task(ROUTE_BATCH, args=[batch_message(
                    batch_id, job.job_id, job.run_id, fingerprint, chunk)], producer=producer)
                sent += 1
    except BaseException as err:  # the broker went away, or ^C: no job left half-sent
        unsent = [batch_id for batch_id, _ in job.batches[sent:]]
        with Session.begin() as s:
            s.execute(update(Batch).where(Batch.id.in_(unsent)).values(
                status="failed", error="never sent: submission interrupted"))
        fail_job(Session, job.job_id, f"submission interrupted after {sent} of "
                 f"{len(job.batches)} batches: {type(err).__name__}: {err}")
        if isinstance(err, Exception):
            raise PipelineError(f"job {job.job_id}: sending to {settings.broker_url()} "
                                f"failed after {sent} of {len(job.batches)} batches "
                                f"({err}); the job is marked failed") from err
        raise
    return job


@dataclass
class Progress:
    status: str
    batches: int
    finished: int  # completed or failed
    failed: int
    items_done: int


def progress(Session: sessionmaker, job_id: str) -> Progress:
    with Session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise PipelineError(f"no job {job_id!r}")
        rows = s.execute(select(Batch.status, Batch.item_ids).where(Batch.job_id == job_id)
                         ).all()
        status = job.status
    finished = [r for r in rows if r.status in DONE_BATCH]
    return Progress(status, len(rows), len(finished),
                    sum(r.status == "failed" for r in rows),
                    sum(len(r.item_ids) for r in finished))


def wait(Session: sessionmaker, job_id: str, timeout_s: float | None = None,
         poll_s: float = 0.5, on_progress: Callable[[Progress], None] | None = None
         ) -> Progress:
    """Poll SQL until the job finishes (or ``timeout_s`` passes: `PipelineError`)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = progress(Session, job_id)
        if on_progress:
            on_progress(state)
        if state.status not in ("running", "queued"):
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise PipelineError(f"job {job_id}: still {state.status} after {timeout_s:.0f} s "
                                f"({state.finished}/{state.batches} batches); are workers "
                                "running? (moe-pipeline worker gpu|librarian)")
        time.sleep(poll_s)


@dataclass
class RunStats:
    run_id: str
    jobs: int
    batches: int
    items: int
    reports: int
    new_insights: int
    merged: int
    dedup_rate: float
    routing_entropy: float  # mean over batches, nats
    balance_loss: float
    expert_usage: dict[str, float]  # expert -> share of token assignments
    constellation_usage: dict[str, float]  # constellation -> share of draft reports


def run_stats(Session: sessionmaker, run_id: str | None = None) -> RunStats:
    """Routing and dedup figures of a run (default: the latest) from its batches' metrics."""
    with Session() as s:
        if run_id is None:
            run_id = s.scalar(select(Run.id).order_by(Run.created_at.desc()).limit(1))
            if run_id is None:
                raise PipelineError("no runs yet: moe-pipeline run FILE (or submit FILE)")
        elif s.get(Run, run_id) is None:
            raise PipelineError(f"no run {run_id!r}")
        rows = s.execute(select(Batch, BatchMetrics).join(BatchMetrics).join(Job).where(
            Job.run_id == run_id)).all()
        parts = s.execute(select(BatchPart.shard, func.sum(BatchPart.reports)).join(Batch)
                          .join(Job).where(Job.run_id == run_id).group_by(BatchPart.shard)
                          ).all()
        n_jobs = s.scalar(select(func.count()).select_from(Job).where(Job.run_id == run_id))
    items = sum(len(b.item_ids) for b, _ in rows)
    usage: dict[str, float] = {}
    for b, m in rows:  # weighted by the batch's items
        for expert, share in m.expert_usage.items():
            usage[expert] = usage.get(expert, 0.0) + share * len(b.item_ids) / max(items, 1)
    reports = sum(m.reports for _, m in rows)
    merged = sum(m.merged for _, m in rows)
    total_parts = sum(n for _, n in parts) or 1
    mean = (lambda xs: sum(xs) / len(xs) if xs else 0.0)  # noqa: E731
    return RunStats(run_id, n_jobs or 0, len(rows), items, reports,
                    sum(m.new_insights for _, m in rows), merged,
                    merged / reports if reports else 0.0,
                    mean([m.routing_entropy for _, m in rows]),
                    mean([m.balance_loss for _, m in rows]), usage,
                    {shard: n / total_parts for shard, n in sorted(parts)})


# -- the in-process run --------------------------------------------------------------------
def run_local(source: str | Path | list[dict[str, Any]], settings: Settings | None = None,
              batch_size: int | None = None,
              progress: Callable[[int], None] | None = None) -> JobSummary:
    """Run a job in this process; ``progress(n)`` is told as each batch's n items finish."""
    settings = settings or Settings()
    batch_size = batch_size or settings.batch_size
    start = time.perf_counter()
    items, bad = read_items(source)
    Session = session_factory(settings.sql_url())
    device = settings.torch_device()
    config = model_config(settings)
    job = create_job(Session, items, bad, config, "local", batch_size, device)
    totals = {"reports": 0, "inserted": 0, "merged": 0}
    graph = None
    try:
        system = load_system(settings, device)
        graph = open_graph(settings)
        graph.ensure_schema()
        graph.ensure_run(job.run_id, config.to_dict(), constellation_map(config))
        librarian = Librarian.from_config(graph, shard_locks(settings), config, job.run_id)
        for batch_id, chunk in job.batches:
            try:
                _run_batch(Session, settings, job.job_id, job.run_id, batch_id, chunk,
                           system, librarian, totals)
            except (GraphUnavailable, LockTimeout):
                raise  # an outage, not this batch's fault: stop the run
            except PipelineError as err:  # this batch's fault: record it, go on
                fail_batch(Session, batch_id, str(err))
            if progress:
                progress(len(chunk))
    except BaseException as err:  # an outage or an interrupt: the job must not look alive
        fail_job(Session, job.job_id, f"stopped: {type(err).__name__}: {err}")
        raise
    finally:
        if graph is not None:
            graph.close()
    with Session() as s:
        status = s.get(Job, job.job_id).status
    if status == "failed":
        raise JobFailed(f"job {job.job_id}: every batch failed; see "
                        f"`moe-pipeline status {job.job_id}`")
    return JobSummary(job.job_id, job.run_id, status, len(items), len(bad), totals["reports"],
                      totals["inserted"], totals["merged"], time.perf_counter() - start)


def _run_batch(Session: sessionmaker, settings: Settings, job_id: str, run_id: str,
               batch_id: str, chunk: list[Item], system: MixtureOfExpertsSystem,
               librarian: Librarian, totals: dict[str, int]) -> None:
    device = str(next(system.parameters()).device)
    verdict, _ = begin_batch(Session, batch_id, "local", device, settings.max_attempts)
    if verdict != "run":
        return
    timings: dict[str, float] = {}
    t = time.perf_counter()
    x = stages.encode(chunk, system.config.input_dim, settings.seed, settings.text_model,
                      device)
    timings["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    routed = stages.route(system, x, chunk, job_id)
    timings["route"] = time.perf_counter() - t
    groups = stages.by_shard(routed.reports)
    if record_routing(Session, batch_id, routed, {k: len(v) for k, v in groups.items()},
                      timings) is None:
        return
    mark_dispatched(Session, batch_id, list(groups))
    for shard, reports in groups.items():
        begin_part(Session, batch_id, shard, "local", settings.max_attempts)
        t = time.perf_counter()
        result = stages.curate(librarian, shard, reports, run_id)
        finish_part(Session, batch_id, shard, result, time.perf_counter() - t)
        totals["inserted"] += result.inserted
        totals["merged"] += result.merged
    totals["reports"] += len(routed.reports)
    mark_routed(Session, batch_id)
