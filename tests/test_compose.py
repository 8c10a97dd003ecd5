"""The docker-compose stack and the Dockerfile, checked without a Docker engine.

What can be checked here is: the file parses and validates (docker-compose itself, where it
is installed), every variable the services use is one the application reads or one the
file documents, every service has a healthcheck or says why not, worker commands name real
worker kinds whose queues the app routes to, images are pinned, ports stay on 127.0.0.1.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.queue.app import (
    GPU_QUEUE,
    QUERY_QUEUE,
    ROUTE_BATCH,
    SIMILAR,
    librarian_queue,
    make_app,
)
from pipeline.serving import default_config
from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = {n for n, s in SERVICES.items() if s.get("image", "").startswith("moe-pipeline")}
# Variables only docker compose and the third-party images read (documented in .env.example).
COMPOSE_ONLY = {"COMPOSE_PROFILES", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB",
                "REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD", "NEO4J_HTTP_PORT",
                "NEO4J_BOLT_PORT", "POSTGRES_PORT", "REDIS_PORT", "FLOWER_PORT",
                "RABBITMQ_USER", "RABBITMQ_PASSWORD", "RABBITMQ_PORT", "API_PORT"}


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def settings_variables() -> set[str]:
    """Every environment variable `Settings` reads."""
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is not None and hasattr(alias, "choices"):
            names.update(alias.choices)
        else:
            names.add(f"MOE_{name.upper()}")
    return names


def test_the_expected_services_exist():
    assert set(SERVICES) == {"neo4j", "redis", "rabbitmq", "postgres", "migrate", "gpu-worker",
                             "cpu-worker", "librarian", "query", "flower", "api"}
    # RabbitMQ carries the tasks (a dead worker's messages come back at once); Redis the
    # shard locks and query answers.
    env = SERVICES["librarian"]["environment"]
    assert env["CELERY_BROKER_URL"].startswith("amqp://") and env["REDIS_URL"].startswith(
        "redis://")
    assert SERVICES["gpu-worker"]["profiles"] == ["gpu"]
    assert SERVICES["cpu-worker"]["profiles"] == ["cpu"]
    assert env_example()["COMPOSE_PROFILES"] in ("gpu", "cpu")
    devices = SERVICES["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert SERVICES["cpu-worker"]["environment"]["MOE_DEVICE"] == "cpu"


def test_every_variable_is_read_by_the_application_or_documented():
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))  # $${...}: the container's shell
    example = env_example()
    assert used <= set(example), f"not in .env.example: {sorted(used - set(example))}"
    known = settings_variables()
    for name in example:
        assert name in known or name in COMPOSE_ONLY, f".env.example: {name} is read by nothing"
    for service in APP_SERVICES:
        for name in SERVICES[service]["environment"]:
            assert name in known, f"{service}: {name} is not a setting the application reads"


def test_no_secret_is_committed():
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|AUTH|_URL|_URI", key) and "@" in str(value) + key:
                assert "${" in str(value), f"{name}: {key} holds a literal credential"
            if "PASSWORD" in key or key.endswith("AUTH"):
                assert "${" in str(value), f"{name}: {key} holds a literal credential"
    assert all("change-me" in v for k, v in env_example().items() if k.endswith("PASSWORD"))
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_every_service_has_a_healthcheck_or_a_reason():
    for name, service in SERVICES.items():
        assert "healthcheck" in service or service.get("x-healthcheck-reason"), name
    for name in APP_SERVICES - {"migrate", "flower"}:
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully"
    assert SERVICES["migrate"]["command"] == ["alembic", "upgrade", "head"]


def test_worker_commands_name_kinds_whose_queues_the_app_routes_to():
    routes = make_app(Settings()).conf.task_routes
    queues = {"gpu": {routes[ROUTE_BATCH]["queue"]}, "query": {routes[SIMILAR]["queue"]},
              "librarian": {librarian_queue(name) for name, _ in
                            default_config().constellation_members()}}
    assert queues["gpu"] == {GPU_QUEUE} and queues["query"] == {QUERY_QUEUE}
    kinds = set()
    # Flower runs from the same image so that it can read the workers' message format.
    assert SERVICES["flower"]["command"][:4] == ["celery", "-A", "pipeline.queue.app", "flower"]
    # published on this host: it holds the broker's password only, and no state
    assert set(SERVICES["flower"]["environment"]) == {"CELERY_BROKER_URL"}
    assert SERVICES["flower"]["volumes"] == []
    # The API serves on the published port (loopback on the host) and checks /health.
    assert SERVICES["api"]["command"][:2] == ["moe-pipeline", "serve"]
    assert SERVICES["api"]["ports"] == ["127.0.0.1:${API_PORT}:8000"]
    assert "/health" in SERVICES["api"]["healthcheck"]["test"][-1]
    for name in APP_SERVICES - {"migrate", "flower", "api"}:
        command = SERVICES[name]["command"]
        assert command[:2] == ["moe-pipeline", "worker"], name
        assert command[2] in queues, f"{name}: no worker kind {command[2]!r}"
        kinds.add(command[2])
        # the healthcheck pings the node name the command sets
        assert command[command.index("--name") + 1] == "worker@%h"
        assert "worker@$$(hostname)" in SERVICES[name]["healthcheck"]["test"][1]
    assert kinds == {"gpu", "librarian", "query"}


def test_images_are_pinned_and_ports_stay_on_localhost():
    for name, service in SERVICES.items():
        image = service.get("image", "")
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert re.search(r"\d", tag) and tag != "latest", f"{name}: {image!r} is not pinned"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published widely"
        if "ports" not in service:
            assert service["networks"] == ["backend"], name
    assert COMPOSE["networks"]["backend"]["internal"] is True
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base.startswith("pytorch/pytorch:2.") and "cuda" in base
    assert re.search(r"^USER moe$", dockerfile, re.M) and "'.[text,monitor,serve]'" in dockerfile
    assert 'VOLUME ["/var/lib/moe"]' in dockerfile


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose is not installed (Debian: apt install docker-compose)")
def test_docker_compose_validates_the_file():
    for profile in ("gpu", "cpu"):
        out = subprocess.run(["docker-compose", "--env-file", ".env.example", "--profile",
                              profile, "config", "--services"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"{profile}-worker" in out.stdout.split()
