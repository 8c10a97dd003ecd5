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


@pytest.mark.docker
def test_the_vector_index_exists_on_neo4j_after_the_runtime_opens_the_graph(tmp_path):
    """The width comes from the served model: `ensure_schema` is given it (it never was)."""
    from testcontainers.neo4j import Neo4jContainer

    with Neo4jContainer("neo4j:5.26") as container:
        settings = Settings(state_dir=tmp_path, neo4j_uri=container.get_connection_url(),
                            neo4j_password=container.password, graph_vector_index=True,
                            device="cpu")
        with Runtime.from_settings(settings) as rt, rt.graph.driver.session() as session:
            rows = session.run(
                "SHOW INDEXES YIELD name, type, options WHERE name = 'insight_embedding' "
                "RETURN type, options").data()
        assert rows and rows[0]["type"] == "VECTOR"
        dims = rows[0]["options"]["indexConfig"]["vector.dimensions"]
        assert dims == default_config().input_dim
