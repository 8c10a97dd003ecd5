"""moe-pipeline: a graph-database-backed mixture-of-experts pipeline."""

from pipeline.config import MoEConfig, Settings
from pipeline.errors import ConfigError, InputShapeError, PipelineError
from pipeline.moe.layer import MoEAux, MoELayer

__version__ = "0.1.0"

__all__ = ["ConfigError", "InputShapeError", "MoEAux", "MoEConfig", "MoELayer", "PipelineError",
           "Settings", "__version__"]
