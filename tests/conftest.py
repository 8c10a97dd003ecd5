"""Shared test set-up: markers that skip with their reason, and a fixed seed per test."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@functools.cache
def _docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True,
                              timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pytest_configure(config: pytest.Config) -> None:
    # Every test runs against a state dir of its own session, never the user's own
    # (~/.local/share/moe-pipeline) nor the one the set-up command filled: a test that
    # builds `Settings()` with no state dir of its own writes here.
    import getpass
    import tempfile

    pg_prefix()  # a bad MOE_TEST_PG_PREFIX stops the run in one line, before any test
    # The suite runs offline from its start, as every command that loads a model makes itself
    # (`force_offline`). Set now, before a test loads one in process, the start-up variables
    # that the tests' commands inherit are the same from the first test to the last, so one
    # fork helper serves them all (tests/forkrun.py) and starts while the tests are collected.
    # The proxy test of test_model_files_adversarial removes them again: there the command
    # must go offline by itself.
    # For the same reason the inductor's cache dir is named now: torch sets the variable
    # (to this default) the first time a test compiles.
    from pipeline.moe.offline import force_offline

    force_offline()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"))
    config.pluginmanager.register(_StopCurrentNeo4jEarly(), "moe-stop-current-neo4j-early")
    os.environ["MOE_STATE_DIR"] = tempfile.mkdtemp(prefix="moe-test-state-")


def pytest_unconfigure(config: pytest.Config) -> None:
    from pipeline.storage.embedded import LocalGraphServer

    state = os.environ.get("MOE_STATE_DIR", "")
    if state.rsplit("/", 1)[-1].startswith("moe-test-state-"):
        LocalGraphServer(state).stop()  # if a test started one there
        shutil.rmtree(state, ignore_errors=True)


# Fixtures that stand for a real server: a test using one is an integration test, so that
# `pytest -m "not integration"` is the fast tier of pure unit tests.
SERVER_FIXTURES = {"graph", "sql_url", "redis_url", "redis_prefix", "stack",
                   "embedded_server"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The current Neo4j release runs a chosen few modules, and a case marked
    # `backends(NAME, ...)` only those graph backends; the others are deselected (not skipped:
    # they were never meant to run).
    # A case marked `deployments` crosses the graph and SQL backends as they are deployed,
    # not every pair: the embedded graph with SQLite (the default install), Neo4j with
    # PostgreSQL (the stack); each backend still runs once.
    keep, dropped = [], []
    for item in items:
        params = _params(item)
        backend, sql = params.get("graph"), params.get("sql_url")
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        only = item.get_closest_marker("backends")
        if backend == "neo4j-current" and module not in CURRENT_NEO4J_MODULES or \
                backend and only and backend not in only.args or \
                backend and sql and item.get_closest_marker("deployments") and \
                (backend == "embedded") != (sql == "sqlite"):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    no_gpu = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    no_docker = pytest.mark.skip(
        reason="needs a Docker engine: no socket or DOCKER_HOST, or `docker info` failed")
    gpu = torch.cuda.is_available()
    docker = None
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(no_gpu)
        if "docker" in item.keywords:
            docker = _docker_engine() if docker is None else docker
            if not docker:
                item.add_marker(no_docker)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# -- real servers ---------------------------------------------------------------------------
# The graph: the embedded server (always); real Neo4j Community started in-process by
# tools/neo4j/launcher.sh (neo4j-harness from Maven Central): the 5.26 LTS that
# docker-compose.yml pins on every graph test, and the current release (Java 21+) on the
# graph, guard and librarian tests; and the server in NEO4J_URI when set. SQL: a SQLite file,
# and PostgreSQL from TEST_POSTGRES_URL (default: the local server that scripts/services.sh
# starts), each test database made fresh.

GRAPH_BACKENDS = ["embedded", "neo4j", "neo4j-current"]
if os.environ.get("NEO4J_URI"):  # a server of the user's own, as well
    GRAPH_BACKENDS.append("neo4j-env")
# The current Neo4j release runs on the modules that exercise the server most directly.
CURRENT_NEO4J_MODULES = {"test_graph", "test_read_only_guard", "test_librarian"}
CURRENT_NEO4J = "2026.08.1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "neo4j"))
from harness import Neo4jHarness, Neo4jUnavailable  # noqa: E402

# The JIT's first tier only: a test server lives minutes and answers small queries, which the
# optimising compiler's work never paid back (the Neo4j cases of the graph, forget and guard
# tests used 362 CPU-seconds of the machine with it, 273 without, the same 38 passing; a
# server starts in 12.5-13.3 s against 14.5-14.9).
TEST_NEO4J_JAVA_OPTS = "-XX:TieredStopAtLevel=1"


def _start_neo4j(version: str | None, workdir: Path) -> Neo4jHarness:
    try:
        return Neo4jHarness(version, workdir, java_opts=TEST_NEO4J_JAVA_OPTS).start()
    except Neo4jUnavailable as why:  # no JDK, Maven or jars for it: a user's laptop
        pytest.skip(str(why))


def _neo4j_enabled() -> None:
    if os.environ.get("MOE_TEST_NEO4J", "1") == "0":
        pytest.skip("MOE_TEST_NEO4J=0: the Neo4j backends are turned off")


def _serve_neo4j(version: str | None, workdir: Path):
    _neo4j_enabled()
    server = _start_neo4j(version, workdir)
    _HARNESSES[version] = server
    yield {"uri": server.uri, "user": server.user, "password": server.password,
           "version": server.server_version}
    server.stop()


# The current release serves a few modules only: its server stops after the last test that
# uses it (found once the run's order is known), not with the session, so that an idle JVM
# does not hold a gigabyte and a share of a core through the rest of the run.
_HARNESSES: dict[str | None, Neo4jHarness] = {}


def _params(item: pytest.Item) -> dict:
    """The item's parameters ({} for a test that has none)."""
    return getattr(getattr(item, "callspec", None), "params", {})


