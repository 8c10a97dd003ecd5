"""A worker on a database nobody migrated yet: the schema is brought to head once, whoever
starts first, instead of every task failing on a missing table until the first `submit`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import forkrun
import pytest
from sqlalchemy import create_engine, inspect

MIGRATE = "import sys; from pipeline.storage.sql import migrate; migrate(sys.argv[1])"


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_started_together_all_succeed(sql_url):
    """Four processes migrating one empty database at once (four workers starting, or
    submits racing): each waits for the one that holds the lock, and all end at head."""
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, sql_url], stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-1500:] for e in errors)
    assert {"jobs", "batches", "alembic_version"} <= _tables(sql_url)


@pytest.mark.parametrize("sql_url", ["postgresql"], indirect=True)
def test_a_worker_migrates_an_empty_database_at_start(sql_url, redis_url, redis_prefix,
                                                     tmp_path):
    """A librarian worker started on an empty PostgreSQL database migrates it before its
    first task, and its log never shows a missing table."""
    env = {**os.environ, "DATABASE_URL": sql_url, "CELERY_BROKER_URL": redis_url,
           "REDIS_URL": redis_url, "MOE_REDIS_PREFIX": redis_prefix,
           "MOE_STATE_DIR": str(tmp_path / "state")}
    env.pop("NEO4J_URI", None)
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = forkrun.Popen([sys.executable, "-m", "pipeline.cli", "worker", "librarian",
                                "--shards", f"start-{os.getpid()}"], env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "batches" not in _tables(sql_url) and time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert {"jobs", "batches", "batch_parts"} <= _tables(sql_url), log.read_text()[-3000:]
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        # The graph server the worker started for its state dir outlives it, by design.
        forkrun.run([sys.executable, "-m", "pipeline.cli", "down"], env=env,
                    capture_output=True, timeout=120)
    text = log.read_text()
    assert "ready" in text, text[-3000:]
    assert "does not exist" not in text and "no such table" not in text, text[-3000:]
