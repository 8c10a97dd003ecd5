"""The librarian: deduplicate a shard's draft reports into insights, and write them.

Legend: N reports in a batch, L leaders (reports that stand for their near-duplicates),
D embedding dim.

`decide` is pure (tensors and the cache in, a `Decision` out): (1) within the batch, each
report joins the most similar earlier *leader* at cosine >= ``dedup_threshold`` or becomes a
leader itself (greedy in batch order, so deterministic); (2) each leader's top-1 in the cache
decides merge (>= threshold) or insert; (3) inserted leaders get SIMILAR_TO edges to cached
and to other new insights with ``related_threshold <= cosine < dedup_threshold``. Leaders are
pairwise below the threshold and inserts are below it against the cache, so no two insights
of a shard ever reach it.

`Librarian.curate` runs that under the shard's lock: skip reports already in the graph (a
redelivered task), catch the cache up by seq, decide, write one transaction, then append to
the cache. A crash before the commit leaves nothing; after it, the next catch-up repairs the
cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.cache import EmbeddingCache
from pipeline.config import MoEConfig
from pipeline.reports import (
    CuratedBatch,
    DraftReport,
    Insight,
    Produced,
    Similar,
    Support,
    stable_id,
)
from pipeline.storage.graph import GraphStore, StaleWriteError

ShardLocks = Callable[[str], AbstractContextManager]


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


def insight_id(shard: str, leader_report: str) -> str:
    """An insight is named by its shard and the report that founded it: replays agree."""
    return stable_id("insight", shard, leader_report)


@dataclass
class CurateResult:
    shard: str
    reports: int
    skipped: int  # already curated (a replay)
    inserted: int
    merged: int  # reports that joined an insight someone else founded (cache or batch-mate)
    similar: int
    insight_of_report: dict[str, str]

    def outcome(self) -> tuple[int, int]:
        """(reports that founded an insight, reports that joined one), counting replayed
        reports by what their first curation did, so a redelivered part records the same
        figures as the delivery that wrote it."""
        founded = sum(insight == insight_id(self.shard, report)
                      for report, insight in self.insight_of_report.items())
        return founded, len(self.insight_of_report) - founded


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


class Librarian:
    """Curates shards into the graph, keeping one hot cache per shard."""

    def __init__(self, graph: GraphStore, locks: ShardLocks, dim: int, run_id: str,
                 dedup_threshold: float = 0.85, related_threshold: float = 0.7,
                 device: str = "cpu", max_kg_nodes: int | None = None,
                 kg_checkpoint_dir: str | Path | None = None,
                 kg_save_interval: int = 1000) -> None:
        self.graph, self.locks, self.dim, self.run_id = graph, locks, dim, run_id
        self.dedup_threshold, self.related_threshold = dedup_threshold, related_threshold
        self.device, self.max_kg_nodes = device, max_kg_nodes
        self.checkpoint_dir = Path(kg_checkpoint_dir) if kg_checkpoint_dir else None
        self.save_interval = kg_save_interval
        self.caches: dict[str, EmbeddingCache] = {}
        self._saved_at: dict[str, int] = {}

    @classmethod
    def from_config(cls, graph: GraphStore, locks: ShardLocks, config: MoEConfig,
                    run_id: str, device: str = "cpu") -> Librarian:
        """A librarian with the knowledge-graph settings of a model's config (the original
        framework's names: ``dedup_threshold``, ``max_kg_nodes``, ``kg_checkpoint_dir``,
        ``kg_save_interval``); report embeddings are ``input_dim`` wide."""
        return cls(graph, locks, config.input_dim, run_id,
                   dedup_threshold=config.dedup_threshold,
                   related_threshold=config.related_threshold, device=device,
                   max_kg_nodes=config.max_kg_nodes, kg_checkpoint_dir=config.kg_checkpoint_dir,
                   kg_save_interval=config.kg_save_interval)

    def cache(self, shard: str) -> EmbeddingCache:
        """The shard's cache: from its snapshot if there is one, else warmed from the graph.

        Call `EmbeddingCache.catch_up` before relying on it being current.
        """
        if shard not in self.caches:
            snap = self._snapshot_dir(shard)
            if snap is not None and (snap / "cache.json").exists():
                cache = EmbeddingCache.load(snap, self.device, max_rows=self.max_kg_nodes)
            else:
                cache = self._warmed(shard)
            self.caches[shard] = cache
            self._saved_at[shard] = cache.updates
        return self.caches[shard]

    def _warmed(self, shard: str) -> EmbeddingCache:
        cache = EmbeddingCache(self.dim, self.device, max_rows=self.max_kg_nodes)
        cache.warm(self.graph, shard)
        self._saved_at[shard] = cache.updates
        return cache

    def curate(self, shard: str, reports: Sequence[DraftReport],
               run_id: str | None = None) -> CurateResult:
        """Deduplicate and persist one shard's reports (under the shard's lock).

        New insights are credited to ``run_id`` (default: the librarian's run), so one
        librarian, with one cache per shard, serves every run that writes the shard.

        A report id repeated in the batch counts once. If the write finds the shard moved
        (`StaleWriteError`), the cache is rebuilt from the graph and the batch decided again.
        """
        unique = list({r.id: r for r in reversed(reports)}.values())[::-1]  # first wins
        with self.locks(shard):
            for attempt in range(3):
                try:
                    return self._curate_locked(shard, reports, unique,
                                               run_id or self.run_id)
                except StaleWriteError:
                    if attempt == 2:
                        raise
                    self.caches[shard] = self._warmed(shard)  # from the graph, the truth
        raise AssertionError("unreachable")

    def _curate_locked(self, shard: str, reports: Sequence[DraftReport],
                       unique: list[DraftReport], run_id: str) -> CurateResult:
        done = self.graph.supported_reports((r.item_id, r.id) for r in unique)
        todo = [r for r in unique if r.id not in done]
        cache = self.cache(shard)
        cache.catch_up(self.graph, shard)
        if not todo:
            return CurateResult(shard, len(reports), len(reports), 0, 0, 0, dict(done))
        # Decide on what the graph will hold: embeddings are stored as float16.
        emb = torch.from_numpy(np.stack([np.asarray(r.embedding, np.float16)
                                         for r in todo]).astype(np.float32))
        decision = decide(emb, cache, self.dedup_threshold, self.related_threshold)
        batch, new = build_batch(shard, todo, decision, cache, run_id,
                                 cache.watermark + 1)
        self.graph.write_batch(batch, expect_max_seq={shard: cache.watermark})
        merged_rows = decision.target_row[decision.target_row >= 0]
        if merged_rows.size:
            cache.add_support(merged_rows)
        cache.add([i.id for i in new], np.stack([i.embedding for i in new])
                  if new else np.zeros((0, self.dim), np.float32), [i.seq for i in new])
        self._maybe_snapshot(shard, cache)
        mapping = {**done, **{s.report_id: s.insight_id for s in batch.supports}}
        return CurateResult(shard, len(reports), len(reports) - len(todo), len(new),
                            len(todo) - len(new), len(batch.similar), mapping)

    def _snapshot_dir(self, shard: str) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        return self.checkpoint_dir / stable_id("shard", shard, length=16)

    def _maybe_snapshot(self, shard: str, cache: EmbeddingCache) -> None:
        snap = self._snapshot_dir(shard)
        if snap is not None and cache.updates - self._saved_at[shard] >= self.save_interval:
            cache.save(snap)
            self._saved_at[shard] = cache.updates

    def search(self, query: Tensor | np.ndarray, top_k: int = 5,
               shards: Sequence[str] | None = None) -> list[dict]:
        """Nearest insights to one query over the given (default: loaded) shards' caches."""
        hits: list[dict] = []
        for shard in shards or list(self.caches):
            cache = self.cache(shard)
            cache.catch_up(self.graph, shard)
            scores, rows = cache.search(query, top_k)
            ids = cache.ids_at(rows)[0]
            hits += [{"node_id": i, "similarity": float(s), "shard": shard}
                     for i, s in zip(ids, scores[0].tolist(), strict=True)]
        return sorted(hits, key=lambda h: -h["similarity"])[:top_k]
