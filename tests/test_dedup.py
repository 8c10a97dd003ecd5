"""The dedup maths, pure: leaders within a batch, merge-or-insert against the cache, and the
invariant that no two insights of a shard are duplicates, for any sequence of batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import clustered, reports_for
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cache import EmbeddingCache
from pipeline.dedup import decide, dedup_in_batch

THRESHOLD, RELATED = 0.85, 0.5


def test_in_batch_dedup_joins_the_most_similar_earlier_leader():
    e = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.96, 0.28], [0.7, 0.71]])
    e = torch.nn.functional.normalize(e, dim=-1)
    assert dedup_in_batch(e, 0.9).tolist() == [0, 0, 2, 0, 4]


def test_decide_merges_into_the_cache_and_links_related_inserts():
    cache = EmbeddingCache(2)
    cache.add(["old"], np.array([[1.0, 0.0]], np.float32), [0])
    batch = torch.tensor([[0.99, 0.1], [0.6, 0.8], [0.0, 1.0]])
    d = decide(batch, cache, dedup_threshold=0.9, related_threshold=0.5)
    assert d.target_row.tolist() == [0, -1, -1] and d.inserts == [1, 2] and d.merged == 1
    assert [r for r, _ in d.related_cached[1]] == [0]  # cos 0.6 with "old"
    assert d.related_cached[2] == []  # orthogonal to "old"
    assert d.related_new[2][0][0] == 1  # cos 0.8 between the two inserts


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 40), min_size=1,
                                                   max_size=5))
def test_no_two_insights_are_duplicates_and_every_report_has_one(seed, sizes):
    """Any sequence of batches, decided against a cache that takes each batch's inserts."""
    rng = np.random.default_rng(seed)
    cache = EmbeddingCache(16)
    owner: dict[int, str] = {}
    seen = 0
    for size in sizes:
        emb = clustered(rng, size, centres=3)
        d = decide(torch.from_numpy(emb), cache, THRESHOLD, RELATED)
        new_ids = {li: f"n{seen + li}" for li in d.inserts}
        for k in range(size):
            row = d.target_row[k]
            owner[seen + k] = cache.ids[row] if row >= 0 else new_ids[int(d.leader[k])]
        cache.add([new_ids[li] for li in d.inserts], emb[d.inserts], range(
            cache.watermark + 1, cache.watermark + 1 + len(d.inserts)))
        seen += size
    e = cache.embeddings.double()
    sims = e @ e.t() - 2 * torch.eye(len(cache), dtype=torch.float64)
    assert len(cache) == 0 or sims.max() < THRESHOLD
    assert len(owner) == seen and set(owner.values()) <= set(cache.ids)


def test_the_lexical_branch_merges_records_the_encoder_keeps_apart():
    """Two spellings of one person's record: cosine in the band, 3-grams shared."""
    from pipeline.dedup import Rule

    rule = Rule(0.85, 0.5, lexical=0.36, floor=0.45)
    a, b = "john smith 12 high street springfield 2000", "jon smith 12 high st springfield 2000"
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.7, 0.714]]), dim=-1)
    assert float(e[0] @ e[1]) < 0.85  # the encoder alone would keep them apart
    assert list(dedup_in_batch(e, rule, [a, b])) == [0, 0]
    assert list(dedup_in_batch(e, rule, [a, "mary jones 4 low road eastwood 3000"])) == [0, 1]
    assert list(dedup_in_batch(e, 0.85)) == [0, 1]  # cosine only
    cache = EmbeddingCache(2)
    cache.add(["x"], e[:1].numpy(), [0], texts=[a])
    d = decide(e[1:], cache, rule, texts=[b])
    assert list(d.target_row) == [0] and not d.inserts


def test_a_restatement_in_another_shards_cache_joins_it_there():
    from pipeline.dedup import Rule

    emb = clustered(np.random.default_rng(5), 3, 3, noise=0.0)
    here, there = EmbeddingCache(16), EmbeddingCache(16)
    there.add(["elsewhere"], emb[:1], [0], texts=["a note"])
    d = decide(torch.from_numpy(emb[:1]), here, Rule(0.85, 0.5), others={"b": there})
    assert d.foreign == {0: ("b", 0, pytest.approx(1.0, abs=1e-5))} and not d.inserts


def test_a_new_insight_links_to_related_insights_of_other_constellations():
    from pipeline.dedup import Rule, build_batch

    rng = np.random.default_rng(7)
    base = rng.standard_normal(16).astype(np.float32)
    base /= np.linalg.norm(base)
    noise = rng.standard_normal(16).astype(np.float32)
    noise -= noise @ base * base
    noise /= np.linalg.norm(noise)
    near = (0.7 * base + np.sqrt(1 - 0.49) * noise).astype(np.float32)  # cosine 0.7 to base
    here, there = EmbeddingCache(16), EmbeddingCache(16)
    there.add(["theirs"], base[None], [0], texts=["a note"])
    d = decide(torch.from_numpy(near[None]), here, Rule(0.85, 0.5), others={"b": there})
    assert d.inserts == [0] and not d.foreign
    assert d.related_foreign == {0: [("b", 0, pytest.approx(0.7, abs=1e-3))]}
    reports = reports_for(near[None], "job", "a")
    batch, new = build_batch("a", reports, d, here, "run", 0, {"b": there})
    assert [(s.insight_id, s.other_id) for s in batch.similar] == [(new[0].id, "theirs")]
