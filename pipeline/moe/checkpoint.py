"""Saving and loading models: weights as safetensors, the config as JSON, side by side.

A checkpoint is a directory holding ``model.safetensors`` and ``config.json``. Loading into
a model whose config differs is refused with an error naming the first differing fields,
since silently loading mismatched weights (or a different routing scheme) is how
experiments go quietly wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import PipelineError
from pipeline.moe.config import MoEConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(PipelineError):
    """A checkpoint is missing, unreadable, or made for a different config.

    Attributes:
        path: the checkpoint directory.
        fields: config fields that differ (empty when the problem is elsewhere).
    """

    def __init__(self, path: Path, message: str, fields: tuple[str, ...] = ()) -> None:
        self.path, self.fields = path, fields
        super().__init__(f"checkpoint {path}: {message}")


def save(model: nn.Module, config: MoEConfig, path: str | Path,
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state and ``config`` under directory ``path``; return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS))
    record = {"config": config.to_dict(), **(extra or {})}
    (path / CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def read_config(path: str | Path) -> MoEConfig:
    """The config a checkpoint was saved with."""
    path = Path(path)
    try:
        record = json.loads((path / CONFIG).read_text())
        return MoEConfig.from_dict(record["config"])
    except FileNotFoundError as err:
        raise CheckpointError(path, f"no {CONFIG} (is this a checkpoint directory?)") from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(path, f"{CONFIG} is not a saved config: {err}") from err


def load(model: nn.Module, config: MoEConfig, path: str | Path) -> None:
    """Load the weights at ``path`` into ``model``, whose config must equal the saved one."""
    path = Path(path)
    saved = read_config(path).to_dict()
    ours = config.to_dict()
    differ = tuple(k for k in ours if saved.get(k) != ours[k])
    if differ:
        shown = ", ".join(f"{k}: saved {saved.get(k)!r} vs model {ours[k]!r}"
                          for k in differ[:3])
        raise CheckpointError(path, f"config does not match the model ({shown})", differ)
    try:
        state = load_file(str(path / WEIGHTS))
    except FileNotFoundError as err:
        raise CheckpointError(path, f"no {WEIGHTS}") from err
    except (SafetensorError, OSError) as err:
        raise CheckpointError(path, f"{WEIGHTS} is unreadable: {err}") from err
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(path, f"weights do not fit the model (missing "
                              f"{result.missing_keys[:3]}, unexpected "
                              f"{result.unexpected_keys[:3]})")
