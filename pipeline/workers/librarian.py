"""The librarian task: one batch's reports for one shard → curated into the graph.

Runs on ``librarian.<shard>`` queues. One process keeps one warm cache per shard and model
shape; the shard's Redis lock makes any number of librarian workers safe on the same shard.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from pipeline import jobs, stages
from pipeline.config import MoEConfig
from pipeline.errors import PipelineError
from pipeline.storage.sql import Run
from pipeline.workers.app import CURATE_PART, Resources, app, guarded
from pipeline.workers.gpu import faults, message_reports

_CONFIGS: dict[str, MoEConfig] = {}


def run_config(res: Resources, run_id: str) -> MoEConfig:
    """The model config a run was submitted with (from SQL, once per process)."""
    if run_id not in _CONFIGS:
        with res.Session() as s:
            data = s.scalar(select(Run.model_config).where(Run.id == run_id))
        if data is None:
            raise PipelineError(f"run {run_id}: not in SQL ({res.settings.sql_url()})")
        _CONFIGS[run_id] = MoEConfig.from_dict(data)
    return _CONFIGS[run_id]


@app.task(bind=True, name=CURATE_PART)
def curate_part(self, message: dict[str, Any]) -> dict[str, Any]:
    """One shard part, under the error policy of `app.guarded`."""
    batch_id, shard = message["batch_id"], message["shard"]
    res = Resources.get()
    return guarded(self, lambda attempt: _curate(res, message, attempt),
                   lambda n: jobs.release_part(res.Session, batch_id, shard, n),
                   lambda error: jobs.fail_part(res.Session, batch_id, shard, error))


def _curate(res: Resources, message: dict[str, Any], attempt: list[int]) -> dict[str, Any]:
    batch_id, shard, run_id = message["batch_id"], message["shard"], message["run_id"]
    verdict, attempts = jobs.begin_part(res.Session, batch_id, shard, jobs.worker_name(),
                                        res.settings.max_attempts)
    if verdict != "run":
        return {"batch": batch_id, "shard": shard, "status": verdict, "attempts": attempts}
    attempt[0] = attempts
    faults(res.settings, attempts, message["item_ids"])
    config = run_config(res, run_id)
    res.ensure_run(run_id, config)
    t = time.perf_counter()
    result = stages.curate(res.librarian(config), shard, message_reports(message), run_id)
    jobs.finish_part(res.Session, batch_id, shard, result, time.perf_counter() - t)
    return {"batch": batch_id, "shard": shard, "status": "done", "inserted": result.inserted,
            "merged": result.merged}
