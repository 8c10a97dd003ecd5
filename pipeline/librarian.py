"""The librarian: curate a shard's draft reports into insights, under the shard's lock.

`Librarian.curate` runs, under the shard's lock and in one graph transaction: skip reports
already in the graph (a redelivered task), catch the shard's hot cache (and the other shards'
it looks across) up by seq, decide (`pipeline.dedup.decide`, pure), write; then, committed,
append to the cache. A crash before the commit leaves
nothing; after it, the next catch-up repairs the cache. A write that finds the shard moved
under it (`StaleWriteError`: another writer got in) re-warms the cache and decides again.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.cache import EmbeddingCache, ShardReader
from pipeline.dedup import Decision, Rule, build_batch, decide
from pipeline.errors import PipelineError
from pipeline.moe.config import KnowledgeConfig, MoEConfig
from pipeline.records import CuratedBatch, CurateResult, DraftReport, Insight, stable_id
from pipeline.storage.graph import CurateTx, GraphStore, StaleWriteError

ShardLocks = Callable[[str], AbstractContextManager]


@dataclass
class Decided:
    """A part's decision and the batch it writes: the reports not yet curated, what `decide`
    made of them, the batch and its new insights."""

    todo: list[DraftReport]
    decision: Decision
    batch: CuratedBatch
    new: list[Insight]
class ChangedSources(PipelineError):
    """Sources of a part that the graph holds with other content: nothing was written; the
    caller retracts their old content (`pipeline.retract.forget` with ``keep``) and curates
    the part again."""

    def __init__(self, shard: str, ids: list[str], keep: dict[str, str]) -> None:
        self.ids, self.keep = ids, keep
        super().__init__(f"shard {shard!r}: {len(ids)} source(s) changed since they were "
                         f"filed (first: {ids[0]!r})")


# How long the list of the graph's constellations (for cross-shard lookups) is kept before it
# is read again: a new model's constellations appear within this many seconds.
SHARDS_TTL_S = 30.0


class Librarian:
    """Curates shards into the graph, keeping one hot cache per shard."""

    def __init__(self, graph: GraphStore, locks: ShardLocks, dim: int, run_id: str,
                 dedup_threshold: float = 0.85, related_threshold: float = 0.5,
                 device: str = "cpu", max_kg_nodes: int | None = None,
                 kg_checkpoint_dir: str | Path | None = None,
                 kg_save_interval: int = 1000, lexical_threshold: float | None = None,
                 lexical_floor: float = 0.45, cross_shard: bool = True) -> None:
        self.graph, self.locks, self.dim, self.run_id = graph, locks, dim, run_id
        self.rule = Rule(dedup_threshold, related_threshold, lexical_threshold, lexical_floor)
        self.device, self.max_kg_nodes = device, max_kg_nodes
        self.checkpoint_dir = Path(kg_checkpoint_dir) if kg_checkpoint_dir else None
        self.save_interval = kg_save_interval
        self.cross_shard = cross_shard
        self._shards: list[str] = []
        self._shards_at = -float("inf")
        # (shard, model) -> the cache of that model's insights of the shard (model None: all)
        self.caches: dict[tuple[str, str | None], EmbeddingCache] = {}
        self._others: tuple[tuple, int] | None = None  # `other_models`' last key and answer
        self._saved_at: dict[tuple[str, str | None], int] = {}

    @classmethod
    def from_config(cls, graph: GraphStore, locks: ShardLocks,
                    config: MoEConfig | KnowledgeConfig, run_id: str = "",
                    device: str = "cpu") -> Librarian:
        """A librarian with the knowledge-graph settings of a model's config (the original
        framework's names: ``dedup_threshold``, ``max_kg_nodes``, ``kg_checkpoint_dir``,
        ``kg_save_interval``); report embeddings are ``input_dim`` wide."""
        k = config.knowledge if isinstance(config, MoEConfig) else config
        return cls(graph, locks, k.dim, run_id, dedup_threshold=k.dedup_threshold,
                   related_threshold=k.related_threshold, device=device,
                   max_kg_nodes=k.max_kg_nodes, kg_checkpoint_dir=k.kg_checkpoint_dir,
                   kg_save_interval=k.kg_save_interval, lexical_threshold=k.lexical_threshold,
                   lexical_floor=k.lexical_floor)

    @property
    def dedup_threshold(self) -> float:
        return self.rule.threshold

    @property
    def related_threshold(self) -> float:
        return self.rule.related

    def cache(self, shard: str, model: str | None = None,
              reader: ShardReader | None = None) -> EmbeddingCache:
        """The shard's cache (of ``model``'s insights only, if given): from its snapshot if
        there is one, else warmed from the graph (through ``reader``, a part's transaction,
        if given).

        Call `EmbeddingCache.catch_up` before relying on it being current.
        """
        key = (shard, model)
        if key not in self.caches:
            snap = self._snapshot_dir(shard, model)
            if snap is not None and (snap / "cache.json").exists():
                cache = EmbeddingCache.load(snap, self.device, max_rows=self.max_kg_nodes)
            else:
                cache = self._warmed(shard, model, reader)
            self.caches[key] = cache
            self._saved_at[key] = cache.updates
        return self.caches[key]

    def _warmed(self, shard: str, model: str | None = None,
                reader: ShardReader | None = None) -> EmbeddingCache:
        cache = EmbeddingCache(self.dim, self.device, max_rows=self.max_kg_nodes)
        cache.warm(reader or self.graph, shard, model)
        self._saved_at[(shard, model)] = cache.updates
        return cache

    def curate(self, shard: str, reports: Sequence[DraftReport],
               run_id: str | None = None, model: str | None = None) -> CurateResult:
        """Deduplicate and persist one shard's reports (under the shard's lock).

        New insights are credited to ``run_id`` (default: the librarian's run), so one
        librarian, with one cache per shard, serves every run that writes the shard. With
        ``model`` (the fingerprint of the model that drafted the reports), they are compared
        only with that model's insights, and new ones carry it: two models' report spaces
        are not one space, so their insights never merge.

        A report id repeated in the batch counts once. If the write finds the shard moved
        (`StaleWriteError`), the cache is rebuilt from the graph and the batch decided again.
        """
        unique = list({r.id: r for r in reversed(reports)}.values())[::-1]  # first wins
        with self.locks(shard):
            for attempt in range(3):
                try:
                    return self._curate_locked(shard, reports, unique,
                                               run_id or self.run_id, model)
                except StaleWriteError:
                    if attempt == 2:
                        raise
                    self.caches[(shard, model)] = self._warmed(shard, model)  # the truth
        raise AssertionError("unreachable")

    def _other_shards(self, shard: str, g: CurateTx) -> list[str]:
        """The shards other than ``shard`` whose caches a part looks across."""
        if not self.cross_shard:
            return []
        now = time.monotonic()
        # Constellations come and go rarely: the list is read again after a while, or at
        # once when it lacks this very shard (a model whose constellations are new here).
        if now - self._shards_at > SHARDS_TTL_S or shard not in self._shards:
            self._shards, self._shards_at = g.constellations(), now
        return [other for other in self._shards if other != shard]

    def _curate_locked(self, shard: str, reports: Sequence[DraftReport],
                       unique: list[DraftReport], run_id: str,
                       model: str | None) -> CurateResult:
        # One transaction: the reports already curated, the shards' tops (one query), the
        # caches caught up (or warmed, met for the first time), the decision, the write.
        # The driver may run it again from the start: every cache it touches then holds
        # committed rows only, and what the write adds reaches them after the commit.
        others: dict[str, EmbeddingCache] = {}

        contents = {r.item_id: (r.content, r.text) for r in unique if r.content}

        def work(g: CurateTx) -> tuple[dict[str, str], Decided | None]:
            changed = g.changed_sources(contents)
            if changed:  # their old content goes first, outside this transaction
                raise ChangedSources(shard, changed, {i: contents[i][0] for i in changed})
            done = g.supported_reports((r.item_id, r.id) for r in unique)
            todo = [r for r in unique if r.id not in done]
            names = self._other_shards(shard, g) if todo else []
            g.shard_tops([shard, *names])
            cache = self.cache(shard, model, g)
            cache.catch_up(g, shard, model)
            if not todo:
                return done, None
            others.clear()
            for other in names:
                others[other] = self.cache(other, model, g)
                others[other].catch_up(g, other, model)
            decided = self._decide(shard, todo, cache, others, run_id, model)
            g.write_batch(decided.batch, expect_max_seq={shard: cache.watermark})
            return done, decided

        done, decided = self.graph.curate(work)
        if decided is None:
            return CurateResult(shard, len(reports), len(reports), 0, 0, 0, dict(done))
        # Committed: only now do the caches learn what the write added.
        cache = self.cache(shard, model)
        decision, batch, new = decided.decision, decided.batch, decided.new
        merged_rows = decision.target_row[decision.target_row >= 0]
        if merged_rows.size:
            cache.add_support(merged_rows)
        for other, row, _ in decision.foreign.values():
            others[other].add_support([row])
        # The rows as the graph holds them (float16), so a warm process and a fresh one
        # decide alike at the threshold.
        rows = (np.stack([i.embedding for i in new]).astype(np.float16).astype(np.float32)
                if new else np.zeros((0, self.dim), np.float32))
        cache.add([i.id for i in new], rows, [i.seq for i in new],
                  texts=[i.summary for i in new])
        self._maybe_snapshot(shard, model, cache)
        todo = len(decided.todo)
        mapping = {**done, **{s.report_id: s.insight_id for s in batch.supports}}
        return CurateResult(shard, len(reports), len(reports) - todo, len(new),
                            todo - len(new), len(batch.similar), mapping)

    def _decide(self, shard: str, todo: list[DraftReport], cache: EmbeddingCache,
                others: dict[str, EmbeddingCache], run_id: str, model: str | None) -> Decided:
        """What the reports not yet curated become, against the caught-up caches (pure: the
        caches are read, not changed)."""
        # Decide on what the graph will hold: embeddings are stored as float16.
        emb = torch.from_numpy(np.stack([np.asarray(r.embedding, np.float16)
                                         for r in todo]).astype(np.float32))
        texts = [r.text[:280] for r in todo]  # as the insight's summary will hold it
        decision = decide(emb, cache, self.rule, texts=texts, others=others)
        batch, new = build_batch(shard, todo, decision, cache, run_id, cache.watermark + 1,
                                 others, model)
        return Decided(todo, decision, batch, new)

    def forget_shards(self, shards: Sequence[str]) -> None:
        """A forget changed these shards: drop their caches (the next use reads them anew)
        and their snapshots, which may hold a forgotten embedding or text."""
        models = {model for _, model in self.caches} | {None}
        for key in [k for k in self.caches if k[0] in shards]:
            del self.caches[key]
        for shard in shards:
            for model in models:
                snap = self._snapshot_dir(shard, model)
                if snap is not None:
                    shutil.rmtree(snap, ignore_errors=True)

    def _snapshot_dir(self, shard: str, model: str | None = None) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        parts = ("shard", shard) if model is None else ("shard", shard, model)
        return self.checkpoint_dir / stable_id(*parts, length=16)

    def _maybe_snapshot(self, shard: str, model: str | None, cache: EmbeddingCache) -> None:
        snap = self._snapshot_dir(shard, model)
        key = (shard, model)
        if snap is not None and cache.updates - self._saved_at[key] >= self.save_interval:
            cache.save(snap)
            self._saved_at[key] = cache.updates

    def catch_up(self, shards: Sequence[str], model: str | None = None) -> None:
        """Bring these shards' caches level with the graph in one read transaction: their
        tops and forget counts in two queries, then the new rows of the shards that have
        some (what a question does before it searches several shards)."""
        def work(g: CurateTx) -> None:
            g.shard_tops(shards)
            for shard in shards:
                self.cache(shard, model, g).catch_up(g, shard, model)

        self.graph.view(work)

    def search_many(self, queries: Tensor, top_k: int, shard: str,
                    model: str | None = None) -> list[list[dict]]:
        """Each query's nearest insights ``(Q, D)`` in one shard's cache as it stands (the
        caller caught it up), best first: one search for all of them."""
        cache = self.cache(shard, model)
        scores, rows = cache.search(queries, top_k)
        return [[{"node_id": i, "similarity": float(s), "shard": shard}
                 for i, s in zip(ids, row, strict=True)]
                for ids, row in zip(cache.ids_at(rows), scores.tolist(), strict=True)]

    def other_models(self, shards: Sequence[str], model: str | None) -> int:
        """How many insights of these shards another model drafted (`GraphStore.other_models`,
        a scan of the shards); read again only when one of the shards moved (its top seq or
        its forget count, as caught up) since the last read."""
        key = (model, tuple((s, self.cache(s, model).watermark, self.cache(s, model).epoch)
                            for s in shards))
        if self._others is None or self._others[0] != key:
            self._others = (key, self.graph.other_models(shards, model))
        return self._others[1]

    def search(self, query: Tensor | np.ndarray, top_k: int = 5,
               shards: Sequence[str] | None = None, model: str | None = None,
               caught_up: bool = False) -> list[dict]:
        """Nearest insights to one query over the given shards' caches (default: every shard
        of the graph, so a librarian attached by hand answers without being told names),
        caught up first unless the caller just did (``caught_up``)."""
        hits: list[dict] = []
        shards = self.graph.shards() if shards is None else shards
        if not caught_up:
            self.catch_up(shards, model)
        for shard in shards:
            cache = self.cache(shard, model)
            scores, rows = cache.search(query, top_k)
            ids = cache.ids_at(rows)[0]
            hits += [{"node_id": i, "similarity": float(s), "shard": shard}
                     for i, s in zip(ids, scores[0].tolist(), strict=True)]
        return sorted(hits, key=lambda h: -h["similarity"])[:top_k]
