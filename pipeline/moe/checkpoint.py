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
ORDER = "constellation_order"


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
    # A constellation's index is its place in the `constellations` mapping, and the
    # supervisor's row of that index is its meaning. JSON objects carry no order that every
    # writer and reader keeps (sorting the keys once filed every insight under another
    # constellation's name), so the order is saved as a list of its own.
    record = {"config": config.to_dict(), ORDER: constellation_order(config), **(extra or {})}
    (path / CONFIG).write_text(json.dumps(record, indent=2))
    return path


def constellation_order(config: MoEConfig) -> list[str] | None:
    """The configured constellations' names in index order (None without constellations)."""
    return list(config.constellations) if config.constellations is not None else None


def read_record(path: str | Path) -> dict[str, Any]:
    """The whole of a checkpoint's config.json."""
    path = Path(path)
    try:
        record = json.loads((path / CONFIG).read_text())
    except FileNotFoundError as err:
        raise CheckpointError(path, f"no {CONFIG} (is this a checkpoint directory?)") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(path, f"{CONFIG} is not a saved config: {err}") from err
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise CheckpointError(path, f"{CONFIG} is not a saved config: no 'config' object")
    return record


def read_config(path: str | Path) -> MoEConfig:
    """The config a checkpoint was saved with, its constellations in their saved order."""
    path = Path(path)
    record = read_record(path)
    data = dict(record["config"])
    groups = data.get("constellations")
    if isinstance(groups, dict) and len(groups) > 1:
        order = record.get(ORDER)
        if order is None:
            raise CheckpointError(path, "saved without its constellation order (an older "
                                  "release sorted the names, which can swap them): train it "
                                  "again with `moe-pipeline train`")
        if not isinstance(order, list) or sorted(order) != sorted(groups):
            raise CheckpointError(path, f"{ORDER} {order!r} does not list the constellations "
                                  f"{sorted(groups)!r}")
        data["constellations"] = {name: groups[name] for name in order}
    try:
        return MoEConfig.from_dict(data)
    except (KeyError, TypeError) as err:
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
