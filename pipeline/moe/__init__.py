"""The mixture-of-experts model: pure torch, no I/O."""

from pipeline.moe.experts import Experts, cur_decompose
from pipeline.moe.gating import ExpertChoice, SoftRouting, TokenChoice, build_gate
from pipeline.moe.layer import MoEAux, MoELayer

__all__ = ["ExpertChoice", "Experts", "MoEAux", "MoELayer", "SoftRouting", "TokenChoice",
           "build_gate", "cur_decompose"]