def _on_current_graph(item: pytest.Item) -> bool:
    return _params(item).get("graph") == "neo4j-current"


def _uses_current_neo4j(item: pytest.Item) -> bool:
    """Whether ``item`` needs the current release's server: as its `graph` backend, as a
    fixture it names, or as a parameter naming that fixture (a test that fetches it with
    ``request.getfixturevalue``)."""
    params = _params(item)
    return (_on_current_graph(item)
            or "neo4j_current_server" in getattr(item, "fixturenames", ())
            or any(isinstance(v, str) and v == "neo4j_current_server"
                   for v in params.values()))


class _StopCurrentNeo4jEarly:
    """Registered by `pytest_configure`: finds the last test of the run that needs the current
    release's server once the order is final (after every reordering plugin, `--ff` and `--nf`
    included), and stops that server after it."""

    last: str | None = None

    @pytest.hookimpl(trylast=True)  # once pytest has grouped the tests by their fixtures
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """The few tests that fetch the server by name (not as a `graph` backend) move to
        just after the `graph` group that uses it, so that it is not kept for them alone."""
        group = [n for n, item in enumerate(items) if _on_current_graph(item)]
        if not group:
            return
        named = [item for n, item in enumerate(items)
                 if n > group[-1] and _uses_current_neo4j(item)]
        if named:
            rest = [item for item in items if item not in named]
            at = rest.index(items[group[-1]]) + 1
            items[:] = rest[:at] + named + rest[at:]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        users = [item.nodeid for item in session.items if _uses_current_neo4j(item)]
        self.last = users[-1] if users else None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item):
        yield
        if item.nodeid == self.last:
            current = os.environ.get("MOE_TEST_NEO4J_CURRENT", CURRENT_NEO4J)
            if current in _HARNESSES:
                _HARNESSES.pop(current).stop()


@pytest.fixture(scope="session")
def neo4j_server(tmp_path_factory):
    """Neo4j 5.26 LTS (the version docker-compose.yml pins), started once per test run:
    {"uri", "user", "password", "version"}."""
    yield from _serve_neo4j(None, tmp_path_factory.mktemp("neo4j"))


@pytest.fixture(scope="session")
def neo4j_current_server(tmp_path_factory):
    """The current Neo4j release (MOE_TEST_NEO4J_CURRENT, default CURRENT_NEO4J); skipped
    with the reason where no Java 21+ is found."""
    yield from _serve_neo4j(os.environ.get("MOE_TEST_NEO4J_CURRENT", CURRENT_NEO4J),
                            tmp_path_factory.mktemp("neo4j-current"))


TEST_COMMAND_TIMEOUT_S = 6.0


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory):
    """The embedded graph server of a state dir of its own (``server.root.parent``), one
    for the whole session: the `graph` fixture's embedded backend is this server."""
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    from pipeline.storage.embedded import LocalGraphServer

    # Commands are cut at TEST_COMMAND_TIMEOUT_S (120 s by default), so that the test of a
    # runaway read is short; nothing else the suite sends takes a fifth of that.
    server = LocalGraphServer(tmp_path_factory.mktemp("state"),
                              command_timeout_s=TEST_COMMAND_TIMEOUT_S)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=GRAPH_BACKENDS)
