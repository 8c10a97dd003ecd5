"""The dedup maths, pure: a shard's draft reports and its cache in, a decision out.

Legend: N reports in a batch, L leaders (reports that stand for their near-duplicates),
D embedding dim.

`decide`: (1) within the batch, each report joins the most similar earlier *leader* at
cosine >= ``dedup_threshold`` or becomes a leader itself (greedy in batch order, so
deterministic); (2) each leader's top-1 in the cache decides merge (>= threshold) or insert;
(3) inserted leaders get SIMILAR_TO edges to cached and to other new insights with
``related_threshold <= cosine < dedup_threshold``. Leaders are pairwise below the threshold
and inserts are below it against the cache, so no two insights of a shard ever reach it.

`build_batch` turns a decision into the graph rows of one transaction (`CuratedBatch`).
The librarian (`pipeline.librarian`) runs both under the shard's lock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from pipeline.cache import EmbeddingCache
from pipeline.records import (
    CuratedBatch,
    DraftReport,
    Insight,
    Produced,
    Similar,
    Support,
    insight_id,
)


def dedup_in_batch(emb_ND: Tensor, threshold: float) -> np.ndarray:
    """Leader index of each report (itself for leaders), greedy in batch order."""
    n = emb_ND.shape[0]
    sims = (emb_ND @ emb_ND.t()).float().cpu().numpy()
    leader = np.arange(n)
    is_leader = np.zeros(n, dtype=bool)
    for i in range(n):
        earlier = np.flatnonzero(is_leader[:i])
        if earlier.size:
            best = earlier[np.argmax(sims[i, earlier])]
            if sims[i, best] >= threshold:
                leader[i] = best
                continue
        is_leader[i] = True
    return leader


@dataclass
class Decision:
    """What to do with each report of a batch."""

    leader: np.ndarray  # (N,) the batch index each report joins (itself for a leader)
    target_row: np.ndarray  # (N,) cache row its leader merges into, -1 for an insert
    inserts: list[int]  # leaders that become new insights, in batch order
    related_cached: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    related_new: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def merged(self) -> int:
        return int((self.target_row >= 0).sum())


def decide(emb_ND: Tensor, cache: EmbeddingCache, dedup_threshold: float,
           related_threshold: float, k_related: int = 5) -> Decision:
    """Merge-or-insert for every report of one shard's batch (pure; see the module doc)."""
    emb = torch.nn.functional.normalize(emb_ND.float().to(cache.device), dim=-1)
    leader = dedup_in_batch(emb, dedup_threshold)
    leaders = np.flatnonzero(leader == np.arange(len(leader)))
    target_row = np.full(len(leader), -1, dtype=np.int64)
    related_cached: dict[int, list[tuple[int, float]]] = {}
    inserts: list[int] = []
    if len(cache):
        scores, rows = cache.search(emb[torch.from_numpy(leaders).to(emb.device)], k_related)
        scores, rows = scores.cpu().numpy(), rows.cpu().numpy()
    for j, li in enumerate(leaders):
        if len(cache) and scores[j, 0] >= dedup_threshold:
            target_row[leader == li] = rows[j, 0]
            continue
        inserts.append(int(li))
        if len(cache):
            near = (scores[j] >= related_threshold) & (scores[j] < dedup_threshold)
            related_cached[int(li)] = [(int(r), float(s))
                                       for r, s in zip(rows[j][near], scores[j][near],
                                                       strict=True)]
    related_new: dict[int, list[tuple[int, float]]] = {}
    if len(inserts) > 1:
        ins = torch.tensor(inserts, device=emb.device)
        sims = (emb[ins] @ emb[ins].t()).float().cpu().numpy()
        for a in range(1, len(inserts)):
            pairs = [(inserts[b], float(sims[a, b])) for b in range(a)
                     if related_threshold <= sims[a, b] < dedup_threshold]
            if pairs:
                related_new[inserts[a]] = pairs
    return Decision(leader, target_row, inserts, related_cached, related_new)


def build_batch(shard: str, reports: Sequence[DraftReport], decision: Decision,
                cache: EmbeddingCache, run_id: str, next_seq: int
                ) -> tuple[CuratedBatch, list[Insight]]:
    """The graph rows of a decision (pure): new insights and every report's edges."""
    new_ids = {li: insight_id(shard, reports[li].id) for li in decision.inserts}
    now = time.time()
    insights = [Insight(new_ids[li], shard, next_seq + k,
                        np.asarray(reports[li].embedding, np.float32), run_id,
                        summary=reports[li].text[:280], created_at=now)
                for k, li in enumerate(decision.inserts)]
    batch = CuratedBatch(run_id, insights=insights)
    produced: dict[tuple[str, str], float] = {}  # one edge per (insight, expert): max weight
    for i, report in enumerate(reports):
        row = decision.target_row[i]
        target = cache.ids[row] if row >= 0 else new_ids[int(decision.leader[i])]
        batch.supports.append(Support(target, report.item_id, report.id, report.job_id,
                                      report.score, report.text))
        for expert, weight in report.experts.items():
            key = (target, expert)
            produced[key] = max(weight, produced.get(key, weight))
    batch.produced = [Produced(t, e, w) for (t, e), w in produced.items()]
    for li in decision.inserts:
        batch.similar.extend(Similar(new_ids[li], cache.ids[row], score)
                             for row, score in decision.related_cached.get(li, []))
        batch.similar.extend(Similar(new_ids[li], new_ids[other], score)
                             for other, score in decision.related_new.get(li, []))
    return batch, insights
