"""Run metadata in SQL: runs, jobs, batches, their metrics, and item errors.

SQLAlchemy 2.0 typed models. Alembic owns the schema (`migrate` applies it at start); the
same models run on SQLite (the embedded default, a file in the state dir) and PostgreSQL
(the stack), selected by ``DATABASE_URL``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
    true,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import NullPool

# Named constraints, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)

    def __init__(self, **kwargs: Any) -> None:
        # String ids are known from construction (a job's id goes back to the user before
        # the row is flushed), not only after the INSERT as a column default would be.
        columns = type(self).__table__.c
        if "id" in columns and columns.id.type.python_type is str and kwargs.get("id") is None:
            kwargs["id"] = new_id()
        for key, value in kwargs.items():  # what SQLAlchemy's default constructor does
            if not hasattr(type(self), key):
                raise TypeError(f"{key!r} is not an attribute of {type(self).__name__}")
            setattr(self, key, value)


class Run(Base):
    """One model configuration at work: the graph's Run node has the same id."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    # What the run keeps of its model (`run_knowledge.RunKnowledge`); rows written before the
    # config had parts hold the whole flat MoEConfig, and still read.
    model_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    code_version: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32), default="running")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    finished_at: Mapped[float | None] = mapped_column(Float)

    jobs: Mapped[list[Job]] = relationship(back_populates="run")


class Job(Base):
    """A user's submission: items split into batches."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    submitted_items: Mapped[int] = mapped_column(Integer)
    # "local" (moe-pipeline run, in one process) or "queued" (submit, Celery workers)
    mode: Mapped[str] = mapped_column(String(16), default="local")
    status: Mapped[str] = mapped_column(String(32), default="queued")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)
    finished_at: Mapped[float | None] = mapped_column(Float)
    # False while its batches are still being recorded (a file is read as it runs): a job
    # whose recorded batches are all done is complete only once it is sealed.
    sealed: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())

    # The process running a local job (`moe-pipeline run`): its host, pid and start time
    # (the pid alone may be reused), and when it last said it is alive. A job whose process
    # is gone is interrupted; `resume_key` (the file, its size and mtime, the batch size and
    # the model) finds it again when the same file is run again, `resume_command` says how.
    owner_host: Mapped[str | None] = mapped_column(String(255))
    owner_pid: Mapped[int | None] = mapped_column(Integer)
    owner_start: Mapped[str | None] = mapped_column(String(32))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    resume_key: Mapped[str | None] = mapped_column(String(64), index=True)
    resume_command: Mapped[str | None] = mapped_column(Text)

    run: Mapped[Run] = relationship(back_populates="jobs")
    batches: Mapped[list[Batch]] = relationship(back_populates="job",
                                                order_by="Batch.index")
    item_errors: Mapped[list[ItemError]] = relationship(back_populates="job")


class Batch(Base):
    """A slice of a job's items, the unit a GPU task works on."""

    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    item_ids: Mapped[list[str]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(64))
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)  # stage -> seconds
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)

    # The lease of the delivery working on it (`pipeline.storage.leases`): the broker's
    # delivery tag, the time its worker last said it is alive, and how many times a lapsed
    # lease was handed back to the broker.
    delivery: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    requeues: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    job: Mapped[Job] = relationship(back_populates="batches")
    metrics: Mapped[BatchMetrics | None] = relationship(back_populates="batch")
    parts: Mapped[list[BatchPart]] = relationship(back_populates="batch",
                                                  order_by="BatchPart.shard")


class BatchPart(Base):
    """A batch's reports for one shard: one librarian task's work. A batch is complete when
    every part is; parts count their own attempts (a part can be the poison one)."""

    __tablename__ = "batch_parts"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    shard: Mapped[str] = mapped_column(String(255), primary_key=True)
    status: Mapped[str] = mapped_column(String(32), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # its librarian task is on the broker (a redelivered GPU task sends only the others)
    dispatched: Mapped[bool] = mapped_column(Boolean, default=False)
    reports: Mapped[int] = mapped_column(Integer, default=0)
    new_insights: Mapped[int] = mapped_column(Integer, default=0)
    merged: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    worker: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)

    # The lease of the delivery working on it (`pipeline.storage.leases`): the broker's
    # delivery tag, the time its worker last said it is alive, and how many times a lapsed
    # lease was handed back to the broker.
    delivery: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    requeues: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    batch: Mapped[Batch] = relationship(back_populates="parts")


