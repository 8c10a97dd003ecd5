"""What a run's SQL row keeps of its model: the knowledge part, and the constellations.

A run is recorded when its job opens and read back where its reports are curated, which may
be another process serving another checkpoint; so the row keeps what curation and `stats`
read, and nothing else:

- ``knowledge``: `KnowledgeConfig`'s fields (the width, thresholds, cache bound and
  snapshots the librarian decides with);
- ``constellations``: each constellation's experts by name, what the graph's Run and model
  nodes record (`GraphStore.ensure_run`) and what `stats` labels expert usage with.

The layer, system and optimisation parts stay in the checkpoint, whose fingerprint each
batch carries. A row written before this (the whole flat `MoEConfig` as JSON) still reads:
its knowledge and constellations are taken from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.errors import ConfigError, PipelineError
from pipeline.moe.config import KnowledgeConfig, MoEConfig


@dataclass(frozen=True)
class RunKnowledge:
    knowledge: KnowledgeConfig
    constellations: dict[str, list[str]]  # constellation name -> its experts' names

    @classmethod
    def of(cls, config: MoEConfig) -> RunKnowledge:
        return cls(config.knowledge, config.system.constellation_map())

    def to_json(self) -> dict[str, Any]:
        """The row's JSON (the ``runs.model_config`` column)."""
        return {"knowledge": asdict(self.knowledge), "constellations": self.constellations}

    @classmethod
    def from_json(cls, data: dict[str, Any], run_id: str) -> RunKnowledge:
        """A row's JSON, of this format or the old one (a flat `MoEConfig`); a row that is
        neither raises `PipelineError` naming the run."""
        try:
            if "knowledge" not in data:  # written before the config had parts
                return cls.of(MoEConfig.from_dict(data))
            known = {f.name for f in fields(KnowledgeConfig)}
            knowledge = data["knowledge"]
            unknown = sorted(set(knowledge) - known)
            if unknown:
                raise ConfigError(unknown[0], knowledge[unknown[0]], "a KnowledgeConfig field")
            return cls(KnowledgeConfig(**knowledge),
                       {str(k): list(v) for k, v in data["constellations"].items()})
        except (ConfigError, KeyError, TypeError, AttributeError) as err:
            raise PipelineError(f"run {run_id}: its recorded model config is not readable "
                                f"({err})") from err
