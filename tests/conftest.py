"""Shared test set-up: markers that skip with their reason, and a fixed seed per test."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch


def _docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    no_docker = pytest.mark.skip(reason="needs a Docker engine; `docker info` failed")
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