class BatchMetrics(Base):
    """What a batch did to the model and the graph."""

    __tablename__ = "batch_metrics"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    # NULL where the figure came out NaN or infinite (never stored as if it were one):
    # the batch's good items still count.
    balance_loss: Mapped[float | None] = mapped_column(Float)
    routing_entropy: Mapped[float | None] = mapped_column(Float)
    expert_usage: Mapped[dict[str, float | None]] = mapped_column(JSON)  # expert -> share
    reports: Mapped[int] = mapped_column(Integer)
    new_insights: Mapped[int] = mapped_column(Integer)
    merged: Mapped[int] = mapped_column(Integer)
    dedup_rate: Mapped[float] = mapped_column(Float)

    batch: Mapped[Batch] = relationship(back_populates="metrics")


class ItemError(Base):
    """A bad input item: which one, which field, what was wrong."""

    __tablename__ = "item_errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    item_id: Mapped[str | None] = mapped_column(String(255))
    line: Mapped[int | None] = mapped_column(Integer)
    field: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="item_errors")


class Forget(Base):
    """One forget: what was asked (sources, or a job's), when, and what it changed. A job's
    own rows stay; this says what of it was taken back. ``finished_at`` is NULL while it runs
    (or after it was killed: running it again finishes it)."""

    __tablename__ = "forgets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    # the job forgotten (``forget --job``), else NULL: sources named by id or by a file
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    source_ids: Mapped[list[str]] = mapped_column(JSON)  # the ids asked for
    # what it changed: sources, supports, insights removed and re-represented, unknown ids
    counts: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    finished_at: Mapped[float | None] = mapped_column(Float)


def make_engine(url: str, pooled: bool = True) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys on and a busy timeout for workers.
    ``pooled=False`` keeps no connection open between uses (for a process that forks)."""
    extra: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Made owner-only before SQLite opens it: SQLite gives its -wal, -shm and
            # -journal files the database file's mode, so the ledger stays private
            # whatever the process's umask. Only when it does not exist yet: closing any
            # descriptor of a file drops every POSIX lock this process holds on it, so
            # opening and closing a database this process already uses would take SQLite's
            # locks away from under its connections (another process then believes itself
            # alone, rebuilds the WAL index, and each side stops seeing the other's commits).
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        engine = create_engine(url, connect_args={"timeout": 30}, **extra)

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL keeps it consistent; fewer fsyncs
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **extra)


def alembic_config(url: str):
    """An Alembic config for ``url`` that finds the migrations inside the package."""
    import sys

    from alembic.config import Config

    # Alembic's default stream is the sys.stdout of the moment it was first imported, which
    # may since have been replaced and closed (a test's capture, a daemon's redirect).
    cfg = Config(stdout=sys.stdout)
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# PostgreSQL advisory lock key of migrations: any 64-bit number, the same in every process.
MIGRATION_LOCK = 0x6D6F652D6D6967  # "moe-mig"


@contextlib.contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    """Held while one process migrates: two processes starting on an empty database would
    otherwise both create the tables and one would fail. PostgreSQL: an advisory lock;
    SQLite: a lock file beside the database; others: none."""
    if url.startswith("postgresql"):
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
        finally:
            engine.dispose()
        return
    path = url.split("///", 1)[-1].split("?", 1)[0] if url.startswith("sqlite") else ""
    if not path or path == ":memory:":
        yield
        return
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(f"{path}.migrate-lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (applied by the application and by
    each worker at start), one process at a time."""
    from alembic import command

    with _migration_lock(url):
        command.upgrade(alembic_config(url), revision)


def session_factory(url: str, run_migrations: bool = True, pooled: bool = True
                    ) -> sessionmaker:
    """Migrate (by default) and return a session factory bound to ``url``."""
    if run_migrations:
        migrate(url)
    return sessionmaker(make_engine(url, pooled), expire_on_commit=False)