def graph(request):
    """A GraphStore on a real server, with the project's schema."""
    from pipeline.storage.graph import GraphStore

    backend = request.param
    if backend == "embedded":
        store = request.getfixturevalue("embedded_server").connect()
    elif backend == "neo4j-env":
        uri = os.environ.get("NEO4J_URI")
        if not uri:
            pytest.skip("NEO4J_URI is not set")
        store = GraphStore.connect(uri, os.environ.get("NEO4J_USERNAME", "neo4j"),
                                   os.environ.get("NEO4J_PASSWORD"),
                                   os.environ.get("NEO4J_DATABASE"))
    else:
        server = request.getfixturevalue(
            "neo4j_server" if backend == "neo4j" else "neo4j_current_server")
        store = GraphStore.connect(server["uri"], server["user"], server["password"])
        # As the embedded test server's command timeout: the runaway-read test is short.
        store.read_timeout_s = TEST_COMMAND_TIMEOUT_S
    store.ensure_schema()
    yield store
    store.close()


# -- where the suite may write ----------------------------------------------------------------
# Two settings name everything the suite writes outside its temporary directories:
# MOE_TEST_REDIS_URL, the one Redis database it uses (default db 15 of the local server), and
# MOE_TEST_PG_PREFIX, the prefix of every PostgreSQL database it creates (default
# ``moe_test_``) on the server of TEST_POSTGRES_URL. Nothing flushes: each user of Redis takes
# a key prefix of its own (`new_redis_prefix`, the product's MOE_REDIS_PREFIX for workers)
# and deletes only keys under it, so many runs, and other users, share one database.

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


def suite_redis_url() -> str:
    return os.environ.get("MOE_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)


def pg_prefix() -> str:
    """MOE_TEST_PG_PREFIX: it starts identifiers written into SQL (CREATE DATABASE and ROLE
    take no parameters), so only lower-case letters, digits and '_' are accepted."""
    import re

    prefix = os.environ.get("MOE_TEST_PG_PREFIX", "moe_test_")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,39}", prefix):
        raise pytest.UsageError(f"MOE_TEST_PG_PREFIX={prefix!r}: use 1-40 of a-z, 0-9 and _, "
                                "not starting with a digit")
    return prefix


def new_redis_prefix() -> str:
    """A key prefix no other test, run or user holds."""
    import uuid

    return f"moe-test-{uuid.uuid4().hex[:12]}:"


def delete_redis_keys(url: str, prefix: str) -> int:
    """Delete the keys under ``prefix`` (found by SCAN, never KEYS or FLUSHDB); returns how
    many. A prefix must end in ':' so that it cannot be the start of another's."""
    import redis

    assert prefix.endswith(":") and len(prefix) > 8, prefix
    client = redis.Redis.from_url(url)
    gone = 0
    try:
        batch = []
        for key in client.scan_iter(match=prefix + "*", count=500):
            batch.append(key)
            if len(batch) == 500:
                gone += client.unlink(*batch)
                batch = []
        if batch:
            gone += client.unlink(*batch)
    finally:
        client.close()
    return gone


def reachable_redis() -> str:
    """MOE_TEST_REDIS_URL, or a skip saying why it cannot be used."""
    import redis

    url = suite_redis_url()
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as err:
        pytest.skip(f"no Redis at {url} (MOE_TEST_REDIS_URL): {err}")
    return url


@pytest.fixture(scope="session")
def redis_url():
    """The suite's Redis database: MOE_TEST_REDIS_URL, the local server, or a container."""
    import redis

    url = suite_redis_url()
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as err:
        if not _docker_engine():
            pytest.skip(f"no Redis at {url} ({err}) and no Docker engine for a container")
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7.4") as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    yield url


@pytest.fixture
def redis_prefix(redis_url):
    """A key prefix of this test's own in the suite's Redis; its keys are deleted after."""
    prefix = new_redis_prefix()
    yield prefix
    delete_redis_keys(redis_url, prefix)


def _postgres_admin_url() -> str:
    return os.environ.get("TEST_POSTGRES_URL",
                          "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_url(request, tmp_path):
    """A fresh, empty database URL on each SQL backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'runs.sqlite3'}"
        return
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    admin = create_engine(_postgres_admin_url(), isolation_level="AUTOCOMMIT")
    name = f"{pg_prefix()}{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as err:
        admin.dispose()
        pytest.skip(f"no PostgreSQL at {_postgres_admin_url()}: {err.orig}")
    base = admin.url.set(database=name).render_as_string(hide_password=False)
    yield base
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def stack(tmp_path, graph, redis_url):
    """A queued stack of this test's own (`test_queue_workers.Stack`: a GPU/CPU and a
    librarian worker on the suite's Redis under a fresh prefix), closed after."""
    from test_queue_workers import Stack

    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials for worker processes")
    s = Stack(tmp_path, graph, redis_url)
    yield s
    s.close()
