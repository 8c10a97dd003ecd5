"""The dedup maths, pure: a shard's draft reports and its cache in, a decision out.

Legend: N reports in a batch, L leaders (reports that stand for their near-duplicates),
D embedding dim.

`decide`: (1) within the batch, each report joins the most similar earlier *leader* at
cosine >= ``dedup_threshold`` or becomes a leader itself (greedy in batch order, so
deterministic); (2) each leader's top-1 in the cache decides merge (>= threshold) or insert;
(3) inserted leaders get SIMILAR_TO edges to cached and to other new insights with
``related_threshold <= cosine < dedup_threshold``, and to such neighbours in the other
constellations' caches (``others``: a note near two topics links across them). Leaders are
pairwise below the threshold
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
from pipeline.lexical import HybridThresholds, hybrid_similarity, shingles
from pipeline.records import (
    CuratedBatch,
    DraftReport,
    Insight,
    Produced,
    Similar,
    Support,
    expert_id,
    insight_id,
)


@dataclass(frozen=True)
class Rule:
    """When two reports are one insight: cosine >= ``threshold``, or (when ``lexical`` is
    set) character 3-gram Jaccard of their texts >= ``lexical`` at cosine >= ``floor``."""

    threshold: float
    related: float
    lexical: float | None = None
    floor: float = 0.45

    def hybrid(self) -> HybridThresholds | None:
        if self.lexical is None:
            return None
        return HybridThresholds(cos=self.threshold, lex=self.lexical, cos_floor=self.floor)


def _grams(texts: Sequence[str]) -> list[frozenset[str]]:
    return [shingles(t) if t else frozenset() for t in texts]


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def scores(cos_NM: np.ndarray, grams_a: Sequence[frozenset[str]] | None,
           grams_b: Sequence[frozenset[str]] | None, rule: Rule) -> np.ndarray:
    """Pair scores under the rule (float64, ``cos_NM``'s shape): the cosine, raised to at
    least ``rule.threshold`` where the lexical branch merges (`lexical.hybrid_similarity`).
    Jaccard is computed exactly, and only for pairs in the band where it can matter."""
    hybrid = rule.hybrid()
    if hybrid is None or grams_a is None or grams_b is None:
        return np.asarray(cos_NM, np.float64)
    lex = np.zeros(cos_NM.shape, np.float64)
    for i, j in np.argwhere((cos_NM >= rule.floor) & (cos_NM < rule.threshold)):
        lex[i, j] = _jaccard(grams_a[i], grams_b[j])
    return hybrid_similarity(cos_NM, lex, hybrid)


def dedup_in_batch(emb_ND: Tensor, threshold: float | Rule,
                   texts: Sequence[str] | None = None) -> np.ndarray:
    """Leader index of each report (itself for leaders), greedy in batch order."""
    rule = threshold if isinstance(threshold, Rule) else Rule(threshold, threshold)
    n = emb_ND.shape[0]
    grams = None if texts is None else _grams(texts)
    sims = scores((emb_ND @ emb_ND.t()).float().cpu().numpy(), grams, grams, rule)
    leader = np.arange(n)
    is_leader = np.zeros(n, dtype=bool)
    for i in range(n):
        earlier = np.flatnonzero(is_leader[:i])
        if earlier.size:
            best = earlier[np.argmax(sims[i, earlier])]
            if sims[i, best] >= rule.threshold:
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
    # leader -> (other shard, its cache row, score): a restatement of an insight that lives
    # in another shard joins it there (the report was routed elsewhere this time)
    foreign: dict[int, tuple[str, int, float]] = field(default_factory=dict)
    # new insight (leader) -> [(other shard, its cache row, score)]: near neighbours in other
    # constellations (related, not duplicates), linked like those of its own shard
    related_foreign: dict[int, list[tuple[str, int, float]]] = field(default_factory=dict)

    @property
    def merged(self) -> int:
        return int((self.target_row >= 0).sum()) + sum(
            int((self.leader == li).sum()) for li in self.foreign)


def _best_match(emb_LD: Tensor, grams: list[frozenset[str]] | None, cache: EmbeddingCache,
                rule: Rule, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each leader: the cache's top-k by cosine ``(L, K)`` with their rows, and the best
    candidate under the rule (row ``(L,)``, score ``(L,)``). The lexical branch may prefer a
    candidate below the cosine top-1."""
    cos_LK, rows_LK = cache.search(emb_LD, k)
    cos, rows = cos_LK.cpu().numpy(), rows_LK.cpu().numpy()
    sc = cos.astype(np.float64)
    hybrid = rule.hybrid()
    if grams is not None and hybrid is not None:
        lex = np.zeros_like(sc)
        memo: dict[int, frozenset[str]] = {}
        for j, c in np.argwhere((cos >= rule.floor) & (cos < rule.threshold)):
            r = int(rows[j, c])
            if r not in memo:
                memo[r] = shingles(cache.texts[r]) if cache.texts[r] else frozenset()
            lex[j, c] = _jaccard(grams[j], memo[r])
        sc = hybrid_similarity(cos, lex, hybrid)
    best = sc.argmax(axis=1)
    pick = np.arange(len(rows))
    return cos, rows, rows[pick, best], sc[pick, best]


def decide(emb_ND: Tensor, cache: EmbeddingCache, dedup_threshold: float | Rule,
           related_threshold: float | None = None, k_related: int = 5,
           texts: Sequence[str] | None = None,
           others: dict[str, EmbeddingCache] | None = None) -> Decision:
    """Merge-or-insert for every report of one shard's batch (pure; see the module doc).

    ``texts`` (N,) turn on the lexical branch of the rule; ``others`` are the other shards'
    caches, searched for a leader that matches nothing in its own shard."""
    rule = (dedup_threshold if isinstance(dedup_threshold, Rule)
            else Rule(dedup_threshold, dedup_threshold if related_threshold is None
                      else related_threshold))
    emb = torch.nn.functional.normalize(emb_ND.float().to(cache.device), dim=-1)
    leader = dedup_in_batch(emb, rule, texts)
    leaders = np.flatnonzero(leader == np.arange(len(leader)))
    grams = None if texts is None else _grams([texts[int(i)] for i in leaders])
    target_row = np.full(len(leader), -1, dtype=np.int64)
    related_cached: dict[int, list[tuple[int, float]]] = {}
    foreign: dict[int, tuple[str, int, float]] = {}
    related_foreign: dict[int, list[tuple[str, int, float]]] = {}
    inserts: list[int] = []
    emb_L = emb[torch.from_numpy(leaders).to(emb.device)]
    # Lexical matches may sit below the cosine top-1: the rule is applied to the top 32 by
    # cosine (a true FEBRL 2 duplicate is the top-1 for 96.6% of records that have one); a
    # lexical duplicate ranked lower than that against the cache is missed.
    k = max(k_related, 32 if rule.lexical is not None and texts is not None else 1)
    if len(cache):
        cos, rows, best_row, best = _best_match(emb_L, grams, cache, rule, k)
    elsewhere = [(name, c, _best_match(emb_L.to(c.device), grams, c, rule, k))
                 for name, c in sorted((others or {}).items()) if len(c)]
    for j, li in enumerate(leaders):
        if len(cache) and best[j] >= rule.threshold:
            target_row[leader == li] = best_row[j]
            continue
        away = [(m[3][j], name, int(m[2][j])) for name, _, m in elsewhere
                if m[3][j] >= rule.threshold]
        if away:
            score, name, row = max(away)
            foreign[int(li)] = (name, row, float(score))
            continue
        inserts.append(int(li))
        if len(cache):
            near = (cos[j] >= rule.related) & (cos[j] < rule.threshold)
            related_cached[int(li)] = [(int(r), float(s))
                                       for r, s in zip(rows[j][near], cos[j][near],
                                                       strict=True)][:k_related]
        linked = [(float(s), name, int(r)) for name, _, m in elsewhere
                  for r, s in zip(m[1][j], m[0][j], strict=True)
                  if rule.related <= s < rule.threshold]
        if linked:
            related_foreign[int(li)] = [(name, r, s) for s, name, r in
                                        sorted(linked, reverse=True)[:k_related]]
    related_new: dict[int, list[tuple[int, float]]] = {}
    if len(inserts) > 1:
        ins = torch.tensor(inserts, device=emb.device)
        sims = (emb[ins] @ emb[ins].t()).float().cpu().numpy()
        for a in range(1, len(inserts)):
            pairs = [(inserts[b], float(sims[a, b])) for b in range(a)
                     if rule.related <= sims[a, b] < rule.threshold]
            if pairs:
                related_new[inserts[a]] = pairs
    return Decision(leader, target_row, inserts, related_cached, related_new, foreign,
                    related_foreign)


def build_batch(shard: str, reports: Sequence[DraftReport], decision: Decision,
                cache: EmbeddingCache, run_id: str, next_seq: int,
                others: dict[str, EmbeddingCache] | None = None, model: str | None = None
                ) -> tuple[CuratedBatch, list[Insight]]:
    """The graph rows of a decision (pure): new insights and every report's edges."""
    new_ids = {li: insight_id(shard, reports[li].id) for li in decision.inserts}
    for li, (other, row, _) in decision.foreign.items():
        new_ids[li] = (others or {})[other].ids[row]  # joins an insight of another shard
    now = time.time()
    arrived = int(now * 1_000_000)  # the part's arrival, on each support with its place
    insights = [Insight(new_ids[li], shard, next_seq + k,
                        np.asarray(reports[li].embedding, np.float32), run_id,
                        summary=reports[li].text[:280], created_at=now, model=model)
                for k, li in enumerate(decision.inserts)]
    batch = CuratedBatch(run_id, insights=insights)
    produced: dict[tuple[str, str], float] = {}  # one edge per (insight, expert): max weight
    for i, report in enumerate(reports):
        row = decision.target_row[i]
        target = cache.ids[row] if row >= 0 else new_ids[int(decision.leader[i])]
        batch.supports.append(Support(target, report.item_id, report.id, report.job_id,
                                      report.score, report.text,
                                      np.asarray(report.embedding, np.float32),
                                      report.content, arrived, i))
        for expert, weight in report.experts.items():
            key = (target, expert)
            produced[key] = max(weight, produced.get(key, weight))
    batch.produced = [Produced(t, expert_id(e, model), w) for (t, e), w in produced.items()]
    for li in decision.inserts:
        batch.similar.extend(Similar(new_ids[li], cache.ids[row], score)
                             for row, score in decision.related_cached.get(li, []))
        batch.similar.extend(Similar(new_ids[li], new_ids[other], score)
                             for other, score in decision.related_new.get(li, []))
        batch.similar.extend(Similar(new_ids[li], (others or {})[name].ids[row], score)
                             for name, row, score in decision.related_foreign.get(li, []))
    return batch, insights
