"""Experts: E feed-forward blocks of one type, their weights stacked in single tensors.

Legend: E experts, C capacity, N sorted assignments, I input dim, H hidden dim, O output dim,
R the CUR rank.

Each expert type writes its maths once, in `ffn`, against a ``lin(h, w, act)`` callback that
applies the stacked weight ``w`` group-wise; the dispatch layout decides which callback
(padded ``bmm``, CUDA grouped GEMM, or the CPU's per-group split; see `grouped_mm`).

* standard: ``w2 · act(w1 · x)``
* gated (SwiGLU, Llama's MLP): ``w2 · (silu(w1 · x) * (w3 · x))``
* cur: the standard block with every matrix factored as ``C · U · R`` of rank R, the
  CUR decomposition (Mahoney & Drineas, PNAS 2009): C holds columns and R rows of the dense
  matrix, so a converted dense expert keeps real weights; `cur_decompose` does that split.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.moe.cpu import ExpertSlices, release_packed
from pipeline.moe.grouped_mm import activation_fn, grouped_linear_cuda, padded_linear

Linear = Callable[[Tensor, Tensor, "str | None"], Tensor]


def _uniform(shape: tuple[int, ...], fan_in: int, dtype: torch.dtype) -> nn.Parameter:
    # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape, dtype=dtype).uniform_(-bound, bound))


def _cur_factors(E: int, fan_in: int, fan_out: int, rank: int,
                 dtype: torch.dtype) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """R ``(E, rank, in)``, U ``(E, rank, rank)`` = identity, C ``(E, out, rank)``."""
    identity = torch.eye(rank, dtype=dtype).repeat(E, 1, 1)
    return (_uniform((E, rank, fan_in), fan_in, dtype), nn.Parameter(identity),
            _uniform((E, fan_out, rank), rank, dtype))


def cur_decompose(w_OI: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split a dense matrix into ``C (O, R)``, ``U (R, R)``, ``R (R, I)`` with ``W ≈ C U R``.

    Columns and rows are picked by their squared norms (the deterministic form of the
    length-squared sampling of Drineas, Kannan & Mahoney 2006); ``U = C⁺ W R⁺`` is the
    least-squares core. Exact when ``rank`` reaches the rank of ``W``. Computed in float64.
    """
    w = w_OI.detach().double()
    cols = torch.topk(w.pow(2).sum(0), rank).indices.sort().values
    rows = torch.topk(w.pow(2).sum(1), rank).indices.sort().values
    c, r = w[:, cols], w[rows, :]
    u = torch.linalg.pinv(c) @ w @ torch.linalg.pinv(r)
    return c.to(w_OI.dtype), u.to(w_OI.dtype), r.to(w_OI.dtype)


class Experts(nn.Module):
    """E experts of one type; call `forward_padded` or `forward_sorted`."""

    def __init__(self, num_experts: int, input_dim: int, hidden_dim: int, output_dim: int,
                 expert_type: str = "standard", activation: str = "gelu", dropout: float = 0.0,
                 cur_rank: int = 64, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_experts, self.expert_type = num_experts, expert_type
        self.input_dim, self.hidden_dim, self.output_dim = input_dim, hidden_dim, output_dim
        self.activation = "silu" if expert_type == "gated" else activation
        self.dropout = dropout
        E, I, H, O = num_experts, input_dim, hidden_dim, output_dim
        if expert_type == "cur":
            R = cur_rank
            self.w1_r, self.w1_u, self.w1_c = _cur_factors(E, I, H, R, dtype)
            self.w2_r, self.w2_u, self.w2_c = _cur_factors(E, H, O, R, dtype)
        else:
            self.w1 = _uniform((E, H, I), I, dtype)
            self.w2 = _uniform((E, O, H), H, dtype)
            if expert_type == "gated":
                self.w3 = _uniform((E, H, I), I, dtype)

    def train(self, mode: bool = True) -> Experts:
        """Also drops the CPU's packed bf16 weights (`packed_weights`): switching to eval
        after editing weights through ``.data`` (which no version counter sees) repacks."""
        release_packed(self.parameters())
        return super().train(mode)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def ffn(self, x: Tensor, lin: Linear, mul: Callable[[Tensor, Tensor], Tensor] = torch.mul,
            ) -> Tensor:
        """The expert maths on rows ``x`` with ``lin`` doing the grouped products (and ``mul``
        the gated product, which the CPU's split path does in place)."""
        if self.expert_type == "standard":
            h = lin(x, self.w1, self.activation)
        elif self.expert_type == "gated":
            h = mul(lin(x, self.w1, "silu"), lin(x, self.w3, None))
        else:
            h = lin(lin(lin(x, self.w1_r, None), self.w1_u, None), self.w1_c, self.activation)
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        if self.expert_type == "cur":
            return lin(lin(lin(h, self.w2_r, None), self.w2_u, None), self.w2_c, None)
        return lin(h, self.w2, None)

    def forward_padded(self, x_ECI: Tensor) -> Tensor:
        """Every expert on its own slab of a padded buffer: ``(E, C, I) -> (E, C, O)``."""
        return self.ffn(x_ECI, lambda h, w, act: activation_fn(act, padded_linear(h, w)))

    def forward_sorted(self, x_NI: Tensor, counts_E: Tensor) -> Tensor:
        """Rows sorted by expert, ``counts_E[e]`` of them for expert e: ``(N, I) -> (N, O)``.

        CUDA only (see `grouped_mm.grouped_mm_supported`): one grouped GEMM per weight, the
        group ends kept on the device (no sync).
        """
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return self.ffn(x_NI, lambda h, w, act: activation_fn(
            act, grouped_linear_cuda(h, w.to(h.dtype), offsets_E)))

    def forward_blocks(self, x_BbI: Tensor, block_expert_B: Tensor) -> Tensor:
        """Blocks of rows, each block all of one expert: ``(NB, b, I) -> (NB, b, O)``.

        Each product gathers one weight copy per block, then one ``bmm``: static shapes,
        no sync, at the price of that copy (the CUDA fallback where grouped GEMM is not).
        """
        return self.ffn(x_BbI, lambda h, w, act: activation_fn(act, torch.bmm(
            h, w.index_select(0, block_expert_B).transpose(1, 2).to(h.dtype))))

    def forward_one(self, expert: int, rows: Tensor, slices: ExpertSlices) -> Tensor:
        """Expert ``expert`` alone on its rows ``(n, I) -> (n, O)``: the CPU's split path."""
        return self.ffn(rows, lambda h, w, act: slices.linear(h, w, expert, act), slices.mul)
