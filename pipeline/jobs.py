"""Jobs: a file of items, split into batches, run through the stages, recorded in SQL.

Two ways to run one code path (`pipeline.stages`). `run_local` (the embedded default,
``moe-pipeline run``) routes each batch in this process and curates its shard parts at once;
`submit` (``moe-pipeline submit``) records the job and queues one GPU task per batch for the
Celery workers (`pipeline.queue`). `wait` and `progress` follow a job in SQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from pipeline import stages
from pipeline.errors import PipelineError, is_outage, outage_errors
from pipeline.inputs import Chunk, read_chunks, read_items, survey
from pipeline.queue.app import ROUTE_BATCH, make_app
from pipeline.queue.messages import batch_message
from pipeline.records import BadItem, Item, ItemBatch
from pipeline.redact import masked
from pipeline.runtime import Runtime, worker_name
from pipeline.settings import Settings
from pipeline.storage import ledger
from pipeline.storage.ledger import JobFailed, NewJob, Progress, progress
from pipeline.storage.owner import HEARTBEAT_S, Owner

__all__ = ["JobFailed", "JobSummary", "NewJob", "Progress", "QueuedJob", "progress",
           "run_local", "submit", "wait"]

# A JSONL file, a list of item dicts, or what `read_items` already made of one.
Source = str | Path | list[dict[str, Any]] | tuple[list[Item], list[BadItem]]
FIRST_BAD = 3  # bad items kept in memory to say why a job had no good item


@dataclass
class Reading:
    """A job's items as it reads them: how many (good and bad), chunks of a batch size, and
    the file, when the job can be resumed from it (a regular file that was not spooled)."""

    items: int
    chunks: Callable[[int], Iterator[Chunk]]
    path: Path | None


@contextlib.contextmanager
def reading(source: Source, settings: Settings) -> Iterator[Reading]:
    """Open a job's source for reading in chunks, in memory bounded by a chunk.

    A file is read twice: a first pass counts its items and finds its vector width
    (`inputs.survey`; the width is the majority of the whole file, and the count is the
    job's size that `status` and the progress bar show from the start), the second reads it
    a chunk at a time. A file that can be read only once (a pipe, a FIFO) is first copied
    to an owner-only file in the state dir's ``spool/``, removed afterwards."""
    if isinstance(source, list):
        source = read_items(source, settings.vector_dim)
    if isinstance(source, tuple):
        items, bad = source
        yield Reading(len(items) + len(bad), lambda size: _in_chunks(items, bad, size), None)
        return
    path = Path(source)
    spooled = None
    if not path.is_file():
        spool = settings.state_dir / "spool"
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(suffix=".jsonl", dir=spool)  # mode 0600
        with os.fdopen(fd, "wb") as out, path.open("rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
        spooled = path = Path(name)
    try:
        found = survey(path, settings.vector_dim)
        yield Reading(found.items, lambda size: read_chunks(path, found, size),
                      None if spooled else path.resolve())
    finally:
        if spooled:
            spooled.unlink(missing_ok=True)


def _in_chunks(items: list[Item], bad: list[BadItem], size: int) -> Iterator[Chunk]:
    """Items already in memory, in the chunks `read_chunks` gives (bad ones with the first)."""
    for index in range(0, max(len(items), 1), size):
        yield items[index: index + size], bad if index == 0 else []


def _resume(reading: Reading, settings: Settings, batch_size: int,
            fingerprint: str) -> tuple[str | None, str | None]:
    """The key that finds this job again when the same file is run again (the file, its
    size and modification time, the batch size, the model), and the command that does so;
    (None, None) for a source that cannot be read again."""
    if reading.path is None:
        return None, None
    st = reading.path.stat()
    key = hashlib.sha256(json.dumps([str(reading.path), st.st_size, st.st_mtime_ns,
                                     batch_size, settings.vector_dim, fingerprint])
                         .encode()).hexdigest()
    model = f" --model {shlex.quote(str(settings.model_path))}" if settings.model_path else ""
    return key, (f"moe-pipeline{model} run {shlex.quote(str(reading.path))} "
                 f"--batch-size {batch_size}")


class Beating:
    """A timer thread that says every `owner.HEARTBEAT_S` seconds that this process still
    runs the job (a batch through the model may take longer than that)."""

    def __init__(self, Session: sessionmaker, job_id: str, owner: Owner) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(Session, job_id, owner),
                                        name=f"heartbeat-{job_id}", daemon=True)

    def _beat(self, Session: sessionmaker, job_id: str, owner: Owner) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                ledger.beat_job(Session, job_id, owner)
            except SQLAlchemyError:
                # A missed beat only: the next one retries, and an outage that lasts is
                # reported by the job's own next write, which fails the same way.
                continue

    def __enter__(self) -> Beating:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


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


@dataclass
class QueuedJob:
    run_id: str
    job_id: str
    batches: int
    items: int  # good items, in its batches


def submit(source: Source, settings: Settings, batch_size: int | None = None) -> QueuedJob:
    """Record a job and queue one GPU task per batch as its file is read; returns once
    every batch is on the broker (see `wait`).

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
    with reading(source, settings) as read, Runtime.from_settings(settings) as rt:
        run_id, job_id = ledger.open_job(rt.Session, rt.config, "queued", "queued", read.items)
        sent = good = bad_count = 0
        first_bad: list[BadItem] = []
        pending: str | None = None
        try:
            with app.producer_or_acquire() as producer:
                for index, (chunk, bad) in enumerate(read.chunks(batch_size)):
                    bad_count += len(bad)
                    first_bad += bad[:FIRST_BAD - len(first_bad)]
                    pending, _ = ledger.add_batch(rt.Session, job_id, index, chunk, bad)
                    if pending is None:
                        continue
                    batch = ItemBatch(pending, job_id, run_id, rt.fingerprint, chunk)
                    app.send_task(ROUTE_BATCH, args=[batch_message(batch)], producer=producer)
                    pending = None
                    sent += 1
                    good += len(chunk)
        except BaseException as err:  # the broker went away, or ^C: no job left half-sent
            if pending is not None:
                ledger.fail_unsent(rt.Session, [pending])
            ledger.fail_job(rt.Session, job_id, f"submission interrupted after {sent} "
                            f"batches: {type(err).__name__}: {err}")
            ledger.seal_job(rt.Session, job_id)
            if isinstance(err, Exception):
                raise PipelineError(f"job {job_id}: sending to {masked(settings.broker_url())} "
                                    f"failed after {sent} batches ({err}); the job is "
                                    "marked failed") from err
            raise
        if not sent:
            ledger.fail_empty_job(rt.Session, job_id, first_bad, bad_count)
        ledger.seal_job(rt.Session, job_id)
    return QueuedJob(run_id, job_id, sent, good)


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
              progress: Callable[[int, int], None] | None = None,
              on_open: Callable[[str], None] | None = None) -> JobSummary:
    """Run a job in this process, reading its file a chunk at a time.

    ``progress(n, total)`` is told as each chunk's n items (good and bad) are done. The job
    records this process and beats while it runs; if the process dies, `status` shows the
    job interrupted, and running the same file again resumes it: batches already done are
    skipped, the rest are (re)done, nothing is written twice (`ledger.resume_job`).
    ``on_open(job_id)`` is told the job's id as soon as it is recorded (the API answers
    with it while the job runs on)."""
    batch_size = _batch_size(batch_size, settings)
    start = time.perf_counter()
    owner = Owner.me()
    with reading(source, settings) as read, Runtime.from_settings(settings) as rt:
        key, command = _resume(read, settings, batch_size, rt.fingerprint)
        ids = ledger.resume_job(rt.Session, key, owner) if key else None
        run_id, job_id = ids or ledger.open_job(rt.Session, rt.config, "local", rt.device,
                                                read.items, owner, key, command)
        if on_open:
            on_open(job_id)
        with Beating(rt.Session, job_id, owner):
            totals = _run_chunks(rt, read, run_id, job_id, batch_size, progress)
        status, bad_count = ledger.job_outcome(rt.Session, job_id)
    if status == "failed":
        raise JobFailed(f"job {job_id}: every batch failed; see "
                        f"`moe-pipeline status {job_id}`")
    return JobSummary(job_id, run_id, status, totals["items"], bad_count, totals["reports"],
                      totals["inserted"], totals["merged"], time.perf_counter() - start)


def _run_chunks(rt: Runtime, read: Reading, run_id: str, job_id: str, batch_size: int,
                progress: Callable[[int, int], None] | None) -> dict[str, int]:
    """Record and route each chunk of the job in turn, then seal it; counts for the
    summary (``items``: the good ones)."""
    totals = {"items": 0, "reports": 0, "inserted": 0, "merged": 0}
    bad_count = 0
    first_bad: list[BadItem] = []

    claim = ledger.Claim(worker_name(), rt.device, rt.settings.max_attempts)
    try:
        for index, (chunk, bad) in enumerate(read.chunks(batch_size)):
            bad_count += len(bad)
            first_bad += bad[:FIRST_BAD - len(first_bad)]
            totals["items"] += len(chunk)
            # Recorded and claimed in one transaction (a resumed job's batch done before
            # answers "done"), then routed and curated here in two more.
            batch_id, verdict, attempts = ledger.claim_batch(rt.Session, job_id, index, chunk,
                                                             bad, claim)
            if batch_id is not None and verdict == "run":
                batch = ItemBatch(batch_id, job_id, run_id, rt.fingerprint, chunk)
                try:
                    done = stages.run_batch(rt, batch, attempts)
                    for key in ("reports", "inserted", "merged"):
                        totals[key] += done.get(key, 0)
                except outage_errors():
                    raise  # an outage, not this batch's fault: stop the run
                except PipelineError as err:  # this batch's fault: record it, go on
                    ledger.fail_batch(rt.Session, batch_id, str(err))
            if progress:
                progress(len(chunk) + len(bad), read.items)
        if not totals["items"]:
            ledger.fail_empty_job(rt.Session, job_id, first_bad, bad_count)
        ledger.seal_job(rt.Session, job_id)
    except JobFailed:
        raise
    except BaseException as err:  # an outage or an interrupt: the job must not look alive
        try:
            ledger.fail_job(rt.Session, job_id, f"{ledger.STOPPED}{type(err).__name__}: {err}")
        except outage_errors():
            pass  # SQL is the outage: the job's heartbeat stops, so it shows interrupted
        if is_outage(err):
            raise PipelineError(
                f"{' '.join(str(err).split())}; job {job_id} stopped and is marked failed: "
                "once it answers again, run the same file again to finish it (what was "
                "written is not written twice)") from err
        raise
    return totals
