"""The hot embedding cache: exact top-k, growth, eviction, snapshots, graph catch-up."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from pipeline.cache import EmbeddingCache, _tile_top, scan_dtype

# Every scan dtype runs on any CPU: float32 and bfloat16 by oneDNN where it can, bfloat16 and
# float16 by torch's own kernels elsewhere (slowly, which tiny tests do not mind).
SCAN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", SCAN_DTYPES)
@pytest.mark.parametrize(("budget", "query_chunk"), [(1 << 25, 256), (21, 3)])
def test_search_matches_a_float64_brute_force(budget, query_chunk, dtype):
    rng = np.random.default_rng(0)
    data, queries = _unit(rng, 500, 32), rng.standard_normal((20, 32))
    cache = EmbeddingCache(32, capacity=8, dtype=dtype)
    cache.add([f"r{i}" for i in range(500)], (data * 3).astype(np.float32), range(500))
    scores, rows = cache.search(queries.astype(np.float32), k=5, score_budget=budget,
                                query_chunk=query_chunk)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ data.T
    want = np.argsort(-sims, axis=1)[:, :5]
    assert rows.tolist() == want.tolist()
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(sims, want, 1), atol=1e-5)
    assert cache.ids_at(rows[:1]) == [[f"r{i}" for i in want[0]]]


def _near_ties(rng, n=4000, d=384, centres=40, noise=0.1):
    """Clusters of 100 restatements: a query's top 10 lie within ~2e-4 of each other, below
    what a bfloat16 or float16 scan resolves, but a float32 sum separates them."""
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("dtype", SCAN_DTYPES)
def test_search_is_exact_among_near_ties_where_the_scan_alone_is_not(dtype):
    rng = np.random.default_rng(0)
    data = _near_ties(rng)
    queries = data[rng.integers(0, len(data), 64)] + 0.01 * rng.standard_normal((64, 384))
    cache = EmbeddingCache(384, dtype=dtype)
    cache.add([str(i) for i in range(len(data))], data, range(len(data)))
    # The reference: float64 sums over the float32 rows and queries the cache holds.
    q = torch.nn.functional.normalize(torch.from_numpy(queries).float(), dim=-1).double()
    sims = q @ cache.embeddings.double().t()
    want_s, want = sims.topk(11, dim=1)
    decided = (want_s[:, :10] - want_s[:, 1:]).min(1).values > 1e-6  # no float32 ties
    assert decided.sum() >= 56
    for tiling in ({}, {"query_chunk": 16, "score_budget": 1 << 13}):  # one tile, 8 tiles
        scores, rows = cache.search(queries, 10, **tiling)
        assert torch.equal(rows[decided], want[decided, :10])
        torch.testing.assert_close(scores, want_s[:, :10].float(), atol=1e-6, rtol=0)
    _, scanned = cache.scan(queries, 10)
    scan_exact = (scanned[decided] == want[decided, :10]).all(1).float().mean()
    # bfloat16 alone orders no query right here, float16 about half
    assert scan_exact == 1 if dtype == torch.float32 else scan_exact < 0.6


@pytest.mark.parametrize("width", [4096, 32768])  # pruned once, and twice
def test_pruned_tile_top_equals_a_plain_top_k(width):
    s = torch.randn(8, width).to(torch.bfloat16)  # rounded: many exact ties
    for c in (1, 10, 24, 64):
        got, cols = _tile_top(s, c)
        assert torch.equal(s.gather(1, cols), got)
        assert (cols.sort(1).values.diff(dim=1) > 0).all()  # c distinct columns a row
        want = torch.topk(s, c, dim=1).values
        assert torch.equal(got.sort(1, descending=True).values, want)


def test_rows_are_float32_and_a_narrow_scan_keeps_its_own_copy():
    assert EmbeddingCache(4).dtype == scan_dtype(torch.device("cpu"))
    vecs = np.eye(4, dtype=np.float32) + 1e-3
    for dtype in SCAN_DTYPES:
        cache = EmbeddingCache(4, dtype=dtype, capacity=1)
        cache.add(["a", "b", "c"], vecs[:3], [0, 1, 2])
        want = torch.nn.functional.normalize(torch.from_numpy(vecs[:3]), dim=-1)
        assert cache.embeddings.dtype == torch.float32
        assert torch.equal(cache.embeddings, want)
        assert (cache._scan is cache._emb) == (dtype == torch.float32)
        assert torch.equal(cache._scan[:3], want.to(dtype))


def test_grows_by_doubling_and_keeps_rows():
    cache = EmbeddingCache(4, capacity=2)
    vecs = np.eye(4, dtype=np.float32)
    cache.add(["a", "b"], vecs[:2] * 5, [0, 1])
    assert cache.capacity == 2
    cache.add(["c"], vecs[2:3], [2])
    assert cache.capacity == 4 and len(cache) == 3
    cache.add(["d", "e"], np.ones((2, 4), np.float32), [3, 4])
    assert cache.capacity == 8
    torch.testing.assert_close(cache.embeddings[:3], torch.eye(4)[:3])  # normalised
    torch.testing.assert_close(cache.embeddings.norm(dim=1), torch.ones(5))
    assert cache.watermark == 4
    scores, rows = cache.search(np.array([0, 0, 1, 0], np.float32), k=10)
    assert rows.shape == (1, 5) and cache.ids_at(rows)[0][0] == "c"
    with pytest.raises(ValueError, match="expected \\(1, 4\\)"):
        cache.add(["x"], np.ones((1, 3), np.float32), [9])


def test_empty_cache_answers_nothing():
    scores, rows = EmbeddingCache(8).search(np.ones((3, 8), np.float32), k=4)
    assert scores.shape == (3, 0) and rows.shape == (3, 0)


def test_eviction_drops_least_supported_then_oldest():
    cache = EmbeddingCache(4, max_rows=3)
    cache.add(["a", "b", "c"], np.eye(4, dtype=np.float32)[:3], [0, 1, 2])
    cache.add_support([0], 5)  # a is well supported
    cache.add(["d"], np.eye(4, dtype=np.float32)[3:], [3])  # over the bound: b leaves
    assert cache.ids == ["a", "c", "d"] and cache.watermark == 3
    _, rows = cache.search(np.eye(4, dtype=np.float32), k=1)
    found = cache.ids_at(rows)
    assert found[0] == ["a"] and found[2:] == [["c"], ["d"]]  # b's query ties: no check


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snapshot_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(1)
    cache = EmbeddingCache(16, dtype=dtype)
    cache.add([f"i{k}" for k in range(50)], _unit(rng, 50, 16).astype(np.float32), range(50),
              support=range(50))
    q = rng.standard_normal((4, 16)).astype(np.float32)
    again = EmbeddingCache.load(cache.save(tmp_path / "snap"), dtype=dtype)
    assert again.ids == cache.ids and again.watermark == 49
    assert np.array_equal(again.seqs, cache.seqs)
    assert torch.equal(again.embeddings, cache.embeddings)  # float32, bit for bit
    for a, b in zip(cache.search(q, 3), again.search(q, 3), strict=True):
        torch.testing.assert_close(a, b)


def test_warm_and_catch_up_from_the_graph(graph):
    from tests.test_graph import make_batch

    shard = f"cache-{uuid.uuid4().hex[:8]}"
    first, emb1 = make_batch(shard, 40, dim=16)
    graph.write_batch(first)
    cache = EmbeddingCache(16)
    assert cache.warm(graph, shard) == 40 and cache.watermark == 39
    second, emb2 = make_batch(shard, 10, start=40, dim=16, seed=2)
    graph.write_batch(second)
    assert cache.catch_up(graph, shard) == 10 and cache.catch_up(graph, shard) == 0
    assert cache.ids[-1] == f"{shard}-i49"
    _, rows = cache.search(emb2[3:4], k=1)
    assert cache.ids_at(rows) == [[f"{shard}-i43"]]


def test_rows_at_or_below_the_watermark_are_not_added_twice():
    cache = EmbeddingCache(4)
    cache.add(["a", "b"], np.eye(4, dtype=np.float32)[:2], [0, 1])
    cache.add(["b", "c"], np.eye(4, dtype=np.float32)[1:3], [1, 2])  # a racing catch-up
    assert cache.ids == ["a", "b", "c"] and cache.seqs.tolist() == [0, 1, 2]


def test_snapshot_keeps_rows_aligned_after_eviction_and_refuses_a_mixed_one(tmp_path):
    cache = EmbeddingCache(4, max_rows=3)
    vecs = np.eye(4, dtype=np.float32)
    cache.add(["a", "b", "c"], vecs[:3], [0, 1, 2])
    cache.add_support([1], 3)
    cache.add(["d"], vecs[3:], [3])  # a leaves
    path = cache.save(tmp_path / "snap")
    again = EmbeddingCache.load(path)
    assert again.ids == ["b", "c", "d"] and again.seqs.tolist() == [1, 2, 3]
    assert np.array_equal(again._support, cache._support)
    _, rows = again.search(vecs, k=1)
    assert again.ids_at(rows)[1:] == [["b"], ["c"], ["d"]]
    cache.save(path)  # replaced whole
    (path / "ids.txt").write_text("b\nc")
    with pytest.raises(ValueError, match="2 ids for 3 rows"):
        EmbeddingCache.load(path)
