"""The queued pipeline with real Celery workers on a real Redis broker.

Workers are real processes (`moe-pipeline worker ...`) started by the tests, against the
session's embedded graph server, a fresh SQLite file and the suite's Redis database
(``MOE_TEST_REDIS_URL``, see conftest), in which each stack's keys carry a prefix of its own
(``MOE_REDIS_PREFIX``) and are the only ones it deletes.
The crash tests kill them with SIGKILL mid-batch and check that the graph holds exactly the
reports one clean run would write: each once, none missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import forkrun
import numpy as np
import pytest
from conftest import delete_redis_keys, new_redis_prefix
from sqlalchemy import select

from pipeline import jobs, serving, stages
from pipeline.errors import PipelineError
from pipeline.inputs import read_items
from pipeline.settings import Settings
from pipeline.storage.sql import Batch, BatchPart, ItemError, Job, session_factory

# Real Celery worker processes on the local Redis: every test here is an integration test.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


class Stack:
    """Environment and worker processes of one test's queued pipeline."""

    def __init__(self, tmp_path: Path, graph, redis_url: str, neo4j_uri: str | None = None,
                 broker_url: str | None = None):
        self.tmp, self.redis_url = tmp_path, redis_url
        # Keys of this stack's own in a database others share: nothing is flushed.
        self.prefix = new_redis_prefix()
        self.env = {**os.environ, "MOE_STATE_DIR": str(tmp_path / "state"),
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'runs.sqlite3'}",
                    "CELERY_BROKER_URL": broker_url or redis_url, "REDIS_URL": redis_url,
                    "MOE_REDIS_PREFIX": self.prefix,
                    "NEO4J_URI": neo4j_uri or graph.uri, "NEO4J_USERNAME": graph.auth[0],
                    "NEO4J_PASSWORD": graph.auth[1] or "", "MOE_DEVICE": "cpu",
                    "PYTHONUNBUFFERED": "1"}
        if graph.database:
            self.env["NEO4J_DATABASE"] = graph.database
        self.graph = graph
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def settings(self) -> Settings:
        keep = {k: v for k, v in self.env.items() if k not in os.environ or os.environ[k] != v}
        with _environ(keep):
            return Settings()

    def worker(self, kind: str, **env: str) -> subprocess.Popen:
        """Start a worker of ``kind`` and wait until it is ready."""
        return self.workers((kind, env))[0]

    def workers(self, *specs: str | tuple) -> list[subprocess.Popen]:
        """Start workers (each a kind, or a kind, its extra environment and optionally its
        extra arguments) side by side, then wait until every one is ready: their imports
        and model loads overlap."""
        started = []
        for spec in specs:
            kind, env, args = (spec, {}, ()) if isinstance(spec, str) else (*spec, ())[:3]
            log = self.tmp / f"{kind}-{len(self.procs)}.log"
            proc = forkrun.Popen(
                [sys.executable, "-m", "pipeline.cli", "worker", kind, "--loglevel", "INFO",
                 *args],
                cwd=self.tmp, env={**self.env, **env}, stdout=log.open("w"),
                stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append((proc, log))
            started.append((kind, proc, log))
        deadline = time.monotonic() + 90
        for kind, proc, log in started:
            while " ready." not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{kind} worker did not start:\n{log.read_text()}")
                time.sleep(0.2)
        return [proc for _, proc, _ in started]

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the whole worker: its main process and its pool."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def secrets_in_logs(self) -> list[str]:
        """Passwords of this stack's URLs found in any worker log (there must be none)."""
        from urllib.parse import urlsplit

        found = []
        for name in ("CELERY_BROKER_URL", "REDIS_URL", "DATABASE_URL"):
            password = urlsplit(self.env.get(name, "")).password
            if password and any(f":{password}@" in log.read_text(errors="replace")
                                for _, log in self.procs):
                found.append(name)
        return found

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                         for _, log in self.procs)

    def close(self) -> None:
        """Take the stack down: SIGKILL, not a warm shutdown, because nothing of it is kept
        (its SQL, state dir and keys go with it) and a warm shutdown waits for the task in
        hand, seconds to a timeout where a test left a stalled or retrying one behind."""
        for proc, _ in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc, _ in self.procs:
            proc.wait(timeout=15)
        delete_redis_keys(self.redis_url, self.prefix)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _items(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((6, 16))
    return [{"id": f"q{seed}-{i}", "vector": (topics[i % 6] + 0.05 * rng.standard_normal(16))
             .round(5).tolist()} for i in range(n)]


def _expected_reports(settings: Settings, job_id: str, raw: list[dict]) -> dict[str, str]:
    """What one clean run of the job drafts: report id -> shard (the model is deterministic)."""
    items, _ = read_items(raw)
    system = serving.load_system(settings, "cpu")
    x = stages.encode(items, system.config.input_dim, settings.seed)
    return {r.id: r.constellation for r in stages.route(system, x, items, job_id).reports}


def _graph_reports(graph, job_id: str) -> list[str]:
    rows = graph.run_cypher("MATCH (:Insight)-[e:SUPPORTED_BY]->(:Source) "
                            "WHERE e.job_id = $job RETURN e.report_id AS report",
                            {"job": job_id})
    return [r["report"] for r in rows]


def _wait(stack: Stack, job_id: str, timeout_s: float = 120) -> jobs.Progress:
    Session = session_factory(stack.settings().sql_url(), run_migrations=False)
    try:
        return jobs.wait(Session, job_id, timeout_s, poll_s=0.2)
    except PipelineError as err:
        raise AssertionError(f"{err}\n{stack.logs()}") from err


def _submit(stack: Stack, raw: list[dict], batch_size: int) -> jobs.NewJob:
    return jobs.submit(raw, stack.settings(), batch_size)


def test_queued_job_end_to_end_then_query_and_similar(stack):
    stack.workers("gpu", "librarian", "query")
    raw = _items(90, seed=11) + [{"id": "bad", "vector": [1.0, float("nan")]}]
    path = stack.tmp / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in raw) + "\n{not json\n")
    cli = [sys.executable, "-m", "pipeline.cli"]
    out = forkrun.run(cli + ["submit", str(path), "--batch-size", "32", "--wait",
                             "--timeout", "120"], cwd=stack.tmp, env=stack.env,
                      capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr + stack.logs()
    job_id = out.stdout.split()[1]
    assert "completed_with_errors: 3/3 batches completed" in out.stdout
    settings = stack.settings()
    Session = session_factory(settings.sql_url(), run_migrations=False)
    with Session() as s:
        job = s.get(Job, job_id)
        assert job.mode == "queued" and job.status == "completed_with_errors"
        assert "2 bad items" in job.error
        errors = {(e.line, e.field) for e in s.scalars(select(ItemError).where(
            ItemError.job_id == job_id))}
        assert errors == {(91, "vector"), (92, "line")}
        assert all(b.status == "completed" and b.attempts == 1 and b.metrics.reports > 0
                   and set(b.timings) >= {"encode", "route", "curate"} for b in job.batches)
        parts = s.scalars(select(BatchPart).join(Batch).where(Batch.job_id == job_id)).all()
        assert parts and all(p.status == "done" and p.attempts == 1 for p in parts)
    expected = _expected_reports(settings, job_id, raw[:90])
    found = _graph_reports(stack.graph, job_id)
    assert sorted(found) == sorted(expected)  # every report once, none missing

    query = forkrun.run(cli + ["query", "MATCH (i:Insight)-[e:SUPPORTED_BY]->(s:Source) "
                               "WHERE e.job_id = $job RETURN count(DISTINCT s) AS n",
                               "--param", f"job={json.dumps(job_id)}", "--json"],
                        cwd=stack.tmp, env=stack.env, capture_output=True, text=True)
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout) == {"n": 90}
    (stack.tmp / "v.json").write_text(json.dumps(raw[0]["vector"]))
    for mode in ("--queue", "--local"):
        hit = forkrun.run(cli + ["similar", "--vector-file", str(stack.tmp / "v.json"),
                                 "--k", "3", "--json", mode], cwd=stack.tmp,
                          env=stack.env, capture_output=True, text=True, timeout=120)
        assert hit.returncode == 0, hit.stderr + stack.logs()
        hits = [json.loads(line) for line in hit.stdout.splitlines()]
        # The item's own report was inserted into, or merged into, an insight at least as
        # close as the dedup threshold, so that insight is among the nearest.
        mine = [h for h in hits if raw[0]["id"] in _sources_of(stack.graph, h["node_id"])]
        assert mine and mine[0]["similarity"] >= settings_threshold() - 1e-3, hits


