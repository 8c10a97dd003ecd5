"""The models users import from `pipeline`, with the knowledge graph of their settings.

`pipeline.moe` is the model alone: it does no I/O, so its ``query_knowledge_graph`` on a model
with no librarian attached answers an empty list. The classes here are the same models with
one difference: unattached, they search the graph that `Settings` names (``NEO4J_URI``, or the
state dir's embedded server), which is what the seeds' Quick Start expects of
``from pipeline import FullyOptimizedMoESystem``.
"""

from __future__ import annotations

from typing import Any

from pipeline.moe import optimized, system
from pipeline.runtime import default_knowledge


class _SettingsKnowledge:
    def default_knowledge(self) -> Any:
        # Resolved when a question is first asked, not at construction: building a model
        # must not open databases or start a graph server.
        return default_knowledge(self.config)  # type: ignore[attr-defined]


class MixtureOfExpertsSystem(_SettingsKnowledge, system.MixtureOfExpertsSystem):
    """`pipeline.moe.system.MixtureOfExpertsSystem`, answering from the settings' graph."""


class FullyOptimizedMoESystem(_SettingsKnowledge, optimized.FullyOptimizedMoESystem):
    """`pipeline.moe.optimized.FullyOptimizedMoESystem`, answering from the settings' graph."""


__all__ = ["FullyOptimizedMoESystem", "MixtureOfExpertsSystem"]
