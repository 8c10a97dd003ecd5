"""Saving and loading models: weights as safetensors, the config as JSON, side by side.

A checkpoint is a directory holding ``model.safetensors`` and ``config.json``. Loading into
a model whose config differs is refused with an error naming the first differing fields,
since silently loading mismatched weights (or a different routing scheme) is how
experiments go quietly wrong.

Reading a config never trusts it: the file is read up to `MAX_CONFIG_BYTES`, and anything
that is not a saved config (not UTF-8, not JSON, nested past any real config, fields of the
wrong type or size) is a `CheckpointError` naming the file and the field, so that one bad
directory is one line, never a traceback. `read_config` also counts the parameters the config
describes and refuses it over ``max_params`` before anything is built (`budget`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import ConfigError, PipelineError
from pipeline.moe import budget
from pipeline.moe.config import MoEConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ORDER = "constellation_order"
# A saved config is a few kilobytes (descriptions included); a larger file is something else.
MAX_CONFIG_BYTES = 1 << 20


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


class JsonFileError(PipelineError):
    """A JSON file (a config) that cannot be read; names the file.

    Attributes:
        file: the file.
        reason: what is wrong, without the file's name.
    """

    def __init__(self, file: Path, reason: str) -> None:
        self.file, self.reason = file, reason
        super().__init__(f"{file}: {reason}")


def read_json(file: Path, limit: int = MAX_CONFIG_BYTES, what: str = "a config") -> Any:
    """The JSON value of ``file``, read up to ``limit`` bytes; every failure (missing, too
    large, not UTF-8, not JSON, nested past the parser's depth) a `JsonFileError` whose
    reason calls the file ``what`` it is not."""
    try:
        with file.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as err:
        raise JsonFileError(file, f"unreadable: {err.strerror}") from err
    if len(raw) > limit:
        raise JsonFileError(file, f"over {limit:,} bytes: not {what}")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise JsonFileError(file, f"not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise JsonFileError(file, f"not JSON: {err}") from err
    except RecursionError as err:  # the json module's answer to nesting past ~1000 levels
        raise JsonFileError(file, f"nested too deeply to be {what}") from err


def read_record(path: str | Path) -> dict[str, Any]:
    """The whole of a checkpoint's config.json."""
    path = Path(path)
    if not (path / CONFIG).exists():
        raise CheckpointError(path, f"no {CONFIG} (is this a checkpoint directory?)")
    try:
        record = read_json(path / CONFIG)
    except JsonFileError as err:
        raise CheckpointError(path, f"{CONFIG} is {err.reason}") from err
    if not isinstance(record, dict):
        raise CheckpointError(path, f"{CONFIG} holds a JSON {type(record).__name__}, not a "
                              "saved config (an object with a 'config' object)", ("config",))
    if not isinstance(record.get("config"), dict):
        raise CheckpointError(path, f"{CONFIG}: field 'config' is "
                              f"{type(record.get('config')).__name__}, not an object "
                              "(is this a checkpoint of this pipeline?)", ("config",))
    return record


def read_config(path: str | Path,
                max_params: int | None = budget.DEFAULT_MAX_PARAMS) -> MoEConfig:
    """The config a checkpoint was saved with, its constellations in their saved order,
    refused if the model it describes has more than ``max_params`` parameters (None: not
    counted, for a model already built)."""
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
        if not isinstance(order, list) or not all(isinstance(n, str) for n in order) or \
                sorted(order) != sorted(groups):
            raise CheckpointError(path, f"{CONFIG}: {ORDER} {str(order)[:200]} does not list the "
                                  f"constellations {sorted(groups)!r}", (ORDER,))
        data["constellations"] = {name: groups[name] for name in order}
    try:
        config = MoEConfig.from_dict(data)
    except ConfigError as err:
        raise CheckpointError(path, f"{CONFIG}: {_short(str(err))}", (err.field,)) from err
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(path, f"{CONFIG} is not a saved config: {_short(str(err))}") \
            from err
    if max_params is not None:
        budget.check_moe(path / CONFIG, config, max_params)
    return config


def _short(text: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters (a bad value may be a huge JSON value)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load(model: nn.Module, config: MoEConfig, path: str | Path) -> None:
    """Load the weights at ``path`` into ``model``, whose config must equal the saved one."""
    path = Path(path)
    saved = read_config(path, max_params=None).to_dict()  # the model exists: no count
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
