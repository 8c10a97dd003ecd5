"""Small data the tests make for themselves: clustered unit vectors and their reports."""

from __future__ import annotations

import numpy as np

from pipeline.records import DraftReport, report_id


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
