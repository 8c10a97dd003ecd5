"""Benchmark: items per second through the whole pipeline, and where the time goes.

10,000 vector items (32 dims, topics with near-duplicates) in batches of 256, two ways on the
same embedded graph server and SQLite file (a temporary state dir): in process (`run_local`,
the reference) and queued (`submit`: one GPU/CPU worker and one librarian worker, real Celery
processes on the Redis at ``BENCH_REDIS_URL``, default db 13 on localhost, which is
flushed). The two take turns for ``--rounds`` rounds, each on fresh items, and the figures
are medians. Queued items/s count from the first message sent to the job's completion in
SQL. The time split per stage comes from the batches' recorded timings.

Usage: ``python bench/pipeline.py [--quick] [--items N] [--batch-size B] [--rounds R] [--neo4j]``
(``--neo4j``: a real Neo4j from tools/neo4j/launcher.sh is the graph of both paths)
(``common`` takes bench/ off ``sys.path`` first, so this file does not shadow the package).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from sqlalchemy import select

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, target  # noqa: E402

from pipeline import jobs  # noqa: E402
from pipeline.jobs import run_local  # noqa: E402
from pipeline.serving import default_config  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.storage.embedded import LocalGraphServer  # noqa: E402
from pipeline.storage.sql import Batch, session_factory  # noqa: E402


def items(n: int, dim: int = 32, topics: int = 50, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim))
    return [{"id": f"b-{i}", "vector": (centres[i % topics] + 0.05 * rng.standard_normal(dim))
             .round(5).tolist()} for i in range(n)]


class Workers:
    """One GPU/CPU worker and one librarian worker, as `moe-pipeline worker` processes."""

    def __init__(self, env: dict[str, str], logdir: str) -> None:
        self.procs = []
        for kind in ("gpu", "librarian"):
            log = open(os.path.join(logdir, f"{kind}.log"), "w")  # noqa: SIM115
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", kind,
                                     "--loglevel", "WARNING"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(proc)

    def close(self) -> None:
        for proc in self.procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def stage_seconds(settings: Settings, job_id: str) -> dict[str, float]:
    with session_factory(settings.sql_url())() as s:
        batches = s.scalars(select(Batch).where(Batch.job_id == job_id)).all()
        return {k: sum(b.timings.get(k, 0.0) for b in batches)
                for k in ("encode", "route", "curate")}


def queued(raw: list[dict], settings: Settings, batch_size: int) -> tuple[str, float]:
    start = time.perf_counter()
    job = jobs.submit(raw, settings, batch_size)
    state = jobs.wait(session_factory(settings.sql_url(), run_migrations=False), job.job_id,
                      timeout_s=1800, poll_s=0.05)
    if state.status != "completed":
        raise RuntimeError(f"queued job {job.job_id} ended {state.status}")
    return job.job_id, time.perf_counter() - start


def _agent(settings: Settings) -> str:
    from pipeline.storage.connect import open_graph

    graph = open_graph(settings)
    try:
        return graph.driver.get_server_info().agent
    finally:
        graph.close()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--neo4j", action="store_true",
                   help="a real Neo4j (tools/neo4j/launcher.sh) as the graph of both paths, "
                        "instead of the embedded server")
    args = p.parse_args(argv)
    n = args.items or (600 if args.quick else 10_000)
    rounds = args.rounds or (1 if args.quick else 2)
    state = tempfile.mkdtemp(prefix="moe-bench-pipeline-")
    broker = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    import redis

    redis.Redis.from_url(broker).flushdb()
    env = {**os.environ, "MOE_STATE_DIR": state, "MOE_DEVICE": "cpu",
           "DATABASE_URL": f"sqlite:///{state}/runs.sqlite3", "CELERY_BROKER_URL": broker,
           "REDIS_URL": broker}
    env.pop("NEO4J_URI", None)  # both paths on the embedded server of this state dir
    graph_kw: dict = {"neo4j_uri": None}
    if args.neo4j:
        sys.path.insert(0, os.path.join(ROOT, "tools", "neo4j"))
        from harness import Neo4jHarness

        server = Neo4jHarness().start()
        env.update(NEO4J_URI=server.uri, NEO4J_USERNAME=server.user,
                   NEO4J_PASSWORD=server.password)
        graph_kw = {"neo4j_uri": server.uri, "neo4j_username": server.user,
                    "neo4j_password": server.password}
    else:
        server = LocalGraphServer(state)
        server.start()
    settings = Settings(state_dir=state, device="cpu", celery_broker_url=broker,
                        redis_url=broker, database_url=env["DATABASE_URL"], **graph_kw)
    agent = _agent(settings)
    workers = Workers(env, state)
    local_rates, queued_rates, splits = [], [], {"embedded": [], "queued": []}
    try:
        run_local(items(256, seed=99), settings, batch_size=args.batch_size)  # warm up
        queued(items(256, seed=98), settings, args.batch_size)  # workers loaded, caches warm
        summary = None
        for r in range(rounds):
            summary = run_local(items(n, seed=2 * r), settings, batch_size=args.batch_size)
            local_rates.append(n / summary.seconds)
            splits["embedded"].append(stage_seconds(settings, summary.job_id))
            job_id, seconds = queued(items(n, seed=2 * r + 1), settings, args.batch_size)
            queued_rates.append(n / seconds)
            splits["queued"].append(stage_seconds(settings, job_id))
    finally:
        workers.close()
        server.stop()
    local, remote = statistics.median(local_rates), statistics.median(queued_rates)
    split = {mode: {k: round(statistics.median(s[k] for s in runs), 3)
                    for k in ("encode", "route", "curate")} for mode, runs in splits.items()}
    return emit("pipeline", torch.device("cpu"),
                {"items": n, "batch_size": args.batch_size, "rounds": rounds,
                 "queued": "1 gpu worker (cpu here) + 1 librarian worker, Redis broker",
                 "graph": agent,
                 "model": {k: v for k, v in default_config().to_dict().items()
                           if k in ("input_dim", "hidden_dim", "num_experts", "top_k_experts",
                                    "num_layers")}, "quick": args.quick},
                results={"queued_items_per_s": round(remote, 1),
                         "queued_items_per_s_runs": [round(v, 1) for v in queued_rates],
                         "stage_seconds": split,
                         "stage_share": {mode: {k: round(v / max(sum(st.values()), 1e-9), 3)
                                                for k, v in st.items()}
                                         for mode, st in split.items()},
                         "reports_last_embedded_run": summary.reports if summary else 0},
                references={"embedded_items_per_s": round(local, 1),
                            "embedded_items_per_s_runs": [round(v, 1) for v in local_rates]},
                ratios={"queued_vs_embedded": round(remote / local, 3)},
                targets={"queued_vs_embedded": target(0.75, remote / local)})


if __name__ == "__main__":
    main()
    sys.exit(0)
