"""`Runtime`: the one place a process's SQL, model, graph, locks and librarians are built."""

from __future__ import annotations

import pytest

from pipeline.runtime import Runtime
from pipeline.serving import default_config, model_fingerprint
from pipeline.settings import Settings


def test_the_runtime_builds_each_part_once_and_only_when_asked(graph, tmp_path):
    settings = Settings(state_dir=tmp_path, neo4j_uri=graph.uri,
                        neo4j_username=graph.auth[0] if graph.auth else "neo4j",
                        neo4j_password=graph.auth[1] if graph.auth else None,
                        neo4j_database=graph.database, device="cpu")
    with Runtime.from_settings(settings) as rt:
        assert rt._system is None and rt._graph is None  # nothing loaded up front
        assert rt.config == default_config()  # read without loading weights
        assert rt._system is None
        assert rt.fingerprint == model_fingerprint(settings, default_config())
        lib = rt.librarian()
        assert rt.librarian(default_config()) is lib  # one per model shape
        assert lib.dim == default_config().input_dim
        assert rt.graph is rt.graph
    assert rt._graph is None  # closed


@pytest.mark.parametrize("server", ["neo4j_server", "neo4j_current_server"])
def test_the_vector_index_exists_on_neo4j_and_answers_cypher(server, request, tmp_path):
    """The width comes from the served model (`ensure_schema` is given it), the index is made
    on 5.26 and on the calendar-versioned releases alike, and a read-only user query of it
    finds an insight's own embedding first."""
    import uuid

    import numpy as np

    from pipeline.records import CuratedBatch, Insight, Produced, Support

    neo4j = request.getfixturevalue(server)
    dim = default_config().input_dim
    settings = Settings(state_dir=tmp_path, neo4j_uri=neo4j["uri"],
                        neo4j_password=neo4j["password"], graph_vector_index=True, device="cpu")
    with Runtime.from_settings(settings) as rt:
        graph = rt.graph
        rows = graph.driver.execute_query(
            "SHOW INDEXES YIELD name, type, options WHERE name = 'insight_embedding' "
            "RETURN type, options").records
        assert rows and rows[0]["type"] == "VECTOR"
        assert rows[0]["options"]["indexConfig"]["vector.dimensions"] == dim
        shard = f"vec-{uuid.uuid4().hex[:8]}"
        emb = np.random.default_rng(3).standard_normal((4, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        batch = CuratedBatch("run-vec")
        for k in range(4):
            batch.insights.append(Insight(f"{shard}-{k}", shard, k, emb[k], "run-vec", f"s{k}"))
            batch.supports.append(Support(f"{shard}-{k}", f"{shard}-src{k}", f"{shard}-r{k}",
                                          "job-v", 0.5, f"text {k}"))
            batch.produced.append(Produced(f"{shard}-{k}", f"{shard}-e0", 0.6))
        graph.write_batch(batch)
        graph.driver.execute_query("CALL db.awaitIndexes(120)")
        found = graph.run_cypher(
            "CALL db.index.vector.queryNodes('insight_embedding', 50, $v) YIELD node, score "
            "WHERE node.shard = $shard RETURN node.id AS id, score",
            {"v": emb[2].tolist(), "shard": shard})
        assert found[0]["id"] == f"{shard}-2" and found[0]["score"] > 0.99


@pytest.mark.parametrize("server", ["neo4j_server", "neo4j_current_server"])
def test_the_schema_is_idempotent_and_a_vector_index_of_another_width_is_named(server,
                                                                                request):
    """Every process ensures the schema at start: a second, third start changes nothing, and
    an index made for another model's width is one clear error, not a silently stale index."""
    from pipeline.errors import PipelineError
    from pipeline.storage.graph import GraphStore

    neo4j = request.getfixturevalue(server)
    dim = default_config().input_dim
    for _ in range(3):  # three processes starting, one after another
        graph = GraphStore.connect(neo4j["uri"], "neo4j", neo4j["password"], vector_index=True)
        try:
            graph.ensure_schema(vector_dim=dim)
            names = {r["name"] for r in graph.driver.execute_query(
                "SHOW INDEXES YIELD name RETURN name").records}
        finally:
            graph.close()
        assert {"insight_embedding", "insight_shard_seq", "source_id", "insight_id"} <= names
    graph = GraphStore.connect(neo4j["uri"], "neo4j", neo4j["password"], vector_index=True)
    try:
        with pytest.raises(PipelineError, match=f"is {dim} wide and the served model's "
                                                "embeddings 16: drop it"):
            graph.ensure_schema(vector_dim=16)
    finally:
        graph.close()
