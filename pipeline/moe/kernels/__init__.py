"""Triton kernels for the dropless token-choice path on CUDA.

Three steps, each a file:

* `routing`: router logits -> softmax -> top-k -> per-expert counts, offsets and the
  permutation, in one launch for small batches and two otherwise (no host sync: the plan
  stays on the device);
* `grouped_gemm`: the up projection as a grouped GEMM over expert segments with the token
  gather in its loads and the activation (GELU, SiLU, ReLU, or SwiGLU's ``silu(g) * u``) in
  its epilogue; the down projection with the routing weight and the unpermute in its
  epilogue; a sum over each token's K slots finishes the combine;
* `fused_experts`: the autograd Functions around them, backward in grouped GEMMs.

`MoELayer` takes this path when ``MoEConfig.kernels == "triton"`` (the default), dispatch is
dropless, the experts are standard or gated, and `applies` says the device can run it: CUDA
with triton importable, or the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is first imported: the tests). Otherwise nothing changes.

Nothing here imports triton until a forward asks for it, nor ``torch._dynamo`` (1.4 s to
import) where the kernels cannot run: a CPU-only machine without the interpreter.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.moe.dispatch import outside_graphs
from pipeline.moe.kernels.plan import Plan

if TYPE_CHECKING:  # for annotations only: both import the layer's neighbours
    from pipeline.moe.dispatch import Pool
    from pipeline.moe.experts import Experts

__all__ = ["KERNEL_EXPERT_TYPES", "Plan", "applies", "dropless", "interpreted", "route",
           "triton_importable"]

# The expert types the kernels compute (CUR's factored weights stay on the torch path).
KERNEL_EXPERT_TYPES = ("standard", "gated")


# Whether Triton interprets kernels (its own reading of the variable): read once, as Triton
# reads it when they are defined.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")
# Where the kernels can run, `torch.compile` must take the two checks below as constants;
# elsewhere they are never called under it (`applies` stops before them), and the compiler's
# decorator, which imports torch._dynamo, is left out.
_COMPILABLE = _INTERPRET or "torch._dynamo" in sys.modules or torch.cuda.is_available()


def _constant(fn: Callable[[], bool]) -> Callable[[], bool]:
    return torch.compiler.assume_constant_result(fn) if _COMPILABLE else fn


@_constant
@functools.cache
def triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("pipeline.moe.kernels.grouped_gemm")
    except (ImportError, RuntimeError, OSError):  # a triton that cannot load: the torch path
        return False
    return True


@_constant
@functools.cache
def interpreted() -> bool:
    """Whether the kernels were built by Triton's interpreter (they then run on CPU tensors)."""
    if not triton_importable():
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from pipeline.moe.kernels import grouped_gemm

    return isinstance(grouped_gemm._up_kernel, InterpretedFunction)


def applies(x: Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device: CUDA with triton, or the CPU when
    Triton interprets (see the module docstring)."""
    if x.is_cuda:
        return triton_importable() and not interpreted()
    return x.device.type == "cpu" and _INTERPRET and interpreted()


@outside_graphs
def route(logits_TE: Tensor, k: int, *, bias_E: Tensor | None = None,
          allowed_TE: Tensor | None = None,
          renormalize: bool = True) -> tuple[Tensor, Tensor, Tensor, Plan]:
    """``(probs_TE, ids_TK, w_TK, plan)``: the routing prologue, see `routing`."""
    from pipeline.moe.kernels import fused_experts

    return fused_experts.route(logits_TE, k, bias_E=bias_E, allowed_TE=allowed_TE,
                               renormalize=renormalize, interpreted=interpreted())


@outside_graphs
def dropless(x_TD: Tensor, ids_TK: Tensor, w_TK: Tensor, experts: Experts,
             plan: Plan | None = None, pool: Pool | None = None) -> tuple[Tensor, Plan]:
    """Every assignment through the kernels: ``(y_TO, plan)``.

    ``x_TD`` (T, D) in the working dtype; ``ids_TK`` (T, K) int64 and ``w_TK`` (T, K) float32
    from a token-choice gate; ``experts`` an `Experts` of a `KERNEL_EXPERT_TYPES` type;
    ``plan`` the routing prologue's, else computed from ``ids_TK``; ``pool`` a
    `pipeline.moe.dispatch.Pool` that also receives each slot's weighted output.
    """
    from pipeline.moe.kernels import fused_experts

    T, K = ids_TK.shape
    interp = interpreted()
    if plan is None:
        plan = fused_experts.plan_for(ids_TK, experts.num_experts, interp)
    dtype = x_TD.dtype
    w3 = experts.w3.to(dtype) if experts.expert_type == "gated" else None
    y_AO = fused_experts.experts(x_TD, w_TK, plan, experts.w1.to(dtype), w3,
                                 experts.w2.to(dtype), experts.activation, interp)
    if pool is not None:
        pool.add(ids_TK.reshape(-1), torch.arange(T * K, device=x_TD.device) // K, y_AO)
    # The combine: each token's K slots summed (torch accumulates bf16 sums in fp32).
    y_TO = y_AO if K == 1 else y_AO.view(T, K, -1).sum(1)
    return y_TO, plan