def settings_threshold() -> float:
    return serving.default_config().dedup_threshold


def _sources_of(graph, insight_id: str) -> set[str]:
    rows = graph.run_cypher("MATCH (i:Insight {id: $id})-[:SUPPORTED_BY]->(s:Source) "
                            "RETURN s.id AS id", {"id": insight_id})
    return {r["id"] for r in rows}


def _running_batch(Session, job_id: str, timeout_s: float = 60) -> Batch:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with Session() as s:
            batch = s.scalars(select(Batch).where(Batch.job_id == job_id,
                                                  Batch.status == "running")).first()
            if batch is not None:
                return batch
        time.sleep(0.05)
    raise AssertionError(f"no batch of job {job_id} started running")


@pytest.mark.backends("neo4j")
def test_killed_pool_process_is_requeued_at_once_and_nothing_doubles(stack):
    stack.workers(("gpu", {"MOE_FAULT_STALL_S": "4"}), "librarian")
    raw = _items(60, seed=12)
    job = _submit(stack, raw, batch_size=20)
    Session = session_factory(stack.settings().sql_url(), run_migrations=False)
    victim = _running_batch(Session, job.job_id)
    os.kill(int(victim.worker.rsplit(":", 1)[1]), signal.SIGKILL)  # the pool process only
    state = _wait(stack, job.job_id)
    assert state.status == "completed", stack.logs()
    with Session() as s:
        attempts = {b.id: b.attempts for b in s.get(Job, job.job_id).batches}
    assert attempts[victim.id] == 2 and sorted(attempts.values()) == [1, 1, 2]
    expected = _expected_reports(stack.settings(), job.job_id, raw)
    assert sorted(_graph_reports(stack.graph, job.job_id)) == sorted(expected)


