"""No password is ever printed: status lines, worker start lines and errors mask them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import forkrun
import pytest

from pipeline.redact import masked, redacted

PG, REDIS, AMQP, NEO = "PGsecret-7d1", "RDsecret-5e2", "AMsecret-3c4", "N4secret-19b"


@pytest.mark.parametrize("url, shown", [
    (f"postgresql+psycopg://postgres:{PG}@127.0.0.1:5432/test",
     "postgresql+psycopg://postgres:***@127.0.0.1:5432/test"),
    (f"redis://:{REDIS}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    (f"amqp://moe:{AMQP}@rabbitmq:5672/", "amqp://moe:***@rabbitmq:5672/"),
    ("amqp://moe:p@ss:w@rd@host//", "amqp://moe:***@host//"),  # '@' and ':' inside
    ("redis://user:pa/ss@127.0.0.1:6390/11", "redis://user:***@127.0.0.1:6390/11"),  # '/'
    ("postgresql://u:sec ret@h/db", "postgresql://u:***@h/db"),  # a space
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("sqlite:////tmp/runs.sqlite3", "sqlite:////tmp/runs.sqlite3"),
    (f"host=db user=moe password={PG} dbname=moe", "host=db user=moe password=*** dbname=moe"),
])
def test_urls_are_shown_with_the_password_masked(url, shown):
    assert masked(url) == shown


def test_free_text_is_redacted_of_urls_and_named_secrets():
    text = f"cannot reach redis://:{REDIS}@h:1/0 (auth {NEO} refused)"
    assert redacted(text, [NEO]) == "cannot reach redis://:***@h:1/0 (auth *** refused)"


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    out = forkrun.run([sys.executable, "-m", "pipeline.cli", *args], env=env,
                      capture_output=True, text=True, timeout=timeout)
    return out.stdout + out.stderr


@pytest.mark.integration
def test_no_command_prints_a_password(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J", "MOE_NEO4J"))}
    base.update(MOE_STATE_DIR=str(tmp_path / "state"), NEO4J_PASSWORD=NEO,
                NEO4J_URI="bolt://127.0.0.1:1")
    (tmp_path / "items.jsonl").write_text('{"id": "a", "vector": [1, 2]}\n')
    pg_trust = f"postgresql+psycopg://postgres:{PG}@127.0.0.1:5432/test"  # trust auth
    pg_down = f"postgresql+psycopg://moe:{PG}/x y@127.0.0.1:1/moe"  # '/' and a space
    # A worker's start line and its log, with a broker that never answers: started first,
    # so that its 12 s pass while the commands below run.
    started = time.monotonic()
    worker = forkrun.Popen([sys.executable, "-m", "pipeline.cli", "worker", "query"],
                           env={**base, "CELERY_BROKER_URL":
                                f"redis://:{REDIS}@127.0.0.1:1/0"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    outputs = {
        "status": _cli("status", env={**base, "DATABASE_URL": pg_trust,
                                      "CELERY_BROKER_URL": f"amqp://moe:{AMQP}@127.0.0.1:1//",
                                      "REDIS_URL": f"redis://:{REDIS}@127.0.0.1:1/0"}),
        "status, SQL down": _cli("status", env={**base, "DATABASE_URL": pg_down}),
        "submit, Redis down": _cli("submit", str(tmp_path / "items.jsonl"), env={
            **base, "CELERY_BROKER_URL": f"redis://:{REDIS}@127.0.0.1:1/0"}),
        "submit, RabbitMQ down": _cli("submit", str(tmp_path / "items.jsonl"), env={
            **base, "CELERY_BROKER_URL": f"amqp://moe:{AMQP}@127.0.0.1:1//"}),
        "query, graph down": _cli("query", "RETURN 1", env={
            **base, "NEO4J_URI": "bolt://neo4j:" + NEO + "@127.0.0.1:1"}),
        "query, '/' in the URI's password": _cli("query", "RETURN 1", env={
            **base, "NEO4J_URI": "bolt://neo4j:" + NEO + "/x@127.0.0.1:1"}),
        "submit, '/' in the broker's password": _cli("submit", str(tmp_path / "items.jsonl"),
                                                     env={**base, "CELERY_BROKER_URL":
                                                          f"redis://u:{REDIS}/x@127.0.0.1:1/0"}),
    }
    time.sleep(max(0.0, 12 - (time.monotonic() - started)))
    os.killpg(worker.pid, signal.SIGKILL)
    outputs["worker"] = worker.communicate(timeout=30)[0]
    assert "query worker on queues query (broker redis://:***@127.0.0.1:1/0)" in \
        outputs["worker"], outputs["worker"]
    assert "error: broker redis://:***@127.0.0.1:1/0 unreachable" in \
        outputs["submit, Redis down"]
    assert "postgresql+psycopg://postgres:***@127.0.0.1:5432/test" in outputs["status"]
    for name, text in outputs.items():
        for secret in (PG, REDIS, AMQP, NEO):
            assert secret not in text, f"{name} printed a password:\n{text}"
