"""Nothing is downloaded: the Hub's offline switches, and the config fields that need the network.

Passing ``local_files_only=True`` is not enough. transformers 5 treats some values of a
model's ``config.json`` as names of code to fetch: ``attn_implementation:
"flash_attention_2"`` without the flash-attn package (or ``"kernels-community/..."``) asks
the Hub for a compiled kernel, ``auto_map`` names modelling code of a remote repository, and
a ``quantization_config`` brings a quantiser's own loading path. Measured: a Llama directory
whose config held ``"attn_implementation": "flash_attention_2"`` made ``moe-pipeline generate
DIR`` open two CONNECTs to huggingface.co:443 before it failed with a traceback.

Two locks, then: `force_offline` sets the Hub's offline switches in this process (every HTTP
request of huggingface_hub then raises instead of connecting), and `check_local_config`
refuses, in one line naming the field, a config that would need anything but local files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# The attention implementations that are part of torch itself; anything else is a package
# that may be missing (then transformers looks for a Hub kernel) or a Hub kernel by name.
LOCAL_ATTENTION = ("eager", "sdpa")
ATTENTION_FIELDS = ("attn_implementation", "_attn_implementation")
# Fields that name code to run from elsewhere (remote modelling code, Hub kernels).
REMOTE_CODE_FIELDS = ("auto_map", "trust_remote_code", "use_kernels", "kernel_config")
# transformers' rope types (modeling_rope_utils.ROPE_INIT_FUNCTIONS, plus the plain one).
# An unknown one fails deep inside the model's constructor with a KeyError.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


class RemoteConfigError(PipelineError):
    """A model config that asks for something only the network (or other code) provides.

    Attributes:
        path: the config file.
        field: the offending field.
    """

    def __init__(self, path: Path, field: str, message: str) -> None:
        self.path, self.field = path, field
        super().__init__(f"{path}: {field}: {message}")


def force_offline() -> None:
    """Switch the Hugging Face libraries to offline mode in this process.

    The variables are read by huggingface_hub once, when it is imported; if something
    imported it earlier, its module constant (which `is_offline_mode` returns, and which
    transformers asks before every download) is set too.
    """
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    # A module typed as a plain ModuleType: its constants are not known to the checker.
    constants: Any = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def check_local_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse a transformers ``config.json`` (already parsed) that needs the network."""
    for field in ATTENTION_FIELDS:
        value = config.get(field)
        if value is not None and value not in LOCAL_ATTENTION:
            raise RemoteConfigError(path, field, f"{value!r} is not available offline: use "
                                    f"one of {', '.join(map(repr, LOCAL_ATTENTION))} (or remove "
                                    "the field)")
    for field in REMOTE_CODE_FIELDS:
        if config.get(field):
            raise RemoteConfigError(path, field, "names code from outside this installation "
                                    "(remote modelling code or Hub kernels), which is never "
                                    "fetched or run: remove the field")
    if config.get("quantization_config") is not None:
        raise RemoteConfigError(path, "quantization_config", "a quantized model (bitsandbytes, "
                                "GPTQ...): only unquantized safetensors weights are read")
    for field in ("rope_scaling", "rope_parameters"):
        _check_rope(path, field, config.get(field))


def _check_rope(path: Path, field: str, rope: Any) -> None:
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise RemoteConfigError(path, field, f"expected an object, got {type(rope).__name__}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise RemoteConfigError(path, f"{field}.rope_type", f"{str(kind)[:40]!r} is not a "
                                f"known rope type ({', '.join(ROPE_TYPES)})")
