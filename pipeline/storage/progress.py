"""The ledger read back: a job's progress and outcome, what a run keeps of its model, and
its statistics rows.

What `pipeline.storage.ledger` writes, read in one session each, for `status`, `wait`, the
end of a run, and `stats`; nothing here changes a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from pipeline.errors import PipelineError
from pipeline.storage.run_knowledge import RunKnowledge
from pipeline.storage.sql import Batch, BatchMetrics, BatchPart, ItemError, Job, Run

DONE_BATCH = ("completed", "failed")


def run_knowledge(Session: sessionmaker, run_id: str) -> RunKnowledge:
    """The knowledge settings and constellations a run was recorded with."""
    with Session() as s:
        data = s.scalar(select(Run.model_config).where(Run.id == run_id))
    if data is None:
        raise PipelineError(f"run {run_id}: not in SQL (a message for another database?)")
    return RunKnowledge.from_json(data, run_id)


def bad_item_count(Session: sessionmaker, job_id: str) -> int:
    """The job's bad items: refused at validation, or failed alone inside a batch."""
    with Session() as s:
        return s.scalar(select(func.count()).select_from(ItemError).where(
            ItemError.job_id == job_id))


def job_status(Session: sessionmaker, job_id: str) -> str:
    with Session() as s:
        return s.get(Job, job_id).status



def job_outcome(Session: sessionmaker, job_id: str) -> tuple[str, int]:
    """The job's status and its bad items, in one read (what a run reports at its end)."""
    with Session() as s:
        status = s.scalar(select(Job.status).where(Job.id == job_id))
        return status, s.scalar(select(func.count()).select_from(ItemError).where(
            ItemError.job_id == job_id))


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


@dataclass
class RunRows:
    """A run's batches with their metrics, and its reports per shard: what stats read."""

    run_id: str
    jobs: int
    batches: list[tuple[int, Any]]  # (items in the batch, its BatchMetrics)
    shard_reports: list[tuple[str, int]]


def run_job_ids(Session: sessionmaker, run_id: str) -> list[str]:
    with Session() as s:
        return list(s.scalars(select(Job.id).where(Job.run_id == run_id)))


def run_rows(Session: sessionmaker, run_id: str | None = None) -> RunRows:
    """The rows behind a run's statistics (default: the latest run)."""
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
    return RunRows(run_id, n_jobs or 0, [(len(b.item_ids), m) for b, m in rows],
                   [(shard, int(n or 0)) for shard, n in parts])
