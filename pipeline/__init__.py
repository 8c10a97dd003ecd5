"""moe-pipeline: a graph-database-backed mixture-of-experts pipeline.

The names users type come from here: ``from pipeline import MoEConfig,
FullyOptimizedMoESystem``. They are resolved on first use, so that ``import pipeline`` (and
every command that needs no model, such as ``moe-pipeline --help`` or ``status``) does not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, InputShapeError, PipelineError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "MoEConfig": "pipeline.moe.config",
    "MoELayer": "pipeline.moe.layer",
    "MoEAux": "pipeline.moe.layer",
    "MixtureOfExpertsSystem": "pipeline.api",
    "FullyOptimizedMoESystem": "pipeline.api",
    "Settings": "pipeline.settings",
    "forget": "pipeline.api",
}

if TYPE_CHECKING:
    from pipeline.api import FullyOptimizedMoESystem, MixtureOfExpertsSystem, forget
    from pipeline.moe.config import MoEConfig
    from pipeline.moe.layer import MoEAux, MoELayer
    from pipeline.settings import Settings


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["ConfigError", "FullyOptimizedMoESystem", "InputShapeError", "MixtureOfExpertsSystem",
           "MoEAux", "MoEConfig", "MoELayer", "PipelineError", "Settings", "__version__", "forget"]