@pytest.fixture
def rabbitmq_url():
    """A RabbitMQ vhost of the test's own (TEST_RABBITMQ_URL names a server; the default is
    the local one as guest/guest). The vhost is made with ``rabbitmqctl`` where this
    machine's user may run it, and removed after."""
    import uuid

    import kombu

    base = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
    vhost = f"moe-test-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["rabbitmqctl", "add_vhost", vhost], capture_output=True,
                          timeout=60).returncode == 0 if _which("rabbitmqctl") else False
    if made:
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost,
                        base.split("://", 1)[1].split(":", 1)[0], ".*", ".*", ".*"],
                       capture_output=True, timeout=60, check=True)
    url = f"{base}/{vhost}" if made else f"{base}//"
    try:
        with kombu.Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
            if not made:  # the shared default vhost: start from empty queues of ours
                for queue in ("gpu", "query", "librarian.alpha", "librarian.beta"):
                    with contextlib.suppress(Exception):
                        conn.default_channel.queue_purge(queue)
    except Exception as err:
        pytest.skip(f"no RabbitMQ at {base}: {err}")
    yield url
    if made:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)


def _which(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


def _kill_mid_batch_and_restart(stack: Stack, raw: list[dict]) -> tuple[str, str, float]:
    """SIGKILL the whole GPU worker (main process and pool) while it holds a batch, start
    another, and return (job id, the victim batch, seconds from the restart to the end)."""
    gpu, _ = stack.workers(("gpu", {"MOE_FAULT_STALL_S": "3"}), "librarian")
    job = _submit(stack, raw, batch_size=20)
    Session = session_factory(stack.settings().sql_url(), run_migrations=False)
    victim = _running_batch(Session, job.job_id)
    stack.kill(gpu)  # nobody is left to requeue the message: the broker or a lease must
    stack.worker("gpu")
    restarted = time.monotonic()
    state = _wait(stack, job.job_id, timeout_s=150)
    assert state.status == "completed", stack.logs()
    return job.job_id, victim.id, time.monotonic() - restarted


@pytest.mark.backends("neo4j")
def test_a_worker_killed_whole_on_redis_gets_its_batch_back_through_its_lease(
        stack, record_property):
    # The default visibility timeout (an hour): the batch must come back through its lease.
    # A 15 s lease keeps the test short; the default is 60 s, the bound two minutes.
    stack.env["MOE_LEASE_TIMEOUT_S"] = "15"
    raw = _items(40, seed=13)
    job_id, victim, waited = _kill_mid_batch_and_restart(stack, raw)
    record_property("seconds_from_restart_to_done", round(waited, 1))
    assert waited < 120, f"{waited:.0f} s"
    Session = session_factory(stack.settings().sql_url(), run_migrations=False)
    with Session() as s:
        batch = s.get(Batch, victim)
        assert batch.attempts == 2 and batch.requeues == 1
    assert "handed back to the broker (requeue 1)" in stack.logs()
    expected = _expected_reports(stack.settings(), job_id, raw)
    assert sorted(_graph_reports(stack.graph, job_id)) == sorted(expected)
    assert stack.secrets_in_logs() == []


@pytest.mark.backends("neo4j")
def test_a_worker_killed_whole_on_rabbitmq_gets_its_batch_back_at_once(
        tmp_path, graph, redis_url, rabbitmq_url, record_property):
    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials for worker processes")
    stack = Stack(tmp_path, graph, redis_url, broker_url=rabbitmq_url)
    try:
        raw = _items(40, seed=18)
        job_id, victim, waited = _kill_mid_batch_and_restart(stack, raw)
        record_property("seconds_from_restart_to_done", round(waited, 1))
        assert waited < 60, f"{waited:.0f} s"  # redelivered when the connection dropped
        Session = session_factory(stack.settings().sql_url(), run_migrations=False)
        with Session() as s:
            batch = s.get(Batch, victim)
            assert batch.attempts == 2 and batch.requeues == 0  # no lease was needed
        expected = _expected_reports(stack.settings(), job_id, raw)
        assert sorted(_graph_reports(graph, job_id)) == sorted(expected)
        assert stack.secrets_in_logs() == [] and "guest:guest" not in stack.logs()
    finally:
        stack.close()


@pytest.mark.backends("neo4j")
def test_poison_batch_is_failed_after_max_attempts_and_the_job_goes_on(stack):
    raw = _items(60, seed=14)
    poison = raw[25]["id"]  # in the second batch
    stack.env["MOE_MAX_ATTEMPTS"] = "2"
    stack.workers(("gpu", {"MOE_FAULT_KILL_ITEM": poison}), "librarian")
    job = _submit(stack, raw, batch_size=20)
    state = _wait(stack, job.job_id)
    assert state.status == "completed_with_errors" and state.failed == 1, stack.logs()
    Session = session_factory(stack.settings().sql_url(), run_migrations=False)
    with Session() as s:
        batches = s.get(Job, job.job_id).batches
        assert [b.status for b in batches] == ["completed", "failed", "completed"]
        assert batches[1].attempts == 3 and "gave up after 2 attempts" in batches[1].error
        assert "1 of 3 batches failed" in s.get(Job, job.job_id).error
    status = forkrun.run([sys.executable, "-m", "pipeline.cli", "status", job.job_id],
                         env=stack.env, capture_output=True, text=True, timeout=60)
    assert "why: gave up after 2 attempts" in status.stdout, status.stdout + status.stderr
    good = raw[:20] + raw[40:]
    expected = _expected_reports(stack.settings(), job.job_id, good)
    assert sorted(_graph_reports(stack.graph, job.job_id)) == sorted(expected)


@pytest.mark.backends("neo4j")
def test_a_poison_shard_part_fails_its_batch_and_the_job_still_ends(stack):
    raw = _items(40, seed=16)
    poison = raw[5]["id"]  # its report lands in one shard part of the first batch
    stack.env["MOE_MAX_ATTEMPTS"] = "2"
    stack.workers("gpu", ("librarian", {"MOE_FAULT_KILL_ITEM": poison}))
    job = _submit(stack, raw, batch_size=20)
    state = _wait(stack, job.job_id)
    assert state.status == "completed_with_errors" and state.failed == 1, stack.logs()
    Session = session_factory(stack.settings().sql_url(), run_migrations=False)
    with Session() as s:
        first, second = s.get(Job, job.job_id).batches
        assert (first.status, second.status) == ("failed", "completed")
        (bad,) = [p for p in first.parts if p.status == "failed"]
        assert bad.attempts == 3 and "gave up after 2 attempts" in bad.error
        assert all(p.status == "done" for p in first.parts if p is not bad)


def test_an_unreachable_broker_is_one_clear_error_and_no_job(tmp_path):
    settings = Settings(state_dir=tmp_path, celery_broker_url="redis://127.0.0.1:1/0",
                        database_url=f"sqlite:///{tmp_path / 'runs.sqlite3'}")
    with pytest.raises(PipelineError, match=r"broker redis://127.0.0.1:1/0 unreachable"):
        jobs.submit(_items(5, seed=1), settings)
    out = forkrun.run([sys.executable, "-m", "pipeline.cli", "submit", str(_write(
        tmp_path, _items(5, seed=1)))], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
             "MOE_STATE_DIR": str(tmp_path)})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: broker redis://127.0.0.1:1/0 unreachable")


