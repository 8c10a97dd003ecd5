"""Jobs: a file of items, split into batches, run through the stages, recorded in SQL.

Two ways to run one code path (`pipeline.stages`). `run_local` (the embedded default,
``moe-pipeline run``) routes each batch in this process and curates its shard parts at once;
`submit` (``moe-pipeline submit``) records the job and queues one GPU task per batch for the
Celery workers (`pipeline.queue`). `wait` and `progress` follow a job in SQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import sessionmaker

from pipeline import stages
from pipeline.errors import PipelineError
from pipeline.inputs import read_items
from pipeline.queue.app import ROUTE_BATCH, make_app
from pipeline.queue.messages import batch_message
from pipeline.records import BadItem, Item, ItemBatch, ShardPart
from pipeline.redact import masked
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from pipeline.storage import ledger
from pipeline.storage.graph import GraphUnavailable
from pipeline.storage.ledger import JobFailed, NewJob, Progress, progress
from pipeline.storage.locks import LockTimeout

__all__ = ["JobFailed", "JobSummary", "NewJob", "Progress", "progress", "run_local", "submit",
           "wait"]

# A JSONL file, a list of item dicts, or what `read_items` already made of one (a file that
# can be read only once, a pipe or a FIFO, is read once by the caller and passed on so).
Source = str | Path | list[dict[str, Any]] | tuple[list[Item], list[BadItem]]


def _read(source: Source, settings: Settings) -> tuple[list[Item], list[BadItem]]:
    if isinstance(source, tuple):
        return source
    return read_items(source, settings.vector_dim)


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


def _batch_size(batch_size: int | None, settings: Settings) -> int:
    """The batch size asked for, else the settings'; one under 1 is refused (a negative one
    made `range(0, n, size)` empty: the job ran nothing and stayed running for ever)."""
    if batch_size is None:
        return settings.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PipelineError(f"batch size {batch_size!r}: must be a whole number, 1 or more")
    return batch_size


def submit(source: Source, settings: Settings, batch_size: int | None = None) -> NewJob:
    """Record a job and queue one GPU task per batch; returns at once (see `wait`).

    The broker is checked before anything is recorded, so an unreachable one is one clear
    error and no job is left behind that no worker will ever see.
    """
    batch_size = _batch_size(batch_size, settings)
    app = make_app(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as err:  # kombu raises its own or the transport's error
        raise PipelineError(f"broker {masked(settings.broker_url())} unreachable: {err}") from err
    items, bad = _read(source, settings)
    with Runtime.from_settings(settings) as rt:
        job = ledger.create_job(rt.Session, items, bad, rt.config, "queued", batch_size,
                                "queued")
        sent = 0
        try:
            with app.producer_or_acquire() as producer:
                for batch_id, chunk in job.batches:
                    batch = ItemBatch(batch_id, job.job_id, job.run_id, rt.fingerprint, chunk)
                    app.send_task(ROUTE_BATCH, args=[batch_message(batch)], producer=producer)
                    sent += 1
        except BaseException as err:  # the broker went away, or ^C: no job left half-sent
            ledger.fail_unsent(rt.Session, [batch_id for batch_id, _ in job.batches[sent:]])
            ledger.fail_job(rt.Session, job.job_id, f"submission interrupted after {sent} "
                            f"of {len(job.batches)} batches: {type(err).__name__}: {err}")
            if isinstance(err, Exception):
                raise PipelineError(f"job {job.job_id}: sending to {masked(settings.broker_url())} "
                                    f"failed after {sent} of {len(job.batches)} batches "
                                    f"({err}); the job is marked failed") from err
            raise
    return job


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


def run_local(source: Source, settings: Settings, batch_size: int | None = None,
              progress: Callable[[int], None] | None = None) -> JobSummary:
    """Run a job in this process; ``progress(n)`` is told as each batch's n items finish."""
    batch_size = _batch_size(batch_size, settings)
    start = time.perf_counter()
    items, bad = _read(source, settings)
    with Runtime.from_settings(settings) as rt:
        job = ledger.create_job(rt.Session, items, bad, rt.config, "local", batch_size,
                                rt.device)
        totals = {"reports": 0, "inserted": 0, "merged": 0}

        def ship(part: ShardPart) -> None:  # curate at once, in this process
            result = stages.curate_part(rt, part)
            totals["reports"] += len(part.reports)
            totals["inserted"] += result.get("inserted", 0)
            totals["merged"] += result.get("merged", 0)

        try:
            for batch_id, chunk in job.batches:
                batch = ItemBatch(batch_id, job.job_id, job.run_id, rt.fingerprint, chunk)
                try:
                    stages.route_batch(rt, batch, ship)
                except (GraphUnavailable, LockTimeout):
                    raise  # an outage, not this batch's fault: stop the run
                except PipelineError as err:  # this batch's fault: record it, go on
                    ledger.fail_batch(rt.Session, batch_id, str(err))
                if progress:
                    progress(len(chunk))
        except BaseException as err:  # an outage or an interrupt: the job must not look alive
            ledger.fail_job(rt.Session, job.job_id, f"stopped: {type(err).__name__}: {err}")
            if isinstance(err, GraphUnavailable | LockTimeout):
                raise PipelineError(
                    f"{err}; job {job.job_id} stopped and is marked failed: once the graph "
                    "answers again, run the same file again to finish it (what was written "
                    "is not written twice)") from err
            raise
        status = ledger.job_status(rt.Session, job.job_id)
        bad_count = ledger.bad_item_count(rt.Session, job.job_id)
    if status == "failed":
        raise JobFailed(f"job {job.job_id}: every batch failed; see "
                        f"`moe-pipeline status {job.job_id}`")
    return JobSummary(job.job_id, job.run_id, status, len(items), bad_count, totals["reports"],
                      totals["inserted"], totals["merged"], time.perf_counter() - start)
