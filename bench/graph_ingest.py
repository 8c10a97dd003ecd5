"""Benchmark: insights into the graph and embeddings back out for the hot cache.

Each insight comes with a 384-dim embedding and the edges the issue's benchmark names: one
SUPPORTED_BY (and its Source), one PRODUCED_BY and IN_CONSTELLATION, plus the DISCOVERED_IN
that every insight has. ``--full`` adds a second PRODUCED_BY and a SIMILAR_TO per insight
(what a librarian writes for a typical new insight).

* ours: `GraphStore.write_batch` in batches of 1, 100, 1,000 and 10,000 (insights/s), and
  `read_shard` of a whole shard and of a catch-up by seq (rows/s);
* references, in the same run against the same server: the straightforward way, one insight
  per transaction with MERGE statements and the embedding as a list of floats; the same
  statements batched with UNWIND (1,000 a batch, list embeddings); and a row-per-record read.

The embedded server's JIT makes its first batches slow: a warm-up shard is written first.
Usage: ``python bench/graph_ingest.py [--quick] [--neo4j] [--uri bolt://... --user neo4j
--password ...]``; ``--neo4j`` runs the embedded server (the reference) and a real Neo4j
(tools/neo4j/launcher.sh, or ``--uri``) in one run on the same rows, rounds interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, target

from pipeline.records import CuratedBatch, Insight, Produced, Similar, Support
from pipeline.storage.graph import GraphStore

DIM = 384
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAIVE_ONE = """
MERGE (i:Insight {id: $id}) SET i.shard = $shard, i.seq = $seq, i.embedding = $embedding
MERGE (c:Constellation {id: $shard}) MERGE (i)-[:IN_CONSTELLATION]->(c)
MERGE (run:Run {id: $run}) MERGE (i)-[:DISCOVERED_IN]->(run)
MERGE (s:Source {id: $source}) MERGE (i)-[e:SUPPORTED_BY {report_id: $report}]->(s)
SET e.weight = 0.5
"""
NAIVE_PRODUCED = """
MATCH (i:Insight {id: $id}) MERGE (x:Expert {id: $expert})
MERGE (i)-[e:PRODUCED_BY]->(x) SET e.weight = $weight
"""
NAIVE_BATCH = """
UNWIND $rows AS r
MERGE (i:Insight {id: r.id}) SET i.shard = r.shard, i.seq = r.seq, i.embedding = r.embedding
MERGE (c:Constellation {id: r.shard}) MERGE (i)-[:IN_CONSTELLATION]->(c)
MERGE (run:Run {id: r.run}) MERGE (i)-[:DISCOVERED_IN]->(run)
MERGE (s:Source {id: r.source}) MERGE (i)-[e:SUPPORTED_BY {report_id: r.report}]->(s)
SET e.weight = 0.5
WITH i, r UNWIND r.produced AS p
MERGE (x:Expert {id: p.expert}) MERGE (i)-[e:PRODUCED_BY]->(x) SET e.weight = p.weight
"""
NAIVE_READ = """
MATCH (i:Insight) WHERE i.shard = $shard AND i.seq > $after
RETURN i.id AS id, i.seq AS seq, i.embedding AS embedding ORDER BY i.seq
"""


class Source:
    """Insights with their edges, numbered per shard."""

    def __init__(self, seed: int = 0, full: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.next: dict[str, int] = {}
        self.full = full

    def batch(self, shard: str, n: int) -> CuratedBatch:
        start = self.next.get(shard, 0)
        self.next[shard] = start + n
        emb = self.rng.standard_normal((n, DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        b = CuratedBatch("bench-run")
        for k in range(n):
            seq = start + k
            iid = f"{shard}-{seq}"
            b.insights.append(Insight(iid, shard, seq, emb[k], "bench-run"))
            b.supports.append(Support(iid, f"{shard}-src-{seq}", f"{shard}-rep-{seq}", "job",
                                      0.5))
            b.produced.append(Produced(iid, f"expert_{seq % 8}", 0.7))
            if self.full:
                b.produced.append(Produced(iid, f"expert_{(seq + 1) % 8}", 0.3))
                if seq:
                    b.similar.append(Similar(iid, f"{shard}-{seq - 1}", 0.8))
        return b

    def naive_rows(self, shard: str, n: int) -> list[dict]:
        start = self.next.get(shard, 0)
        self.next[shard] = start + n
        return [{"id": f"{shard}-{start + k}", "shard": shard, "seq": start + k,
                 "embedding": self.rng.standard_normal(DIM).astype(np.float32).tolist(),
                 "run": "bench-run", "source": f"{shard}-src-{start + k}",
                 "report": f"{shard}-rep-{start + k}",
                 "produced": [{"expert": f"expert_{k % 8}", "weight": 0.7}]}
                for k in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def naive_one_at_a_time(graph: GraphStore, rows: list[dict]) -> None:
    for r in rows:
        def work(tx, r=r):
            tx.run(NAIVE_ONE, **{k: v for k, v in r.items() if k != "produced"}).consume()
            for p in r["produced"]:
                tx.run(NAIVE_PRODUCED, id=r["id"], **p).consume()
        with graph.driver.session(database=graph.database) as s:
            s.execute_write(work)


def naive_batch(graph: GraphStore, rows: list[dict]) -> None:
    with graph.driver.session(database=graph.database) as s:
        s.execute_write(lambda tx: tx.run(NAIVE_BATCH, rows=rows).consume())


def naive_read(graph: GraphStore, shard: str, after: int = -1) -> int:
    n = 0
    with graph.driver.session(database=graph.database) as s:
        for record in s.run(NAIVE_READ, shard=shard, after=after):
            np.frombuffer(record["embedding"], dtype="<f2")
            n += 1
    return n


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    p.add_argument("--uri", help="a Bolt URI (Neo4j); default: the embedded server")
    p.add_argument("--user", default="neo4j")
    p.add_argument("--password", default=None, help="default: NEO4J_PASSWORD")
    p.add_argument("--neo4j", action="store_true",
                   help="both servers in one run: the embedded one (the reference) and a real "
                        "Neo4j from tools/neo4j/launcher.sh (or --uri), rounds interleaved")
    p.add_argument("--neo4j-version", default=None,
                   help="with --neo4j: the launcher's version [default: the compose pin]")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--full", action="store_true", help="6 edges per insight, not 4")
    p.add_argument("--vector", action="store_true",
                   help="Neo4j keeps the list-of-floats copy under its vector index "
                        "(GRAPH_VECTOR_INDEX=true)")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        embedded = None
        if not args.uri or args.neo4j:
            from pipeline.storage.embedded import LocalGraphServer

            server = LocalGraphServer(tempfile.mkdtemp(prefix="moe-bench-graph-"))
            stack.callback(server.stop)
            embedded = server.connect()
            stack.callback(embedded.close)
        neo4j = None
        if args.uri:
            neo4j = GraphStore.connect(args.uri, args.user,
                                       args.password or os.environ.get("NEO4J_PASSWORD"),
                                       vector_index=args.vector)
            stack.callback(neo4j.close)
        elif args.neo4j:
            sys.path.insert(0, os.path.join(ROOT, "tools", "neo4j"))
            from harness import Neo4jHarness

            harness = stack.enter_context(Neo4jHarness(args.neo4j_version))
            neo4j = GraphStore.connect(harness.uri, harness.user, harness.password,
                                       vector_index=args.vector)
            stack.callback(neo4j.close)
        if args.neo4j:
            return run_both(embedded, neo4j, args)
        return run(neo4j or embedded, args)


def plan(args: argparse.Namespace) -> tuple[int, dict[int, int], tuple[int, int]]:
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    sizes = {1: 20, 100: 200, 1000: 1000, 10000: 2000} if quick else \
        {1: 200, 100: 2000, 1000: 5000, 10000: 20000}
    naive_n = (20, 200) if quick else (200, 2000)
    return rounds, sizes, naive_n


def warm(graph: GraphStore, src: Source, tag: str, quick: bool) -> None:
    """Warm the server's JIT on a shard of its own."""
    graph.ensure_schema(vector_dim=DIM)
    for _ in range(1 if quick else 8):
        graph.write_batch(src.batch(f"warm-{tag}", 200 if quick else 1000))


