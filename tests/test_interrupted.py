"""A local job whose process died is seen as dead, and running its file again resumes it.

`moe-pipeline run` is killed (SIGKILL: no handler runs, as after an out-of-memory kill or a
power cut) in the middle of a job; `status` must then show the job ``interrupted`` with the
command that resumes it, and that command must finish the same job with every item in the
graph exactly once, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import forkrun
import numpy as np
import pytest
from sqlalchemy import select

from pipeline.storage.owner import STALE_S, Owner, is_gone, process_start
from pipeline.storage.sql import Batch, Job, session_factory

ROOT = Path(__file__).resolve().parents[1]
ITEMS, BATCH = 160, 8


def _env(tmp_path: Path, graph, sql_url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "NEO4J_URI": graph.uri,
            "NEO4J_USERNAME": graph.auth[0], "NEO4J_PASSWORD": graph.auth[1],
            "NEO4J_DATABASE": graph.database or "", "DATABASE_URL": sql_url,
            "MOE_STATE_DIR": str(tmp_path), "MOE_DEVICE": "cpu", **extra}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return forkrun.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=300)


def _write_items(path: Path, prefix: str) -> list[str]:
    rng = np.random.default_rng(7)
    ids = [f"{prefix}-{i}" for i in range(ITEMS)]
    path.write_text("".join(json.dumps({"id": i, "vector": rng.standard_normal(16).round(4)
                                        .tolist()}) + "\n" for i in ids))
    return ids


def _completed_batches(Session) -> tuple[str | None, int]:
    with Session() as s:
        job = s.scalars(select(Job)).first()
        if job is None:
            return None, 0
        return job.id, sum(b.status == "completed" for b in job.batches)


@pytest.mark.deployments
def test_a_killed_run_is_interrupted_and_resumes_with_nothing_lost_or_doubled(
        tmp_path, graph, sql_url):
    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials to configure a run with")
    path = tmp_path / "items.jsonl"
    ids = _write_items(path, tmp_path.name)
    env = _env(tmp_path, graph, sql_url)
    Session = session_factory(sql_url)
    # Each batch's first attempt stalls 0.3 s: the job takes seconds, time to kill it.
    proc = forkrun.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path),
                          "--batch-size", str(BATCH)], cwd=ROOT,
                         env={**env, "MOE_FAULT_STALL_S": "0.3"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    job_id, done = None, 0
    while done < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        job_id, done = _completed_batches(Session)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()  # reaped: a zombie's pid would still be there
    with Session() as s:
        job = s.get(Job, job_id)
        assert job.status == "running"  # what SQL says: nobody lived to say otherwise
        assert job.owner_pid == proc.pid and job.owner_host == socket.gethostname()
        killed_at = sum(b.status == "completed" for b in job.batches)
    assert 3 <= killed_at < ITEMS // BATCH

    resume = f"moe-pipeline run {path.resolve()} --batch-size {BATCH}"
    listing = _cli(env, "status")
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if x.startswith(job_id))
    assert line.split()[1] == "interrupted" and line.endswith(f"(resume: {resume})"), line
    one = _cli(env, "status", job_id)
    assert f"job {job_id}: interrupted, {ITEMS} items" in one.stdout, one.stdout
    assert f"(resume: {resume})" in one.stdout

    again = _cli(env, *resume.split()[1:])
    assert again.returncode == 0, again.stderr
    assert f"job {job_id} completed: {ITEMS} items (0 bad)" in again.stdout, again.stdout
    with Session() as s:
        assert s.scalars(select(Job.id)).all() == [job_id]  # resumed, not a second job
        batches = s.scalars(select(Batch).where(Batch.job_id == job_id)
                            .order_by(Batch.index)).all()
        assert [b.index for b in batches] == list(range(ITEMS // BATCH))
        assert all(b.status == "completed" for b in batches)
        assert sorted(i for b in batches for i in b.item_ids) == sorted(ids)
    rows = graph.run_cypher(
        "MATCH (i:Insight)-[e:SUPPORTED_BY]->(s:Source) WHERE s.id IN $ids "
        "RETURN s.id AS id, count(e) AS edges", {"ids": ids})
    assert sorted(r["id"] for r in rows) == sorted(ids)  # every item, each once
    assert {r["edges"] for r in rows} == {1}
    assert _cli(env, "status", job_id).stdout.count("resume:") == 0


def test_liveness_by_pid_start_time_and_heartbeat():
    me = Owner.me()
    now = time.time()
    assert me.start == process_start(os.getpid()) and me.start is not None
    assert not is_gone(me, now, now)
    # The same pid, started at another time: a reused pid, not our process.
    assert is_gone(Owner(me.host, me.pid, str(int(me.start) + 1)), now, now)
    child = forkrun.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert is_gone(Owner(me.host, child.pid, None), now, now)
    # On another host only the heartbeat can tell.
    there = Owner("elsewhere", 1, "1")
    assert not is_gone(there, now - STALE_S / 2, now, host=me.host)
    assert is_gone(there, now - STALE_S - 1, now, host=me.host)
    assert is_gone(there, None, now, host=me.host)
