"""The mixture-of-experts model: pure torch, no I/O.

Its names resolve on first use, so that reading a config (`pipeline.moe.config`, which needs
no torch) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Experts": "pipeline.moe.experts",
    "cur_decompose": "pipeline.moe.experts",
    "ExpertChoice": "pipeline.moe.gating",
    "SoftRouting": "pipeline.moe.gating",
    "TokenChoice": "pipeline.moe.gating",
    "build_gate": "pipeline.moe.gating",
    "MoEAux": "pipeline.moe.layer",
    "MoELayer": "pipeline.moe.layer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.moe' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
