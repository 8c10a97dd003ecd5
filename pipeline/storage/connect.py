"""The one place a graph backend is chosen: Neo4j when ``NEO4J_URI`` is set, else the
embedded server of the state dir (started on first use, left running for later commands)."""

from __future__ import annotations

from pipeline.errors import PipelineError
from pipeline.redact import masked, userinfo
from pipeline.settings import Settings
from pipeline.storage.embedded import LocalGraphServer
from pipeline.storage.graph import GraphStore

BOLT_SCHEMES = ("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc")


def open_graph(settings: Settings) -> GraphStore:
    """A connected `GraphStore` on the graph the settings name."""
    if settings.neo4j_uri:
        scheme = settings.neo4j_uri.split("://", 1)[0] if "://" in settings.neo4j_uri else ""
        if scheme not in BOLT_SCHEMES:
            raise PipelineError(f"NEO4J_URI {masked(settings.neo4j_uri)}: expected a Bolt URI "
                                f"({', '.join(s + '://' for s in BOLT_SCHEMES)}), such as "
                                "bolt://127.0.0.1:7687")
        if userinfo(settings.neo4j_uri) is not None:
            # The driver refuses such a URI with an error that quotes it, password and all.
            raise PipelineError(f"NEO4J_URI {masked(settings.neo4j_uri)}: a user or password "
                                "in the URI is not supported; set NEO4J_USERNAME and "
                                "NEO4J_PASSWORD instead")
        return GraphStore.connect(settings.neo4j_uri, settings.neo4j_username,
                                  settings.neo4j_password, settings.neo4j_database,
                                  settings.graph_connect_timeout_s,
                                  settings.graph_vector_index)
    return LocalGraphServer(settings.state_dir).connect(settings.graph_connect_timeout_s)
