"""Benchmark: items per second through the whole pipeline, and where the time goes.

10,000 vector items (32 dims, topics with near-duplicates) in batches of 256, run in process
on the embedded default (its own graph server and SQLite file in a temporary state dir); the
time split per stage comes from the batches' recorded timings. The queued path (Celery) is
not built yet, so this run has no reference to compare against.

Usage: ``python bench/pipeline_e2e.py [--quick] [--items N] [--batch-size B]`` (not
``pipeline.py``: a script of that name would shadow the package for every script here).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from sqlalchemy import select

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

from pipeline.config import Settings  # noqa: E402
from pipeline.jobs import default_config, run_local  # noqa: E402
from pipeline.storage.local_graph import LocalGraphServer  # noqa: E402
from pipeline.storage.sql import Batch, session_factory  # noqa: E402


def items(n: int, dim: int = 32, topics: int = 50, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim))
    return [{"id": f"b-{i}", "vector": (centres[i % topics] + 0.05 * rng.standard_normal(dim))
             .round(5).tolist()} for i in range(n)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    n = args.items or (600 if args.quick else 10_000)
    state = tempfile.mkdtemp(prefix="moe-bench-pipeline-")
    settings = Settings(state_dir=state, device="cpu",
                        database_url=f"sqlite:///{state}/runs.sqlite3")
    server = LocalGraphServer(state)
    try:
        run_local(items(256, seed=99), settings, batch_size=args.batch_size)  # warm the server
        summary = run_local(items(n), settings, batch_size=args.batch_size)
        with session_factory(settings.sql_url())() as s:
            batches = s.scalars(select(Batch).where(Batch.job_id == summary.job_id)).all()
            stages = {k: sum(b.timings.get(k, 0.0) for b in batches)
                      for k in ("encode", "route", "curate")}
    finally:
        server.stop()
    total = sum(stages.values())
    return emit("pipeline", torch.device("cpu"),
                {"items": n, "batch_size": args.batch_size, "mode": "embedded in-process",
                 "model": {k: v for k, v in default_config().to_dict().items()
                           if k in ("input_dim", "hidden_dim", "num_experts", "top_k_experts",
                                    "num_layers")}, "quick": args.quick},
                results={"embedded_items_per_s": round(n / summary.seconds, 1),
                         "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
                         "stage_share": {k: round(v / total, 3) for k, v in stages.items()},
                         "reports": summary.reports, "new_insights": summary.inserted,
                         "merged": summary.merged},
                references={}, ratios={}, targets={},
                note="the queued path (Celery) is not built yet: no queued figure to compare")


if __name__ == "__main__":
    main()
    sys.exit(0)
