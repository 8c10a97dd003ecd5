"""A job opened as its file is read, resumed by a later run of the same file, kept alive.

The jobs of `jobs.run_local` and `jobs.submit`: opened unsealed, with the process that runs
them (`owner`) beating while it does; a job whose process is gone, or that an outage or ^C
stopped, is taken over by the next run of its file (`resume_job`). The batches and their
transitions are `pipeline.storage.ledger`'s.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import sessionmaker

import pipeline
from pipeline.moe.config import MoEConfig
from pipeline.storage.owner import Owner, interrupted
from pipeline.storage.run_knowledge import RunKnowledge
from pipeline.storage.sql import Job, Run

# -- jobs recorded as their file is read (`jobs.run_local`, `jobs.submit`) -----------------
# A job is opened unsealed, gets one batch per chunk of its file as the chunk is read
# (`add_batch`, idempotent by index, so that a resumed job reads its file again and finds the
# batches it has), and is sealed once the file is read: only a sealed job can complete.
STOPPED = "stopped: "  # the error of a job stopped by an outage or ^C: resumable


def open_job(Session: sessionmaker, config: MoEConfig, mode: str, device: str, items: int,
             owner: Owner | None = None, resume_key: str | None = None,
             resume_command: str | None = None) -> tuple[str, str]:
    """Record a run and an unsealed running job of ``items`` items; (run id, job id)."""
    with Session.begin() as s:
        run = Run(model_config=RunKnowledge.of(config).to_json(), code_version=pipeline.__version__,
                  device=device)
        job = Job(run=run, submitted_items=items, mode=mode, status="running", sealed=False,
                  resume_key=resume_key, resume_command=resume_command,
                  **_owned_by(owner))
        s.add_all([run, job])
        return run.id, job.id


def _owned_by(owner: Owner | None) -> dict[str, Any]:
    if owner is None:
        return {}
    return {"owner_host": owner.host, "owner_pid": owner.pid, "owner_start": owner.start,
            "heartbeat_at": time.time()}


def resume_job(Session: sessionmaker, resume_key: str, owner: Owner) -> tuple[str, str] | None:
    """Take over the latest job of ``resume_key`` that was interrupted (its process gone)
    or stopped (an outage, ^C); (run id, job id), or None if there is none. The takeover is
    one conditional UPDATE on what was seen, so of two runs of the same file exactly one
    resumes it (the other starts a job of its own)."""
    now = time.time()
    with Session() as s:
        jobs = s.scalars(select(Job).where(Job.resume_key == resume_key,
                                           Job.status.in_(("running", "failed")))
                         .order_by(Job.created_at.desc())).all()
    for job in jobs:
        seen: tuple[ColumnElement[bool], ...]
        if job.status == "running" and interrupted(job, now):
            seen = (Job.status == "running", Job.owner_pid == job.owner_pid,
                    Job.owner_host == job.owner_host,
                    Job.heartbeat_at == job.heartbeat_at if job.heartbeat_at is not None
                    else Job.heartbeat_at.is_(None))
        elif job.status == "failed" and (job.error or "").startswith(STOPPED):
            seen = (Job.status == "failed", Job.error == job.error)
        else:
            continue
        with Session.begin() as s:
            won = s.execute(update(Job).where(Job.id == job.id, *seen).values(
                status="running", error=None, finished_at=None, **_owned_by(owner))).rowcount
            if won:
                s.execute(update(Run).where(Run.id == job.run_id).values(
                    status="running", finished_at=None))
                return job.run_id, job.id
    return None


def beat_job(Session: sessionmaker, job_id: str, owner: Owner) -> bool:
    """The job's process is alive: one conditional UPDATE, a no-op (False) once the job is
    finished or another process has taken it over."""
    with Session.begin() as s:
        return bool(s.execute(update(Job).where(
            Job.id == job_id, Job.status == "running", Job.owner_pid == owner.pid,
            Job.owner_host == owner.host).values(heartbeat_at=time.time())).rowcount)
