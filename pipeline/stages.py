"""The pipeline's stages as plain functions: encode, route, curate, record.

The in-process run (`jobs.run_local`) calls them one batch after another; the Celery tasks
(`pipeline.workers`) call the same functions, one batch or one shard part per task.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline import encoders
from pipeline.inputs import Item
from pipeline.librarian import CurateResult, Librarian
from pipeline.moe.system import MixtureOfExpertsSystem
from pipeline.reports import DraftReport, report_id


def encode(items: Sequence[Item], input_dim: int, seed: int = 0,
           text_model: str | None = None, device: str = "cpu") -> torch.Tensor:
    """The items as ``(n, input_dim)`` rows: text through the encoder, vectors projected."""
    return encoders.encode_items(items, input_dim, seed, text_model, device)


@dataclass
class Routed:
    reports: list[DraftReport]
    balance_loss: float
    routing_entropy: float
    expert_usage: dict[str, float]


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
    return Routed(reports, float(torch.stack([a.balance_loss for a in out.aux]).mean()),
                  float(torch.stack([a.router_entropy for a in out.aux]).mean()),
                  {experts[e]: u for e, u in enumerate(usage)})


def by_shard(reports: Sequence[DraftReport]) -> dict[str, list[DraftReport]]:
    """Reports grouped by the shard (constellation) whose librarian curates them."""
    groups: dict[str, list[DraftReport]] = defaultdict(list)
    for r in reports:
        groups[r.constellation].append(r)
    return dict(sorted(groups.items()))


def curate(librarian: Librarian, shard: str, reports: Sequence[DraftReport],
           run_id: str | None = None) -> CurateResult:
    """One shard's reports through the librarian (under the shard's lock)."""
    return librarian.curate(shard, reports, run_id=run_id)


@torch.no_grad()
def similar(system: MixtureOfExpertsSystem, librarian: Librarian, x: torch.Tensor,
            k: int = 10) -> list[dict]:
    """Insights nearest to one input, in the space they live in: the input goes through the
    model like an item, and each report it would draft is searched in its constellation's
    shard (cache caught up by seq first). Best ``k`` over the shards, an insight once."""
    system.eval()
    device = next(system.parameters()).device
    rep = system.draft_reports(x.reshape(1, -1).to(device)).reports
    ids = rep.constellation_ids[0].cpu().tolist()
    emb = rep.embeddings[0].float().cpu()
    names = system.constellation.names
    best: dict[str, dict] = {}
    for c, shard_index in enumerate(ids):
        for hit in librarian.search(emb[c], k, shards=[names[shard_index]]):
            if hit["node_id"] not in best or best[hit["node_id"]]["similarity"] < hit[
                    "similarity"]:
                best[hit["node_id"]] = hit
    hits = sorted(best.values(), key=lambda h: -h["similarity"])[:k]
    details = librarian.graph.insight_details([h["node_id"] for h in hits])
    return [{**h, **{key: details.get(h["node_id"], {}).get(key)
                     for key in ("summary", "support", "sources")}} for h in hits]
