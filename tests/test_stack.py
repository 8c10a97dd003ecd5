"""The compose stack's services, started for real without containers.

This machine has no Docker engine, so each service of docker-compose.yml runs natively: its
own `command` with the `environment` the file gives it, interpolated from .env.example as
`docker compose` would. The servers it depends on are real: Neo4j 5.26 from the harness (the
compose pin), PostgreSQL and RabbitMQ from scripts/services.sh, and Redis started from the
redis service's own command (`--requirepass` included). What cannot be kept is a container's
name for its neighbours: `neo4j:7687`, `postgres:5432`, `rabbitmq:5672` and `redis:6379` in a
URL become the loopback address of the server standing in, the RabbitMQ vhost is one of the
test's own, and each service's `%h` (the container's host name) is the service's name. Then
the README's stack-section commands run as written, from the host's side, with the host
addresses .env.example ends with rewritten the same way, and the graph is read back.

A change to a service's command or variables in the compose file reaches this test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import yaml
from conftest import _postgres_admin_url, pg_prefix
from factories import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
README = (ROOT / "README.md").read_text()


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(value, env: dict[str, str]):
    """${NAME} from env, $$ as a literal $: the part of compose's interpolation the file uses."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    out = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], value.replace("$$", "\0"))
    return out.replace("\0", "$")


def stack_section_commands() -> list[str]:
    """The `moe-pipeline ...` lines of the README's stack section's first bash block."""
    start = README.index("## The stack: docker compose\n")
    block = re.search(r"```bash\n(.*?)```", README[start:], re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines()
            if line.startswith("moe-pipeline ")]



