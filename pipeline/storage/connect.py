"""The one place a graph backend is chosen: Neo4j when ``NEO4J_URI`` is set, else the
embedded server of the state dir (started on first use, left running for later commands)."""

from __future__ import annotations

from pipeline.settings import Settings
from pipeline.storage.embedded import LocalGraphServer
from pipeline.storage.graph import GraphStore


def open_graph(settings: Settings) -> GraphStore:
    """A connected `GraphStore` on the graph the settings name."""
    if settings.neo4j_uri:
        return GraphStore.connect(settings.neo4j_uri, settings.neo4j_username,
                                  settings.neo4j_password, settings.neo4j_database,
                                  settings.graph_connect_timeout_s,
                                  settings.graph_vector_index)
    return LocalGraphServer(settings.state_dir).connect(settings.graph_connect_timeout_s)
