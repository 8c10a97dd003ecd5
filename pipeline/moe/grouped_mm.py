"""Grouped matrix products: the ways a stack of E experts multiplies the tokens routed to it.

Legend: E experts, C capacity (tokens per expert, padded), N routed assignments (sorted by
expert), I a layer's input width, O its output width.

Weights are stored linear-style, ``w_EOI`` (out, in), as `torch.nn.Linear` and
torchtitan's grouped experts do, so one stacked tensor serves all three paths:

* padded (`padded_linear`): ``x_ECI @ w_EOI^T`` as one ``bmm``. Static shapes, so it compiles
  with ``fullgraph=True`` and replays in CUDA graphs. Used by the fixed-capacity dispatch,
  expert choice and soft MoE.
* grouped on CUDA (`grouped_linear_cuda`): ``torch._grouped_mm`` with the group ends given as
  a device tensor of offsets, so the host never learns the group sizes and never waits
  (bf16 on Hopper and newer; elsewhere dispatch pads groups to blocks instead).
* split on CPU (`cpu.ExpertSlices`): the CPU has no device to wait for, so group sizes come to
  the host and each group is one GEMM. On x86 it calls oneDNN's linear kernel (the one inductor
  uses for frozen CPU graphs): measured here on an AMD EPYC (Zen 5), fp32 oneDNN ran at
  390-450 GFLOP/s on these shapes where ``torch.mm`` (MKL, which takes its AVX2 path on AMD)
  ran at 150-200. ``torch._grouped_mm`` exists on CPU but ran at 68 GFLOP/s. On Intel CPUs,
  where MKL takes its AVX-512 path, large fp32 products go to MKL instead (`cpu.mkl_preferred`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def activation_fn(name: str | None, x: Tensor) -> Tensor:
    """Apply the named activation (``None`` is the identity)."""
    if name is None:
        return x
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"activation={name!r} is unknown")


def activation_(name: str | None, x: Tensor) -> Tensor:
    """`activation_fn` in place, for outputs no autograd graph will read again."""
    if name in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_(x, approximate="tanh" if name == "gelu_tanh" else "none")
    if name == "relu":
        return x.relu_()
    if name == "silu":
        return F.silu(x, inplace=True)
    return activation_fn(name, x)


def padded_linear(x_ECI: Tensor, w_EOI: Tensor) -> Tensor:
    """Per-expert linear on a padded buffer: ``(E, C, I) x (E, O, I) -> (E, C, O)``."""
    return torch.bmm(x_ECI, w_EOI.transpose(1, 2))


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_mm_supported(x: Tensor, dims: tuple[int, ...]) -> bool:
    """Whether ``torch._grouped_mm`` runs natively, without its syncing fallback.

    Native kernels exist for bf16 on Hopper (sm90) and newer with 16-byte aligned rows;
    for other dtypes or GPUs torch falls back to a loop that reads the offsets on the host.
    """
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
            and _capability(x.device.index or 0) >= (9, 0) and all(d % 8 == 0 for d in dims))


def grouped_linear_cuda(x_NI: Tensor, w_EOI: Tensor, offsets_E: Tensor) -> Tensor:
    """Grouped linear on CUDA: rows ``offsets[e-1]:offsets[e]`` of ``x`` go through expert e.

    ``offsets_E`` is int32, cumulative, on the device; nothing is read back to the host.
    """
    return torch._grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offsets_E)