def one_round(graph: GraphStore, src: Source, tag: str, rnd: int, sizes: dict[int, int],
              naive_n: tuple[int, int], rates: dict[str, list[float]]) -> None:
    """Ours at every batch size, then both references, on fresh shards of this round."""
    for size, total in sizes.items():
        shard = f"ours{size}-{tag}-{rnd}"
        batches = [src.batch(shard, size) for _ in range(max(1, total // size))]
        secs = sum(timed(lambda b=b: graph.write_batch(b)) for b in batches)
        rates.setdefault(f"ours_batch_{size}", []).append(len(batches) * size / secs)
    rows = src.naive_rows(f"naive1-{tag}-{rnd}", naive_n[0])
    rates.setdefault("naive_one_at_a_time", []).append(
        len(rows) / timed(lambda r=rows: naive_one_at_a_time(graph, r)))
    rows = src.naive_rows(f"naiveB-{tag}-{rnd}", naive_n[1])
    rates.setdefault("naive_batch_1000_list", []).append(
        len(rows) / timed(lambda r=rows: [naive_batch(graph, r[i:i + 1000])
                                          for i in range(0, len(r), 1000)]))


def read_rounds(graph: GraphStore, shard: str, n: int, reads: dict[str, list[float]]) -> None:
    for _ in range(3):
        reads.setdefault("ours_read_shard", []).append(
            n / timed(lambda: graph.read_shard(shard, DIM)))
        after = n - max(1, n // 10) - 1
        caught = n - after - 1
        reads.setdefault("ours_catch_up", []).append(
            caught / timed(lambda a=after: graph.read_shard(shard, DIM, after=a)))
        reads.setdefault("naive_read_rows", []).append(
            n / timed(lambda: naive_read(graph, shard)))


def run_both(embedded: GraphStore, neo4j: GraphStore, args: argparse.Namespace) -> dict:
    """The same rows (the same seed) into both servers, the servers taking turns each round."""
    rounds, sizes, naive_n = plan(args)
    tag = uuid.uuid4().hex[:6]
    servers = {"embedded": embedded, "neo4j": neo4j}
    sources = {name: Source(full=args.full) for name in servers}
    rates: dict[str, dict[str, list[float]]] = {name: {} for name in servers}
    for name, graph in servers.items():
        warm(graph, sources[name], tag, args.quick)
    for rnd in range(rounds):
        for name, graph in servers.items():
            one_round(graph, sources[name], tag, rnd, sizes, naive_n, rates[name])
    for name, graph in servers.items():
        big = f"ours10000-{tag}-0"
        read_rounds(graph, big, sources[name].next[big], rates[name])
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rates.items()}
    results = {f"neo4j_{k}_per_s": round(v, 1) for k, v in med["neo4j"].items()}
    references = {f"embedded_{k}_per_s": round(v, 1) for k, v in med["embedded"].items()}
    ratios = {f"neo4j_vs_embedded_{k}": round(med["neo4j"][k] / med["embedded"][k], 3)
              for k in med["neo4j"]}
    best = max(med["neo4j"]["ours_batch_1000"], med["neo4j"]["ours_batch_10000"])
    targets = {"neo4j_insights_per_s_batched": target(8000.0, best),
               "neo4j_ours_1000_vs_one_at_a_time": target(
                   15.0, med["neo4j"]["ours_batch_1000"] / med["neo4j"]["naive_one_at_a_time"])}
    return emit("graph_ingest", torch.device("cpu"),
                {"servers": {name: g.driver.get_server_info().agent
                             for name, g in servers.items()},
                 "dim": DIM, "edges_per_insight": 6 if args.full else 4, "sizes": sizes,
                 "rounds": rounds, "quick": args.quick, "same_rows": True,
                 "neo4j_vector_index": neo4j.with_vector},
                results, references, ratios, targets,
                note="insights/s count nodes written with all their edges; the embedded "
                     "server is the reference; medians of rounds, the servers taking turns")


def run(graph: GraphStore, args: argparse.Namespace) -> dict:
    tag = uuid.uuid4().hex[:6]
    src = Source(full=args.full)
    quick = args.quick
    rounds, sizes, naive_n = plan(args)
    warm(graph, src, tag, quick)
    rates: dict[str, list[float]] = {}
    for rnd in range(rounds):
        one_round(graph, src, tag, rnd, sizes, naive_n, rates)
    big = f"ours10000-{tag}-0"
    n_big = src.next[big]
    reads: dict[str, list[float]] = {}
    read_rounds(graph, big, n_big, reads)
    med = {k: statistics.median(v) for k, v in {**rates, **reads}.items()}
    results = {f"{k}_per_s": round(v, 1) for k, v in med.items() if k.startswith("ours")}
    references = {f"{k}_per_s": round(v, 1) for k, v in med.items()
                  if k.startswith("naive")}
    best_batched = max(med["ours_batch_1000"], med["ours_batch_10000"])
    ratios = {"ours_1000_vs_one_at_a_time": med["ours_batch_1000"] / med["naive_one_at_a_time"],
              "ours_1000_vs_naive_batch": med["ours_batch_1000"] / med["naive_batch_1000_list"],
              "ours_read_vs_naive_read": med["ours_read_shard"] / med["naive_read_rows"]}
    targets = {"insights_per_s_batched": target(8000.0, best_batched),
               "ours_1000_vs_one_at_a_time": target(15.0, ratios["ours_1000_vs_one_at_a_time"]),
               "cache_read_rows_per_s": target(40000.0, med["ours_read_shard"])}
    agent = graph.driver.get_server_info().agent
    return emit("graph_ingest", torch.device("cpu"),
                {"server": agent, "dim": DIM, "edges_per_insight": 6 if args.full else 4,
                 "sizes": sizes,
                 "rounds": rounds, "read_rows": n_big, "quick": quick},
                results, references, ratios, targets,
                note="insights/s count nodes written with all their edges; medians of rounds")


if __name__ == "__main__":
    main()
    sys.exit(0)
