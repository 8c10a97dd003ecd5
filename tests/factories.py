"""Small things the tests make for themselves: clustered unit vectors and their reports, the
settings of a run on a test's graph, a free loopback port."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from pipeline.records import DraftReport, report_id
from pipeline.settings import Settings


def clustered(rng: np.random.Generator, n: int, centres: int, dim: int = 16,
              noise: float = 0.15) -> np.ndarray:
    """Unit vectors around a few centres: many near-duplicates, some strangers."""
    c = rng.standard_normal((centres, dim))
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reports_for(emb: np.ndarray, job: str, shard: str, start: int = 0) -> list[DraftReport]:
    return [DraftReport(report_id(job, f"item{start + k}", shard), job, f"item{start + k}",
                        shard, emb[k], 0.9, {f"{shard}-e{k % 3}": 0.6, f"{shard}-e3": 0.2},
                        f"text {start + k}") for k in range(len(emb))]


def graph_settings(tmp_path: Path, graph, sql_url: str | None = None) -> Settings:
    """The settings of a run on ``graph`` (the `graph` fixture's store), with its state dir in
    ``tmp_path`` and ``sql_url`` (default a SQLite file there); skips on a backend that gives
    no credentials to configure a run with."""
    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials to configure a run with")
    return Settings(state_dir=tmp_path, neo4j_uri=graph.uri, neo4j_username=graph.auth[0],
                    neo4j_password=graph.auth[1], neo4j_database=graph.database,
                    database_url=sql_url or f"sqlite:///{tmp_path / 'runs.sqlite3'}",
                    device="cpu")


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
