"""The pipeline's one code path: route a batch, curate a shard part, answer `similar`.

Both ways to run call these functions and nothing else does the work. `route_batch` takes a
``ship`` callable for the shard parts it produces: the in-process run (`jobs.run_local`)
passes one that curates the part at once (`curate_part`), the Celery task one that sends it
to the shard's librarian queue. Each function counts its delivery in the ledger first, so a
redelivered batch or part finishes what an earlier delivery began and repeats nothing.
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import encoders
from pipeline.errors import PipelineError
from pipeline.inputs import read_items
from pipeline.moe.system import MixtureOfExpertsSystem
from pipeline.records import DraftReport, Item, ItemBatch, ShardPart, report_id
from pipeline.runtime import Runtime, worker_name
from pipeline.settings import Settings
from pipeline.storage import ledger

Ship = Callable[[ShardPart], None]


def encode(items: Sequence[Item], input_dim: int, seed: int = 0,
           text_model: str | None = None, device: str = "cpu") -> torch.Tensor:
    """The items as ``(n, input_dim)`` rows: text through the encoder, vectors projected."""
    return encoders.encode_items(items, input_dim, seed, text_model, device)


@dataclass
class Routed:
    reports: list[DraftReport]
    metrics: ledger.RoutingMetrics


@torch.no_grad()
def route(system: MixtureOfExpertsSystem, x: torch.Tensor, items: Sequence[Item],
          job_id: str) -> Routed:
    """The model's forward with draft reports, turned into host records (one sync, here).

    A chosen constellation none of whose experts any token of the item reached (possible
    where routing is flat and the supervisor untrained) gives no report.
    """
    system.eval()
    device = next(system.parameters()).device
    out = system.draft_reports(x.to(device))
    rep = out.reports
    ids = rep.constellation_ids.cpu().numpy()
    scores = rep.scores.float().cpu().numpy()
    emb = rep.embeddings.float().cpu().numpy()
    weights = rep.expert_weights.float().cpu().numpy()
    names = system.constellation.names
    experts = system.constellation.expert_names
    reports = []
    for b, item in enumerate(items):
        for c in range(ids.shape[1]):
            shard = names[ids[b, c]]
            fired = {experts[e]: float(w) for e, w in enumerate(weights[b, c]) if w > 0}
            if not fired:  # no token of this item reached the constellation: nothing to say
                continue
            reports.append(DraftReport(report_id(job_id, item.id, shard), job_id, item.id,
                                       shard, emb[b, c], float(scores[b, c]), fired,
                                       item.text or ""))
    counts = torch.stack([a.counts for a in out.aux]).sum(0).float().cpu()
    usage = (counts / counts.sum().clamp_min(1)).tolist()
    metrics = ledger.RoutingMetrics(
        len(reports), float(torch.stack([a.balance_loss for a in out.aux]).mean()),
        float(torch.stack([a.router_entropy for a in out.aux]).mean()),
        {experts[e]: u for e, u in enumerate(usage)})
    return Routed(reports, metrics)


def by_shard(reports: Sequence[DraftReport]) -> dict[str, list[DraftReport]]:
    """Reports grouped by the shard (constellation) whose librarian curates them."""
    groups: dict[str, list[DraftReport]] = defaultdict(list)
    for r in reports:
        groups[r.constellation].append(r)
    return dict(sorted(groups.items()))


def faults(settings: Settings, attempt: int, item_ids: Sequence[str]) -> None:
    """Fault injection for tests and drills (both off unless set): stall the first attempt,
    or kill this process when the work holds a given item."""
    if settings.fault_stall_s and attempt == 1:
        time.sleep(settings.fault_stall_s)
    if settings.fault_kill_item and settings.fault_kill_item in item_ids:
        os.kill(os.getpid(), signal.SIGKILL)


def route_batch(rt: Runtime, batch: ItemBatch, ship: Ship,
                on_attempt: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encode and route one batch, record its parts, and ship one part per shard.

    ``on_attempt(n)`` is told the attempt this delivery counted, before any work (the queue's
    error policy gives it back after an outage). Returns a summary for the task's log.
    """
    s = rt.settings
    verdict, attempts = ledger.begin_batch(rt.Session, batch.batch_id, worker_name(),
                                           rt.device, s.max_attempts)
    if verdict != "run":
        return {"batch": batch.batch_id, "status": verdict, "attempts": attempts}
    if on_attempt:
        on_attempt(attempts)
    if batch.model != rt.fingerprint:
        raise PipelineError(
            f"batch {batch.batch_id}: submitted for model {batch.model}, but this worker "
            f"serves {rt.fingerprint}; start the GPU workers with the MOE_MODEL_PATH, MOE_SEED "
            "and MOE_TEXT_MODEL the job was submitted with")
    faults(s, attempts, [i.id for i in batch.items])
    system = rt.system
    timings: dict[str, float] = {}
    t = time.perf_counter()
    x = encode(batch.items, system.config.input_dim, s.seed, s.text_model, rt.device)
    timings["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    routed = route(system, x, batch.items, batch.job_id)
    timings["route"] = time.perf_counter() - t
    groups = by_shard(routed.reports)
    pending = ledger.record_routing(rt.Session, batch.batch_id, routed.metrics,
                                    {k: len(v) for k, v in groups.items()}, timings)
    if pending is None:  # another delivery of this batch moved it on
        return {"batch": batch.batch_id, "status": "done", "attempts": attempts}
    for shard in pending:
        ship(ShardPart(batch.batch_id, batch.run_id, shard, groups[shard], batch.model))
    ledger.mark_dispatched(rt.Session, batch.batch_id, pending)
    ledger.mark_routed(rt.Session, batch.batch_id)
    return {"batch": batch.batch_id, "status": "routed", "reports": len(routed.reports),
            "shards": sorted(groups)}


def curate_part(rt: Runtime, part: ShardPart,
                on_attempt: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Curate one shard part into the graph (under the shard's lock) and record it."""
    verdict, attempts = ledger.begin_part(rt.Session, part.batch_id, part.shard,
                                          worker_name(), rt.settings.max_attempts)
    if verdict != "run":
        return {"batch": part.batch_id, "shard": part.shard, "status": verdict,
                "attempts": attempts}
    if on_attempt:
        on_attempt(attempts)
    faults(rt.settings, attempts, [r.item_id for r in part.reports])
    config = rt.run_config(part.run_id)
    rt.ensure_run(part.run_id, config)
    t = time.perf_counter()
    result = rt.librarian(config).curate(part.shard, part.reports, run_id=part.run_id,
                                         model=part.model)
    ledger.finish_part(rt.Session, part.batch_id, part.shard, result, time.perf_counter() - t)
    return {"batch": part.batch_id, "shard": part.shard, "status": "done",
            "inserted": result.inserted, "merged": result.merged}


def query_input(rt: Runtime, text: str | None, vector: Sequence[float] | None
                ) -> torch.Tensor:
    """One question as the model's input row, validated like an item."""
    raw: dict[str, Any] = ({"id": "query", "text": text} if text is not None
                           else {"id": "query", "vector": [float(v) for v in vector or []]})
    items, bad = read_items([raw])
    if bad:
        raise PipelineError(f"query: {bad[0].field}: {bad[0].message}")
    s = rt.settings
    return encode(items, rt.config.input_dim, s.seed, s.text_model, rt.device)


@torch.no_grad()
def similar(rt: Runtime, text: str | None = None, vector: Sequence[float] | None = None,
            k: int = 10) -> list[dict[str, Any]]:
    """Insights nearest to one text or vector, in the space they live in: the input goes
    through the model like an item, and each report it would draft is searched in its
    constellation's shard (cache caught up by seq first). Best ``k`` over the shards, an
    insight once."""
    system = rt.system
    x = query_input(rt, text, vector)
    system.eval()
    device = next(system.parameters()).device
    rep = system.draft_reports(x.reshape(1, -1).to(device)).reports
    ids = rep.constellation_ids[0].cpu().tolist()
    emb = rep.embeddings[0].float().cpu()
    names = system.constellation.names
    librarian = rt.librarian(system.config)
    best: dict[str, dict] = {}
    for c, shard_index in enumerate(ids):
        for hit in librarian.search(emb[c], k, shards=[names[shard_index]],
                                    model=rt.fingerprint):
            if hit["node_id"] not in best or best[hit["node_id"]]["similarity"] < hit[
                    "similarity"]:
                best[hit["node_id"]] = hit
    hits = sorted(best.values(), key=lambda h: -h["similarity"])[:k]
    details = rt.graph.insight_details([h["node_id"] for h in hits])
    return [{**h, **{key: details.get(h["node_id"], {}).get(key)
                     for key in ("summary", "support", "sources")}} for h in hits]
