"""`Runtime`: what one process needs to run the stages, assembled in one place.

An entry point (the CLI, a worker's pool process, a test, a user's script) builds `Settings`
once and calls `Runtime.from_settings(settings)`; the stages take the runtime and ask it for
the SQL sessions, the served model, the graph, the shard locks and a librarian. Each is made
on first use and kept for the life of the process: a GPU worker never opens the graph, a
librarian never loads the model. `close()` lets go of all of it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict
from typing import Any

from sqlalchemy.orm import sessionmaker

from pipeline import serving
from pipeline.librarian import Librarian
from pipeline.moe.config import KnowledgeConfig, MoEConfig
from pipeline.moe.system import MixtureOfExpertsSystem
from pipeline.settings import Settings, private_state_dir
from pipeline.storage import ledger
from pipeline.storage.connect import open_graph
from pipeline.storage.graph import GraphStore
from pipeline.storage.locks import LocalShardLock, RedisShardLock, shard_locks
from pipeline.storage.run_knowledge import RunKnowledge
from pipeline.storage.sql import session_factory


def worker_name() -> str:
    """Who did a piece of work, as the ledger records it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Runtime:
    """Settings, SQL sessions, and the served model, graph, locks and librarians, lazily."""

    def __init__(self, settings: Settings, Session: sessionmaker,
                 device: str | None = None) -> None:
        self.settings = settings
        self.Session = Session
        self.device = device or settings.torch_device()
        self._serving: Settings | None = None
        self._system: MixtureOfExpertsSystem | None = None
        self._config: MoEConfig | None = None
        self._fingerprint: str | None = None
        self._graph: GraphStore | None = None
        self._locks: LocalShardLock | RedisShardLock | None = None
        self._librarians: dict[str, Librarian] = {}
        self._runs: set[str] = set()
        self._run_knowledge: dict[str, RunKnowledge] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str | None = None,
                      migrate: bool = True) -> Runtime:
        """A runtime on the settings' SQL database (migrated first unless ``migrate`` is
        False: workers leave that to `submit` and the stack's one-shot migrate service).
        The state dir is made private first (see `settings.private_state_dir`)."""
        private_state_dir(settings.state_dir)
        return cls(settings, session_factory(settings.sql_url(), run_migrations=migrate),
                   device)

    # -- the served model ------------------------------------------------------------------
    @property
    def serving(self) -> Settings:
        """The settings with the served checkpoint resolved, once for this process: the
        config, the weights and the fingerprint all come from the same one, even if `train`
        writes a newer checkpoint meanwhile."""
        if self._serving is None:
            path = serving.served_path(self.settings)
            self._serving = (self.settings if path is None
                             else self.settings.model_copy(update={"model_path": path}))
        return self._serving

    @property
    def config(self) -> MoEConfig:
        """The served model's config, read without loading its weights."""
        if self._config is None:
            self._config = (self._system.config if self._system is not None
                            else serving.model_config(self.serving))
        return self._config

    @property
    def system(self) -> MixtureOfExpertsSystem:
        if self._system is None:
            self._system = serving.load_system(self.serving, self.device)
            self._config = self._system.config
        return self._system

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = serving.model_fingerprint(self.serving, self.config)
        return self._fingerprint

    # -- storage ---------------------------------------------------------------------------
    @property
    def graph(self) -> GraphStore:
        """The graph, its schema ensured (with the vector index where the server has one,
        as wide as the served model's reports)."""
        if self._graph is None:
            graph = open_graph(self.settings)
            try:
                graph.ensure_schema(vector_dim=self.config.input_dim)
            except BaseException:
                graph.close()
                raise
            self._graph = graph  # only once the schema is known to be there
        return self._graph

    @property
    def locks(self) -> LocalShardLock | RedisShardLock:
        if self._locks is None:
            self._locks = shard_locks(self.settings)
        return self._locks

    def librarian(self, config: MoEConfig | KnowledgeConfig | None = None) -> Librarian:
        """One librarian per knowledge part (width, thresholds, cache bound, snapshots), its
        caches kept warm."""
        knowledge = (config or self.config)
        if isinstance(knowledge, MoEConfig):
            knowledge = knowledge.knowledge
        key = json.dumps(asdict(knowledge), sort_keys=True)
        if key not in self._librarians:
            self._librarians[key] = Librarian.from_config(self.graph, self.locks, knowledge,
                                                          device=self.device)
        return self._librarians[key]

    def librarians(self) -> list[Librarian]:
        """The librarians this process made (each with its caches)."""
        return list(self._librarians.values())

    def run_knowledge(self, run_id: str) -> RunKnowledge:
        """What a run's curation reads of its model, as the run recorded it (from SQL, once
        per process)."""
        if run_id not in self._run_knowledge:
            self._run_knowledge[run_id] = ledger.run_knowledge(self.Session, run_id)
        return self._run_knowledge[run_id]

    def ensure_run(self, run_id: str, known: RunKnowledge, model: str | None = None) -> None:
        """The run's node and its model's experts and constellations, once per process."""
        if run_id not in self._runs:
            self.graph.ensure_run(run_id, known.to_json(), known.constellations, model)
            self._runs.add(run_id)

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None
        self.Session.kw["bind"].dispose()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class EmptyKnowledge:
    """What a model with no graph attached searches when the state dir has no graph."""

    def search(self, query: Any, top_k: int = 5,
               shards: Any = None) -> list[dict[str, Any]]:
        return []


def default_knowledge(config: MoEConfig, settings: Settings | None = None
                      ) -> Librarian | EmptyKnowledge:
    """The knowledge graph `MixtureOfExpertsSystem.query_knowledge_graph` answers from when
    none was attached: the graph the settings name (``NEO4J_URI``, or the embedded server of
    the state dir if one was ever created there), else an empty one."""
    settings = settings or Settings()
    if not settings.neo4j_uri and not (settings.state_dir / "graph").exists():
        return EmptyKnowledge()
    rt = Runtime.from_settings(settings)
    return rt.librarian(config)
