"""The models users import from `pipeline`, with the knowledge graph of their settings.

`pipeline.moe` is the model alone: it does no I/O, so its ``query_knowledge_graph`` on a model
with no librarian attached answers an empty list. The classes here are the same models with
one difference: unattached, they search the graph that `Settings` names (``NEO4J_URI``, or the
state dir's embedded server), which is what the seeds' Quick Start expects of
``from pipeline import FullyOptimizedMoESystem``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.moe import optimized, system
from pipeline.retract import ForgetResult
from pipeline.runtime import Runtime, default_knowledge
from pipeline.settings import Settings


class _SettingsKnowledge:
    def default_knowledge(self) -> Any:
        # Resolved when a question is first asked, not at construction: building a model
        # must not open databases or start a graph server.
        return default_knowledge(self.config)  # type: ignore[attr-defined]


class MixtureOfExpertsSystem(_SettingsKnowledge, system.MixtureOfExpertsSystem):
    """`pipeline.moe.system.MixtureOfExpertsSystem`, answering from the settings' graph."""


class FullyOptimizedMoESystem(_SettingsKnowledge, optimized.FullyOptimizedMoESystem):
    """`pipeline.moe.optimized.FullyOptimizedMoESystem`, answering from the settings' graph."""


def forget(sources: Iterable[str] = (), *, job: str | None = None, file: str | None = None,
           dry_run: bool = False, settings: Settings | None = None) -> ForgetResult:
    """Take sources (ids, the ids of a JSON Lines ``file``, or what ``job`` filed) back out
    of the graph that ``settings`` (default: the environment's) names: what
    ``moe-pipeline forget`` does (`pipeline.retract.forget`)."""
    from pipeline import retract
    from pipeline.inputs import file_ids

    ids = [*sources, *(file_ids(file) if file else [])]
    with Runtime.from_settings(settings or Settings()) as rt:
        return retract.forget(rt, ids, job=job, dry_run=dry_run)


__all__ = ["FullyOptimizedMoESystem", "MixtureOfExpertsSystem", "forget"]
