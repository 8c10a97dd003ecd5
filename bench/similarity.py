"""Benchmark: similarity search in the hot cache, snapshot warm-up, and librarian throughput.

384 dims; random unit vectors and a clustered set with planted near-duplicates; caches of
100k and 1M rows. In one run on the same data:

* `EmbeddingCache.search`: single-query latency p50/p99 and batched queries/s;
* FAISS ``IndexFlatIP`` (exact inner product, faiss-cpu) and a numpy brute force, the same;
* whether all three return the same top-k;
* a 1M-row shard made ready from a snapshot (load + catch-up of what came after);
* librarian throughput: reports curated per second, decisions only and with the graph.

Usage: ``python bench/similarity.py [--quick] [--device cuda]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, target  # noqa: E402

from pipeline.cache import EmbeddingCache  # noqa: E402
from pipeline.dedup import decide  # noqa: E402

DIM, K = 384, 10


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dataset(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return unit(rng.standard_normal((n, DIM), dtype=np.float32))
    centres = rng.standard_normal((max(1, n // 50), DIM), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 0.1 * rng.standard_normal((n, DIM), dtype=np.float32)  # planted near-duplicates
    return unit(x)


def numpy_search(data: np.ndarray, q: np.ndarray, k: int, chunk: int = 1 << 17):
    best_s = best_i = None
    for start in range(0, len(data), chunk):
        sims = q @ data[start:start + chunk].T
        idx = np.argpartition(-sims, min(k, sims.shape[1] - 1), axis=1)[:, :k]
        s = np.take_along_axis(sims, idx, 1)
        idx = idx + start
        if best_s is not None:
            s, idx = np.concatenate([best_s, s], 1), np.concatenate([best_i, idx], 1)
        order = np.argsort(-s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(idx, order, 1)
    return best_s, best_i


def latency(fn, queries: np.ndarray, repeat: int) -> tuple[float, float]:
    times = []
    for i in range(repeat):
        q = queries[i % len(queries): i % len(queries) + 1]
        start = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3, times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    sizes = [2000, 20000] if args.quick else [100_000, 1_000_000]
    n_batch, repeat, rounds = (64, 10, 1) if args.quick else (1024, 50, 3)
    try:
        import faiss
    except ImportError:
        faiss = None
    results, references, ratios, targets, agree = {}, {}, {}, {}, {}
    for kind in ("random", "clustered"):
        for n in sizes:
            data = dataset(kind, n, rng)
            queries = unit(data[rng.integers(0, n, n_batch)]
                           + 0.02 * rng.standard_normal((n_batch, DIM), dtype=np.float32))
            cache = EmbeddingCache(DIM, device, capacity=n)
            cache.add([str(i) for i in range(n)], data, np.arange(n))
            tag = f"{kind}_{n}"

            def ours(q, cache=cache):
                s, i = cache.search(q, K)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return s, i

            fns = {"ours": ours, "numpy": lambda q, d=data: numpy_search(d, q, K)}
            if faiss is not None:
                index = faiss.IndexFlatIP(DIM)
                index.add(data)
                fns["faiss"] = lambda q, index=index: index.search(q, K)
            for fn in fns.values():
                fn(queries[:8])  # warm-up
            batched: dict[str, list[float]] = {name: [] for name in fns}
            outs = {}
            for _ in range(rounds):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    outs[name] = fn(queries)
                    batched[name].append(n_batch / (time.perf_counter() - start))
            ours_ids = outs["ours"][1].cpu().numpy()
            for name in fns:
                qps = statistics.median(batched[name])
                p50, p99 = latency(fns[name], queries, repeat)
                store = results if name == "ours" else references
                store[f"{name}_batched_qps_{tag}"] = round(qps, 1)
                store[f"{name}_p50_ms_{tag}"] = round(p50, 3)
                store[f"{name}_p99_ms_{tag}"] = round(p99, 3)
                if name != "ours":
                    other = np.asarray(outs[name][1])
                    agree[f"ours_vs_{name}_{tag}"] = float((np.sort(other, 1) ==
                                                            np.sort(ours_ids, 1)).mean())
            bytes_scanned = n * DIM * cache.embeddings.element_size() * (
                -(-n_batch // 256))  # the cache is read once per query chunk
            results[f"ours_scan_gb_per_s_{tag}"] = round(
                bytes_scanned * statistics.median(batched["ours"]) / n_batch / 1e9, 2)
            if faiss is not None:
                ratios[f"ours_vs_faiss_batched_{tag}"] = (statistics.median(batched["ours"])
                                                          / statistics.median(batched["faiss"]))
                targets[f"ours_vs_faiss_batched_{tag}"] = target(
                    1.0, ratios[f"ours_vs_faiss_batched_{tag}"])
            ratios[f"ours_vs_numpy_batched_{tag}"] = (statistics.median(batched["ours"])
                                                      / statistics.median(batched["numpy"]))
            if kind == "random" and n == sizes[-1]:
                results.update(snapshot_ready(cache, data, rng))
            if kind == "clustered" and n == sizes[0]:
                results.update(librarian_rate(cache, data, rng, args.quick))
            del cache, fns
    results["top_k_agreement"] = agree  # type: ignore[assignment]
    return emit("similarity", device, {"dim": DIM, "k": K, "sizes": sizes,
                                       "batch_queries": n_batch, "rounds": rounds,
                                       "faiss": faiss is not None, "quick": args.quick},
                results, references, ratios, targets,
                note="top_k_agreement: share of identical top-k ids (ties may differ)")


def snapshot_ready(cache: EmbeddingCache, data: np.ndarray, rng) -> dict[str, float]:
    """Seconds from nothing to a searchable shard: load the snapshot, then catch up 1%."""
    class Tail:  # what the graph returns for seq > watermark
        def __init__(self, rows: int) -> None:
            self.ids = [f"new{i}" for i in range(rows)]
            self.seqs = np.arange(len(data), len(data) + rows)
            self.embeddings = unit(rng.standard_normal((rows, DIM), dtype=np.float32)).astype(
                np.float16)
            self.summaries = [""] * rows
            self.top = int(self.seqs[-1]) if rows else -1

    tail = Tail(len(data) // 100)

    class Graph:
        def read_shard(self, shard: str, dim: int, after: int = -1, page: int = 5000,
                       model: str | None = None):
            return tail

    with tempfile.TemporaryDirectory() as tmp:
        cache.save(tmp)
        start = time.perf_counter()
        warm = EmbeddingCache.load(tmp, cache.device)
        caught = warm.catch_up(Graph(), "shard")
        seconds = time.perf_counter() - start
    assert caught == len(tail.ids)
    return {f"snapshot_ready_seconds_{len(data)}": round(seconds, 3)}


def librarian_rate(cache: EmbeddingCache, data: np.ndarray, rng, quick: bool) -> dict:
    """Reports decided per second: batches of 1,000 near-duplicates against the cache."""
    n_reports = 1000 if not quick else 200
    picks = data[rng.integers(0, len(data), n_reports)]
    reports = unit(picks + 0.01 * rng.standard_normal(picks.shape, dtype=np.float32))
    emb = torch.from_numpy(reports)
    decide(emb[:50], cache, 0.85, 0.7)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        d = decide(emb, cache, 0.85, 0.7)
        times.append(time.perf_counter() - start)
    out = {f"librarian_decisions_reports_per_s_{len(data)}":
           round(n_reports / statistics.median(times), 1),
           "librarian_decisions_merged_share": round(d.merged / n_reports, 3)}
    if not quick:
        import importlib.util

        if importlib.util.find_spec("arcadedb_embedded") is None:  # e.g. on a GPU box
            out["librarian_curate_reports_per_s"] = "skipped: the graph extra is not installed"
        else:
            out["librarian_curate_reports_per_s"] = curate_rate(data, rng)
    return out


def curate_rate(data: np.ndarray, rng) -> float:
    """Reports curated per second into the embedded graph: 4 batches of 1,000 (the first
    mostly inserts, the rest mostly merges), after a warm-up batch."""
    from pipeline.librarian import Librarian
    from pipeline.records import DraftReport, report_id
    from pipeline.storage.embedded import LocalGraphServer
    from pipeline.storage.locks import LocalShardLock

    server = LocalGraphServer(tempfile.mkdtemp(prefix="moe-bench-lib-"))
    graph = server.connect()
    try:
        graph.ensure_schema()
        lib = Librarian(graph, LocalShardLock(), DIM, "bench-run")
        pool = data[:2000]

        def batch(b: int) -> list[DraftReport]:
            x = unit(pool[rng.integers(0, len(pool), 1000)]
                     + 0.01 * rng.standard_normal((1000, DIM), dtype=np.float32))
            return [DraftReport(report_id("job", f"b{b}-{i}", "s"), "job", f"b{b}-{i}", "s",
                                x[i], 0.9, {f"expert_{i % 8}": 0.6}) for i in range(1000)]

        lib.curate("warm", batch(-1))
        batches = [batch(b) for b in range(4)]
        start = time.perf_counter()
        for b in batches:
            lib.curate("s", b)
        return round(4000 / (time.perf_counter() - start), 1)
    finally:
        graph.close()
        server.stop()


if __name__ == "__main__":
    main()
    sys.exit(0)