class NativeStack:
    """The compose services as processes, and the addresses that stand for containers."""

    def __init__(self, tmp: Path, neo4j: dict, broker: str) -> None:
        self.tmp, self.broker = tmp, broker
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        tag = uuid.uuid4().hex[:8]
        pg_name = f"{pg_prefix()}stack_{tag}"  # role and database: the suite's prefix
        # The stack's credentials: .env.example's names, values of this test's own (the
        # Neo4j password is the harness's: it is the server's).
        self.vars = {**env_example(), "NEO4J_PASSWORD": neo4j["password"],
                     "POSTGRES_USER": pg_name, "POSTGRES_PASSWORD": f"pg-{tag}",
                     "POSTGRES_DB": pg_name, "REDIS_PASSWORD": f"redis-{tag}",
                     "RABBITMQ_USER": f"moe-stack-{tag}", "RABBITMQ_PASSWORD": f"mq-{tag}",
                     "COMPOSE_PROFILES": "cpu"}
        self.vhost = f"moe-stack-{tag}"
        self.redis_port = free_port()
        bolt = urlsplit(neo4j["uri"])
        pg = urlsplit(_postgres_admin_url())
        mq = urlsplit(os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672"))
        self.hosts = {"neo4j": (bolt.hostname, bolt.port), "postgres": (pg.hostname, pg.port),
                      "rabbitmq": (mq.hostname, mq.port or 5672),
                      "redis": ("127.0.0.1", self.redis_port)}

    # -- the servers the services depend on -------------------------------------------------
    def provision(self) -> None:
        self._postgres()
        self._rabbitmq()
        self._redis()

    def _postgres(self) -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.exc import OperationalError

        admin_url = _postgres_admin_url()
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        v = self.vars
        try:
            with self.admin.connect() as conn:
                # Names are this test's own, made of [a-z0-9_]; the password is a literal
                # because CREATE ROLE takes no parameters.
                conn.execute(text(f"CREATE ROLE {v['POSTGRES_USER']} LOGIN PASSWORD "
                                  f"'{v['POSTGRES_PASSWORD']}'"))
                conn.execute(text(f"CREATE DATABASE {v['POSTGRES_DB']} "
                                  f"OWNER {v['POSTGRES_USER']}"))
        except OperationalError as err:
            pytest.skip(f"no PostgreSQL at {admin_url}: {err.orig}")

    def _rabbitmq(self) -> None:
        if shutil.which("rabbitmqctl") is None:
            pytest.skip("rabbitmqctl is not installed: no RabbitMQ to give the stack a user")
        v = self.vars
        for args in (["add_user", v["RABBITMQ_USER"], v["RABBITMQ_PASSWORD"]],
                     ["add_vhost", self.vhost],
                     ["set_permissions", "-p", self.vhost, v["RABBITMQ_USER"], ".*", ".*", ".*"]):
            out = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True,
                                 timeout=60)
            if out.returncode:
                pytest.skip(f"rabbitmqctl {args[0]} failed: {out.stderr.strip()[-200:]}")

    def _redis(self) -> None:
        """The redis service's own command, on a loopback port of this test's own."""
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        command = interpolate(SERVICES["redis"]["command"], self.vars)
        (self.tmp / "redis").mkdir()
        self.start("redis", command + ["--port", str(self.redis_port), "--bind", "127.0.0.1",
                                       "--dir", str(self.tmp / "redis")], {})
        wait_until(lambda: port_answers(self.redis_port), 20, "redis")

    # -- the services -----------------------------------------------------------------------
    def native(self, url: str) -> str:
        """A compose URL with its container host replaced by the server standing in."""
        parts = urlsplit(url)
        if parts.hostname not in self.hosts:
            return url
        host, port = self.hosts[parts.hostname]
        auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        path = parts.path
        if parts.scheme == "amqp":
            path = "/" + quote(self.vhost, safe="")
        return urlunsplit((parts.scheme, f"{auth}{host}:{port}", path, parts.query, ""))

    def service_env(self, name: str) -> dict[str, str]:
        env = interpolate(SERVICES[name].get("environment", {}), self.vars)
        env = {k: self.native(str(v)) if "://" in str(v) else str(v) for k, v in env.items()}
        # The shared `state` volume, as one directory of this test's.
        env["MOE_STATE_DIR"] = str(self.tmp / "state")
        return env

    def host_env(self) -> dict[str, str]:
        """What the host's moe-pipeline reads: the four addresses .env.example ends with, on
        the servers standing in for the published ports, with the stack's credentials."""
        v = self.vars
        assert {"NEO4J_URI", "DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL"} <= set(
            env_example())
        host = {
            "NEO4J_URI": self.native("bolt://neo4j:7687"),
            "NEO4J_PASSWORD": v["NEO4J_PASSWORD"],
            "DATABASE_URL": self.native(f"postgresql+psycopg://{v['POSTGRES_USER']}:"
                                        f"{v['POSTGRES_PASSWORD']}@postgres:5432/"
                                        f"{v['POSTGRES_DB']}"),
            "CELERY_BROKER_URL": self.native(f"amqp://{v['RABBITMQ_USER']}:"
                                             f"{v['RABBITMQ_PASSWORD']}@rabbitmq:5672/"),
            "REDIS_URL": self.native(f"redis://:{v['REDIS_PASSWORD']}@redis:6379/0"),
            "MOE_STATE_DIR": str(self.tmp / "host-state"),
        }
        if self.broker == "redis":
            host["CELERY_BROKER_URL"] = host["REDIS_URL"]
        return host

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        exe = shutil.which(command[0], path=str(BIN)) or shutil.which(command[0])
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen([exe, *command[1:]], cwd=ROOT, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={"PATH": f"{BIN}:{os.environ['PATH']}",
                                     "HOME": os.environ.get("HOME", "/root"),
                                     "PYTHONUNBUFFERED": "1", **env})
        self.procs.append((name, proc, log))
        return proc

    def run_service(self, name: str, port: int | None = None) -> subprocess.Popen:
        env = self.service_env(name)
        if self.broker == "redis":  # the second run: Redis carries the tasks too
            env["CELERY_BROKER_URL"] = self.host_env()["REDIS_URL"]
        command = [c.replace("%h", name) for c in interpolate(SERVICES[name]["command"],
                                                               self.vars)]
        if port is not None and name == "api":  # `serve --host H --port P`: loopback, ours
            at = {flag: command.index(flag) + 1 for flag in ("--host", "--port")}
            command[at["--host"]], command[at["--port"]] = "127.0.0.1", str(port)
        elif port is not None:  # a published port: this test's own, on loopback
            command = [re.sub(r"^--port=\d+$", f"--port={port}", c) for c in command]
            command.append("--address=127.0.0.1")
        return self.start(name, command, env)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{log.read_text(errors='replace')[-2500:]}"
                         for name, _, log in self.procs)

    def close(self) -> None:
        for _, proc, _ in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with self.admin.connect() as conn:
            from sqlalchemy import text

            conn.execute(text(f"DROP DATABASE IF EXISTS {self.vars['POSTGRES_DB']} WITH (FORCE)"))
            conn.execute(text(f"DROP ROLE IF EXISTS {self.vars['POSTGRES_USER']}"))
        self.admin.dispose()
        subprocess.run(["rabbitmqctl", "delete_vhost", self.vhost], capture_output=True,
                       timeout=60)
        subprocess.run(["rabbitmqctl", "delete_user", self.vars["RABBITMQ_USER"]],
                       capture_output=True, timeout=60)


def port_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def wait_until(check, seconds: float, what: str, logs=lambda: "") -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready within {seconds:.0f} s\n{logs()}")
        time.sleep(0.3)


@pytest.fixture(params=["rabbitmq", "redis"])
def native_stack(request, tmp_path, neo4j_server):
    stack = NativeStack(tmp_path, neo4j_server, request.param)
    try:
        stack.provision()
        yield stack
    finally:
        stack.close()


