"""The insight graph on real servers: schema, batched idempotent writes, cache reads, queries.

Each test writes under its own shard names (unique ids), never wiping what others wrote.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.records import CuratedBatch, Insight, Produced, Similar, Support
from pipeline.storage.graph import GraphStore, GraphUnavailable, ReadOnlyQueryError


def _shard() -> str:
    return f"shard-{uuid.uuid4().hex[:10]}"


def make_batch(shard: str, n: int, start: int = 0, dim: int = 16, seed: int = 0,
               run: str = "run-a") -> tuple[CuratedBatch, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    batch = CuratedBatch(run)
    for k in range(n):
        iid = f"{shard}-i{start + k}"
        batch.insights.append(Insight(iid, shard, start + k, emb[k], run, f"summary {k}"))
        batch.supports.append(Support(iid, f"{shard}-src{start + k}", f"{shard}-rep{start + k}",
                                      "job-1", 0.5, f"text {k}"))
        batch.produced.append(Produced(iid, f"{shard}-e{k % 3}", 0.6))
        if k:
            batch.similar.append(Similar(iid, f"{shard}-i{start + k - 1}", 0.7))
    return batch, emb


def counts(graph: GraphStore, shard: str) -> dict[str, int]:
    rows = graph.run_cypher(
        "MATCH (i:Insight {shard: $shard})-[e]->() RETURN type(e) AS t, count(e) AS n",
        {"shard": shard})
    return {r["t"]: r["n"] for r in rows}


def test_schema_is_in_place_and_ids_are_unique(graph):
    graph.ensure_schema()  # idempotent
    shard = _shard()
    graph.write_batch(make_batch(shard, 2)[0])
    assert {"Insight", "Source", "Expert", "Constellation", "Run"} <= set(graph.labels())
    with pytest.raises(Exception, match="(?i)constraint|duplicat|unique"):
        graph.run_cypher("CREATE (:Insight {id: $id})", {"id": f"{shard}-i0"}, write=True)


def test_a_batch_writes_nodes_and_edges_in_one_go_and_replays_as_a_no_op(graph):
    shard = _shard()
    batch, _ = make_batch(shard, 5)
    written = graph.write_batch(batch)
    assert written["insights"] == 5
    expected = {"SUPPORTED_BY": 5, "PRODUCED_BY": 5, "IN_CONSTELLATION": 5,
                "DISCOVERED_IN": 5, "SIMILAR_TO": 4}
    assert counts(graph, shard) == expected
    again = graph.write_batch(batch)  # a redelivered task
    assert again["insights"] == 0 and again["old_supports"] == 5
    assert counts(graph, shard) == expected
    n = graph.run_cypher("MATCH (i:Insight {shard: $s}) RETURN count(i) AS n", {"s": shard})
    assert n == [{"n": 5}]


def test_merging_into_an_existing_insight_adds_support_and_keeps_the_max_weight(graph):
    shard = _shard()
    graph.write_batch(make_batch(shard, 2)[0])
    merge = CuratedBatch("run-b", supports=[
        Support(f"{shard}-i0", f"{shard}-other-src", f"{shard}-rep-x", "job-2", 0.9, "again")],
        produced=[Produced(f"{shard}-i0", f"{shard}-e0", 0.95),
                  Produced(f"{shard}-i0", f"{shard}-e2", 0.1)])
    graph.write_batch(merge)
    graph.write_batch(merge)
    rows = graph.run_cypher(
        "MATCH (i:Insight {id: $id})-[e:SUPPORTED_BY]->(s:Source) "
        "RETURN s.id AS source, e.job_id AS job ORDER BY source", {"id": f"{shard}-i0"})
    assert rows == [{"source": f"{shard}-other-src", "job": "job-2"},
                    {"source": f"{shard}-src0", "job": "job-1"}]
    weights = graph.run_cypher(
        "MATCH (i:Insight {id: $id})-[e:PRODUCED_BY]->(x:Expert) "
        "RETURN x.id AS expert, e.weight AS w ORDER BY expert", {"id": f"{shard}-i0"})
    assert weights == [{"expert": f"{shard}-e0", "w": 0.95}, {"expert": f"{shard}-e2", "w": 0.1}]


def test_new_insights_need_support_and_an_expert(graph):
    batch = CuratedBatch("run-a", insights=[Insight("lonely", _shard(), 0,
                                                    np.zeros(4, np.float32), "run-a")])
    with pytest.raises(ValueError, match="insight lonely is new but has no supports"):
        graph.write_batch(batch)


def test_cache_reads_come_back_in_seq_order_as_compact_float16(graph):
    shard = _shard()
    first, emb1 = make_batch(shard, 30, dim=24)
    second, emb2 = make_batch(shard, 20, start=30, dim=24, seed=1)
    graph.write_batch(first)
    graph.write_batch(second)
    rows = graph.read_shard(shard, dim=24, page=7)  # several pages
    assert rows.seqs.tolist() == list(range(50))
    assert rows.ids[:2] == [f"{shard}-i0", f"{shard}-i1"]
    assert rows.embeddings.dtype == np.float16
    np.testing.assert_array_equal(rows.embeddings, np.concatenate([emb1, emb2]).astype(np.float16))
    tail = graph.read_shard(shard, dim=24, after=39)
    assert tail.seqs.tolist() == list(range(40, 50))
    assert graph.max_seq(shard) == 49 and graph.max_seq(_shard()) == -1
    assert len(graph.read_shard(_shard(), dim=24)) == 0


def test_user_queries_are_read_only_unless_asked(graph):
    shard = _shard()
    graph.write_batch(make_batch(shard, 3)[0])
    rows = graph.run_cypher("MATCH (i:Insight {shard: $s}) RETURN i.id AS id ORDER BY id",
                            {"s": shard})
    assert [r["id"] for r in rows] == [f"{shard}-i0", f"{shard}-i1", f"{shard}-i2"]
    for query in ("CREATE (:Probe {shard: $s})", "MATCH (i:Insight {shard: $s}) SET i.x = 1",
                  "MATCH (i:Insight {shard: $s}) DETACH DELETE i",
                  "MERGE (p:Probe {shard: $s}) RETURN p",
                  "CALL `apoc`.`merge`.`node`(['Probe'], {shard: $s})",
                  "CALL apoc.cypher.runSchema('CREATE INDEX x FOR (n:Probe) ON (n.a)', {})"):
        with pytest.raises(ReadOnlyQueryError):
            graph.run_cypher(query, {"s": shard})
    assert graph.run_cypher("MATCH (p:Probe {shard: $s}) RETURN count(p) AS n",
                            {"s": shard}) == [{"n": 0}]
    graph.run_cypher("CREATE (:Probe {shard: $s})", {"s": shard}, write=True)
    assert graph.run_cypher("MATCH (p:Probe {shard: $s}) RETURN count(p) AS n",
                            {"s": shard}) == [{"n": 1}]
    # Values travel as parameters, never as query text.
    odd = "x'}) DETACH DELETE (n) //"
    assert graph.run_cypher("RETURN $v AS v", {"v": odd}) == [{"v": odd}]


def test_a_graph_that_is_down_names_its_uri():
    with pytest.raises(GraphUnavailable, match="bolt://127.0.0.1:9 is unavailable"):
        GraphStore.connect("bolt://127.0.0.1:9", "neo4j", "x", timeout_s=1)


@pytest.mark.integration
@pytest.mark.slow
def test_local_server_reuses_a_running_one_and_keeps_data_across_restarts(tmp_path):
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    from pipeline.storage.embedded import LocalGraphServer

    server = LocalGraphServer(tmp_path)
    try:
        first = server.start()
        assert server.start().pid == first.pid  # reused, not a second server
        password = tmp_path / "graph" / "password"
        assert stat.S_IMODE(os.stat(password).st_mode) == 0o600
        with server.connect() as g:
            g.ensure_schema()
            g.write_batch(make_batch("persist", 3)[0])
        assert server.stop()
        assert server.running() is None
        second = server.start()
        assert second.pid != first.pid
        with server.connect() as g:
            assert g.max_seq("persist") == 2
        # A server started by a release before the read-only user is restarted once, with it.
        info = tmp_path / "graph" / "server.json"
        info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items()
                                    if k != "reader"}))
        third = server.start()
        assert third.pid != second.pid and third.reader
        with server.connect() as g:
            assert g.reader is not None
            assert g.run_cypher("MATCH (i:Insight {shard: 'persist'}) RETURN count(i) AS n") \
                == [{"n": 3}]
    finally:
        server.stop()


def test_dialect_comes_from_the_servers_agent():
    from pipeline.storage.cypher import Dialect

    arcade = Dialect.for_agent("Neo4j/5.26.0 compatible (ArcadeDB 26.10.2)")
    neo4j = Dialect.for_agent("Neo4j/5.26.1")
    assert arcade.name == "arcadedb" and not arcade.vector_index
    assert neo4j.name == "neo4j" and neo4j.vector_index
    assert not any("VECTOR" in s for s in arcade.schema(vector_dim=384))
    (vector,) = [s for s in neo4j.schema(vector_dim=384) if "VECTOR" in s]
    assert "`vector.dimensions`: 384" in vector and "'cosine'" in vector
    assert len(neo4j.schema()) == 6  # five uniqueness constraints and (shard, seq)
    # Calendar-versioned Neo4j (2025.01 on) has the vector index too; 5.14 and older do not.
    for agent, has in [("Neo4j/2025.01.0", True), ("Neo4j/2026.08.1", True),
                       ("Neo4j/5.15.0", True), ("Neo4j/5.14.0", False), ("Neo4j/4.4.48", False),
                       ("Neo4j/dev", False)]:
        assert Dialect.for_agent(agent).vector_index is has, agent


def test_concurrent_writers_on_different_shards_both_land(graph):
    """Two librarians at once: page conflicts on the server are transient and retried."""
    from concurrent.futures import ThreadPoolExecutor

    shards = [_shard(), _shard()]

    def write(shard: str) -> None:
        for k in range(4):
            graph.write_batch(make_batch(shard, 50, start=50 * k, seed=k)[0])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, shards))
    for shard in shards:
        assert graph.max_seq(shard) == 199
        assert counts(graph, shard)["SUPPORTED_BY"] == 200


def test_the_readme_rebuild_collapses_old_per_report_support_edges(graph):
    """Graphs of 0.1.0 held one SUPPORTED_BY per report; the documented query leaves one per
    (insight, source)."""
    import re

    shard = _shard()
    graph.write_batch(make_batch(shard, 2)[0])
    (insight,) = [r["i"] for r in graph.run_cypher(
        "MATCH (n:Insight {shard: $s}) WITH n ORDER BY n.seq LIMIT 1 RETURN n.id AS i",
        {"s": shard})]
    graph.run_cypher("MATCH (i:Insight {id: $i})-[:SUPPORTED_BY]->(s:Source) "
                     "CREATE (i)-[:SUPPORTED_BY {report_id: 'old', job_id: 'j0'}]->(s)",
                     {"i": insight}, write=True)
    count = ("MATCH (i:Insight {id: $i})-[e:SUPPORTED_BY]->(s:Source) "
             "RETURN count(e) AS edges, count(DISTINCT s) AS sources")
    before = graph.run_cypher(count, {"i": insight})[0]
    assert before["edges"] == 2 * before["sources"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (rebuild,) = re.findall(r'moe-pipeline query --write "(MATCH \(i:Insight\)-\[e:SUPPORTED_BY'
                            r'[^"]+)"', readme)
    graph.run_cypher(rebuild, write=True)
    after = graph.run_cypher(count, {"i": insight})[0]
    assert after["edges"] == after["sources"] == before["sources"]
