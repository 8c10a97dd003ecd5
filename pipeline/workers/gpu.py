"""The GPU task: one batch of items → draft reports → one librarian task per shard.

Runs on the ``gpu`` queue in a prefork pool of one process per GPU: the model is loaded in
that process after the fork (`app._load_once`), so the parent never initialises CUDA.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np

from pipeline import jobs, stages
from pipeline.errors import PipelineError
from pipeline.inputs import Item
from pipeline.reports import DraftReport
from pipeline.workers.app import (
    CURATE_PART,
    ROUTE_BATCH,
    Resources,
    app,
    guarded,
    librarian_queue,
)


def batch_message(batch_id: str, job_id: str, run_id: str, fingerprint: str,
                  items: list[Item]) -> dict[str, Any]:
    """A batch as it travels: ids and texts as JSON, the vectors as one float32 array."""
    rows = [i for i, item in enumerate(items) if item.vector is not None]
    vectors = (np.asarray([items[i].vector for i in rows], dtype=np.float32) if rows
               else None)
    return {"batch_id": batch_id, "job_id": job_id, "run_id": run_id, "model": fingerprint,
            "ids": [item.id for item in items], "texts": [item.text for item in items],
            "vector_rows": rows, "vectors": vectors}


def message_items(message: dict[str, Any]) -> list[Item]:
    vectors = dict(zip(message["vector_rows"], message["vectors"] if message["vector_rows"]
                       else [], strict=True))
    return [Item(item_id, line, text, vectors.get(line)) for line, (item_id, text)
            in enumerate(zip(message["ids"], message["texts"], strict=True))]


def reports_message(batch_id: str, run_id: str, shard: str,
                    reports: list[DraftReport]) -> dict[str, Any]:
    """A shard part as it travels: the embeddings as one float16 array (the precision the
    graph stores and the librarian decides on)."""
    return {"batch_id": batch_id, "run_id": run_id, "shard": shard,
            "job_id": reports[0].job_id, "ids": [r.id for r in reports],
            "item_ids": [r.item_id for r in reports], "scores": [r.score for r in reports],
            "experts": [r.experts for r in reports], "texts": [r.text for r in reports],
            "embeddings": np.stack([np.asarray(r.embedding, np.float16) for r in reports])}


def message_reports(message: dict[str, Any]) -> list[DraftReport]:
    emb = message["embeddings"].astype(np.float32)
    return [DraftReport(rid, message["job_id"], item_id, message["shard"], emb[n], score,
                        experts, text)
            for n, (rid, item_id, score, experts, text) in enumerate(zip(
                message["ids"], message["item_ids"], message["scores"], message["experts"],
                message["texts"], strict=True))]


def faults(settings, attempt: int, item_ids: list[str]) -> None:  # noqa: ANN001
    """Fault injection for tests and drills (both off unless set)."""
    if settings.fault_stall_s and attempt == 1:
        time.sleep(settings.fault_stall_s)
    if settings.fault_kill_item and settings.fault_kill_item in item_ids:
        os.kill(os.getpid(), signal.SIGKILL)


@app.task(bind=True, name=ROUTE_BATCH)
def route_batch(self, message: dict[str, Any]) -> dict[str, Any]:
    """One batch, under the error policy of `app.guarded`."""
    batch_id = message["batch_id"]
    res = Resources.get()
    return guarded(self, lambda attempt: _route(res, message, attempt),
                   lambda n: jobs.release_batch(res.Session, batch_id, n),
                   lambda error: jobs.fail_batch(res.Session, batch_id, error))


def _route(res: Resources, message: dict[str, Any], attempt: list[int]) -> dict[str, Any]:
    batch_id, job_id, run_id = message["batch_id"], message["job_id"], message["run_id"]
    verdict, attempts = jobs.begin_batch(res.Session, batch_id, jobs.worker_name(),
                                         res.device, res.settings.max_attempts)
    if verdict != "run":
        return {"batch": batch_id, "status": verdict, "attempts": attempts}
    attempt[0] = attempts
    system = res.system
    served = res.fingerprint
    if message["model"] != served:
        raise PipelineError(
            f"batch {batch_id}: submitted for model {message['model']}, but this worker "
            f"serves {served}; start the GPU workers with the MOE_MODEL_PATH, MOE_SEED and "
            "MOE_TEXT_MODEL the job was submitted with")
    faults(res.settings, attempts, message["ids"])
    items = message_items(message)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    x = stages.encode(items, system.config.input_dim, res.settings.seed,
                      res.settings.text_model, res.device)
    timings["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    routed = stages.route(system, x, items, job_id)
    timings["route"] = time.perf_counter() - t
    groups = stages.by_shard(routed.reports)
    pending = jobs.record_routing(res.Session, batch_id, routed,
                                  {k: len(v) for k, v in groups.items()}, timings)
    if pending is None:  # another delivery of this batch moved it on
        return {"batch": batch_id, "status": "done", "attempts": attempts}
    for shard in pending:
        app.send_task(CURATE_PART, args=[reports_message(batch_id, run_id, shard,
                                                         groups[shard])],
                      queue=librarian_queue(shard))
    jobs.mark_dispatched(res.Session, batch_id, pending)
    jobs.mark_routed(res.Session, batch_id)
    return {"batch": batch_id, "status": "routed", "reports": len(routed.reports),
            "shards": sorted(groups)}