def test_the_compose_services_run_natively_and_the_readme_commands_work(native_stack):
    stack = native_stack
    profile = stack.vars["COMPOSE_PROFILES"]
    worker = f"{profile}-worker"
    assert profile in SERVICES[worker]["profiles"]

    migrate = stack.run_service("migrate")
    assert migrate.wait(timeout=120) == 0, stack.logs()
    names = [worker, "librarian", "query"]
    for name in names:
        stack.run_service(name)
    for name, proc, log in stack.procs:
        if name in names:
            wait_until(lambda log=log, proc=proc: " ready." in log.read_text(errors="replace")
                       or proc.poll() is not None, 120, name, stack.logs)
            assert proc.poll() is None, stack.logs()
    api_port = free_port()
    stack.run_service("api", port=api_port)
    wait_until(lambda: port_answers(api_port), 120, "api", stack.logs)
    flower_port = None
    if _flower_installed():
        flower_port = free_port()
        stack.run_service("flower", port=flower_port)
        wait_until(lambda: port_answers(flower_port), 60, "flower", stack.logs)

    host = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **stack.host_env()}
    for var in ("MOE_MODEL_PATH", "NEO4J_USERNAME", "NEO4J_DATABASE"):
        host.pop(var, None)
    outputs = []
    for line in stack_section_commands():
        out = subprocess.run(shlex.split(line), cwd=ROOT, env=host, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, f"{line}\n{out.stdout}\n{out.stderr}\n{stack.logs()}"
        outputs.append((line, out.stdout))
    (submit_line, submitted), (query_line, answered), (similar_line, similar) = outputs[:3]
    assert submit_line.startswith("moe-pipeline submit examples/texts.jsonl --wait")
    job = re.search(r"job (\S+) completed", submitted)
    assert job, submitted
    # Five insights with their support, as the README's query asks.
    assert len([ln for ln in answered.splitlines() if ln.strip()]) >= 5, answered
    assert "sleep" in similar_line and similar.strip(), similar

    # The graph, read back as a user would: every one of the 300 notes supports an insight of
    # this job, in its own constellation's shard, and the similar answer names memory notes.
    from pipeline.storage.graph import GraphStore

    graph = GraphStore.connect(host["NEO4J_URI"], "neo4j", host["NEO4J_PASSWORD"])
    try:
        row = graph.run_cypher(
            "MATCH (i:Insight)-[e:SUPPORTED_BY]->(s:Source) WHERE $job IN e.jobs "
            "RETURN count(DISTINCT s) AS sources, count(DISTINCT i) AS insights, "
            "collect(DISTINCT i.shard) AS shards", {"job": job.group(1)})[0]
    finally:
        graph.close()
    assert row["sources"] == 300, row
    assert 0 < row["insights"] <= 300
    assert set(row["shards"]) <= {"mathematics", "language", "vision", "memory"}
    assert "memory" in similar, similar
    if flower_port is not None:
        # Flower reads the workers (it must understand their message format), behind its
        # basic auth.
        import base64
        import urllib.error
        import urllib.request

        url = f"http://127.0.0.1:{flower_port}/api/workers?refresh=1"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(url, timeout=30)
        token = base64.b64encode(f"{stack.vars['FLOWER_USER']}:"
                                 f"{stack.vars['FLOWER_PASSWORD']}".encode()).decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        workers = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert {f"worker@{name}" for name in names} <= set(workers), (workers, stack.logs())
        assert all(w.get("registered") for w in workers.values()), workers
    _the_api_answers_in_the_stack(stack, api_port)
    # No password of the stack in any service's log.
    for name, _, log in stack.procs:
        text = log.read_text(errors="replace")
        for secret in ("POSTGRES_PASSWORD", "RABBITMQ_PASSWORD", "REDIS_PASSWORD"):
            assert stack.vars[secret] not in text, (name, secret)


def _the_api_answers_in_the_stack(stack: NativeStack, port: int) -> None:
    """The api service: a token from its state, a job posted and queued to the workers,
    questions answered."""
    import httpx

    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **stack.service_env("api")}
    token = subprocess.run([str(BIN / "moe-pipeline"), "token", "--write"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert token.returncode == 0, token.stderr
    auth = {"Authorization": f"Bearer {token.stdout.strip()}"}
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{base}/jobs", timeout=10).status_code == 401
    body = "".join(json.dumps({"id": f"api-{n}", "text": text}) + "\n" for n, text in
                   enumerate(["sleep consolidates what was learned during the day",
                              "a proof by induction climbs one rung at a time"]))
    posted = httpx.post(f"{base}/jobs", content=body, headers=auth, timeout=120)
    assert posted.status_code == 202 and posted.json()["mode"] == "queued", posted.text
    job = posted.json()["id"]
    deadline = time.monotonic() + 180
    while (state := httpx.get(f"{base}/jobs/{job}", headers=auth, timeout=30).json())[
            "status"] in ("queued", "running"):
        assert time.monotonic() < deadline, (state, stack.logs())
        time.sleep(0.5)
    assert state["status"] == "completed", state
    hits = httpx.get(f"{base}/similar", params={"text": "sleep and memory"}, headers=auth,
                     timeout=120).json()["hits"]
    assert hits and any("sleep" in (h["summary"] or "").lower() for h in hits), hits
    assert token.stdout.strip() not in stack.logs()


def _flower_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flower") is not None


def test_the_stack_section_has_the_commands_this_test_runs():
    lines = stack_section_commands()
    assert [ln.split()[1] for ln in lines] == ["submit", "query", "similar"], lines
    assert all(shlex.split(ln)[0] == "moe-pipeline" for ln in lines)
