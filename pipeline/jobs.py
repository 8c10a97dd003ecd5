"""Jobs: a file of items, split into batches, run through the stages, recorded in SQL.

`run_local` is the embedded default: the stages run in this process against the graph the
settings name (the embedded server unless ``NEO4J_URI`` is set) and SQL at ``DATABASE_URL``
(a SQLite file in the state dir by default).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import pipeline
from pipeline import stages
from pipeline.config import MoEConfig, Settings
from pipeline.errors import PipelineError
from pipeline.inputs import read_items
from pipeline.librarian import Librarian
from pipeline.locks import shard_locks
from pipeline.moe.system import MixtureOfExpertsSystem
from pipeline.storage.local_graph import open_graph
from pipeline.storage.sql import Batch, BatchMetrics, ItemError, Job, Run, session_factory


class JobFailed(PipelineError):
    """A job with no good item, or whose every batch failed; names the job."""


def default_config() -> MoEConfig:
    """The model the embedded run uses when none is given: small enough for a laptop CPU,
    with four constellations of two experts, one chosen per item."""
    return MoEConfig(input_dim=128, hidden_dim=256, output_dim=128, num_experts=8,
                     top_k_experts=2, num_layers=2, use_compile=False, use_amp=False,
                     constellations={"mathematics": [0, 1], "language": [2, 3],
                                     "vision": [4, 5], "memory": [6, 7]})


@dataclass
class JobSummary:
    job_id: str
    run_id: str
    status: str
    items: int
    bad_items: int
    reports: int
    inserted: int
    merged: int
    seconds: float


def run_local(source: str | Path | list[dict[str, Any]], settings: Settings | None = None,
              config: MoEConfig | None = None, batch_size: int = 256,
              progress: Callable[[int], None] | None = None) -> JobSummary:
    """Run a job in this process; ``progress(n)`` is told as each batch's n items finish."""
    settings = settings or Settings()
    config = config or default_config()
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    items, bad = read_items(source)
    Session = session_factory(settings.sql_url())
    system = MixtureOfExpertsSystem(config).to(settings.torch_device())
    with Session.begin() as s:
        run = Run(model_config=config.to_dict(), code_version=pipeline.__version__,
                  device=settings.torch_device())
        job = Job(run=run, submitted_items=len(items) + len(bad), status="running")
        s.add_all([run, job] + [ItemError(job=job, item_id=b.item_id, line=b.line,
                                          field=b.field, message=b.message) for b in bad])
        run_id, job_id = run.id, job.id
    if not items:
        _finish(Session, job_id, "failed", "no valid item")
        raise JobFailed(f"job {job_id}: no valid item ({len(bad)} bad; see item_errors)")
    texts = sum(item.vector is None for item in items)
    if texts:
        message = (f"{texts} text items: the in-process run takes vectors for now (the text "
                   "encoder arrives with the queued pipeline)")
        _finish(Session, job_id, "failed", message)
        raise JobFailed(f"job {job_id}: {message}")
    graph = open_graph(settings)
    try:
        graph.ensure_schema()
        graph.ensure_run(run_id, config.to_dict(), {
            name: [system.constellation.expert_names[e]
                   for e in system.constellation.members(name)]
            for name in system.constellation.names})
        librarian = Librarian.from_config(graph, shard_locks(settings), config, run_id)
        projection = stages.Projection(len(items[0].vector or []), config.input_dim,
                                       settings.seed)
        totals = {"reports": 0, "inserted": 0, "merged": 0}
        for index in range(0, len(items), batch_size):
            chunk = items[index: index + batch_size]
            _run_batch(Session, job_id, index // batch_size, chunk, system, projection,
                       librarian, totals)
            if progress:
                progress(len(chunk))
    finally:
        graph.close()
    status = "completed_with_errors" if bad else "completed"
    _finish(Session, job_id, status, None)
    return JobSummary(job_id, run_id, status, len(items), len(bad), totals["reports"],
                      totals["inserted"], totals["merged"], time.perf_counter() - start)


def _run_batch(Session, job_id: str, index: int, chunk, system, projection, librarian,
               totals: dict[str, int]) -> None:
    with Session.begin() as s:
        batch = Batch(job_id=job_id, index=index, item_ids=[i.id for i in chunk],
                      status="running", attempts=1, worker="local",
                      device=str(next(system.parameters()).device))
        s.add(batch)
        batch_id = batch.id
    timings: dict[str, float] = {}
    t = time.perf_counter()
    x = stages.encode(chunk, projection)
    timings["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    routed = stages.route(system, x, chunk, job_id)
    timings["route"] = time.perf_counter() - t
    t = time.perf_counter()
    results = stages.curate(librarian, routed.reports)
    timings["curate"] = time.perf_counter() - t
    inserted = sum(r.inserted for r in results.values())
    merged = sum(r.merged for r in results.values())
    n = len(routed.reports)
    totals["reports"] += n
    totals["inserted"] += inserted
    totals["merged"] += merged
    with Session.begin() as s:
        row = s.get(Batch, batch_id)
        row.status, row.timings = "completed", timings
        s.add(BatchMetrics(batch_id=batch_id, balance_loss=routed.balance_loss,
                           routing_entropy=routed.routing_entropy,
                           expert_usage=routed.expert_usage, reports=n,
                           new_insights=inserted, merged=merged,
                           dedup_rate=merged / n if n else 0.0))


def _finish(Session, job_id: str, status: str, error: str | None) -> None:
    with Session.begin() as s:
        job = s.get(Job, job_id)
        job.status, job.error, job.finished_at = status, error, time.time()