def _write(tmp_path: Path, raw: list[dict]) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in raw))
    return path


class Outage:
    """A TCP forwarder to the graph server that can be taken down and brought back on the
    same port: a real network outage between the workers and the graph."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen()
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        with contextlib.suppress(OSError):  # wakes the thread blocked in accept (Linux)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("when", ["while_running", "from_the_start"])
def test_a_graph_outage_is_retried_and_nothing_is_lost(tmp_path, graph, redis_url, when):
    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials for worker processes")
    target = int(graph.uri.rsplit(":", 1)[1])
    outage = Outage(target)
    stack = Stack(tmp_path, graph, redis_url,
                  neo4j_uri=f"{graph.uri.rsplit(':', 1)[0]}:{outage.port}")
    # A worker may still be connecting when the outage starts: then its first task meets
    # it; either way the outage must be retried, and quickly noticed.
    stack.env["MOE_GRAPH_CONNECT_TIMEOUT_S"] = "3"
    try:
        stack.worker("gpu")
        if when == "from_the_start":
            outage.down()
        stack.worker("librarian")
        if when == "while_running":
            outage.down()
        raw = _items(20, seed=15 if when == "while_running" else 17)
        job = _submit(stack, raw, batch_size=20)
        Session = session_factory(stack.settings().sql_url(), run_migrations=False)
        deadline = time.monotonic() + 60
        while "Retry in" not in stack.logs():  # the librarian met the outage and backed off
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.2)
        with Session() as s:
            assert s.get(Job, job.job_id).status == "running"
            parts = s.scalars(select(BatchPart)).all()
            assert parts and all(p.status in ("queued", "running", "done") for p in parts)
        outage.up()
        state = _wait(stack, job.job_id, timeout_s=180)
        assert state.status == "completed", stack.logs()
        with Session() as s:  # an outage costs no attempt: it is not the batch's fault
            assert all(p.attempts == 1 for p in s.scalars(select(BatchPart)).all())
        expected = _expected_reports(stack.settings(), job.job_id, raw)
        assert sorted(_graph_reports(graph, job.job_id)) == sorted(expected)
    finally:
        stack.close()
        outage.down()
