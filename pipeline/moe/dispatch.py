"""Dispatch: move tokens to their experts, run the experts in batched kernels, combine.

Inputs arrive in the experts' working dtype (the layer casts once); outputs keep it.

Legend: T tokens, D input dim, O output dim, E experts, K experts per token, A = K*T
assignments, C capacity (slots per expert), B sequences, N tokens per sequence, S soft slots.

Assignments are flattened k-major (``a = k * T + t``): a stable sort by expert then keeps
every token's first choice ahead of anyone's second choice, so when capacity runs short the
dropped assignments are the least preferred ones (GShard's priority, arXiv:2006.16668).

Nothing here reads a tensor's value on the host except `dropless` on the CPU (see
`_dropless_split`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NamedTuple, ParamSpec, TypeVar

import torch
from torch import Tensor

from pipeline.moe.cpu import ExpertSlices, cpu_lanes, largest_first, packable, run_in_lanes
from pipeline.moe.experts import Experts
from pipeline.moe.gating import ExpertChoice, SoftRouting, TokenChoice, capacity
from pipeline.moe.grouped_mm import grouped_mm_supported

P = ParamSpec("P")
R = TypeVar("R")


class Pool(NamedTuple):
    """Where to also sum each input's weighted expert outputs, expert by expert.

    ``input_T`` (T,) int64 names each token's input (its row of the batch); ``out_EBO``
    (E, B, O) starts at zero and receives, in place, ``sum_t w[t, e] * expert_e(x_t)`` over
    the tokens of each input: the raw material of draft reports.
    """

    input_T: Tensor
    out_EBO: Tensor

    def add(self, ids_A: Tensor, tokens_A: Tensor, weighted_AO: Tensor) -> None:
        E, B, O = self.out_EBO.shape
        self.out_EBO.view(E * B, O).index_add_(0, ids_A * B + self.input_T[tokens_A],
                                                weighted_AO.to(self.out_EBO.dtype))


def _flatten(routing: TokenChoice) -> tuple[Tensor, Tensor]:
    """k-major flat expert ids and weights: ``(A,)`` each."""
    return routing.expert_ids.t().reshape(-1), routing.weights.t().reshape(-1)


def _combine(y_AO: Tensor, ids_A: Tensor, w_A: Tensor, num_tokens: int,
             pool: Pool | None) -> Tensor:
    """Weighted sum of each token's K expert outputs: ``(A, O) -> (T, O)``."""
    y_AO = y_AO * w_A.to(y_AO.dtype).unsqueeze(-1)
    if pool is not None:
        pool.add(ids_A, torch.arange(ids_A.numel(), device=ids_A.device) % num_tokens, y_AO)
    return y_AO.view(-1, num_tokens, y_AO.shape[-1]).sum(0)


def dropless(x_TD: Tensor, routing: TokenChoice, experts: Experts,
             counts_E: Tensor, pool: Pool | None = None) -> Tensor:
    """Every assignment runs. On CUDA: sort by expert, grouped products, unsort, combine.

    The grouped products are ``torch._grouped_mm`` where it runs natively (bf16, Hopper and
    newer) and `_blocked` otherwise; neither reads anything back to the host. On the CPU
    see `_dropless_split`. (`MoELayer` sends standard and gated experts on CUDA to the Triton
    kernels of `pipeline.moe.kernels` instead, unless ``config.kernels == "torch"``: this is
    their readable reference.)
    """
    if not x_TD.is_cuda:
        return _dropless_split(x_TD, routing, experts, counts_E, pool)
    T = x_TD.shape[0]
    ids_A, w_A = _flatten(routing)
    order_A = torch.argsort(ids_A, stable=True)
    x_sorted = x_TD.index_select(0, order_A.remainder(T))
    counts_E = counts_E.to(torch.int64)
    dims = (experts.input_dim, experts.hidden_dim, experts.output_dim)
    if grouped_mm_supported(x_sorted, dims):
        y_sorted = experts.forward_sorted(x_sorted, counts_E)
    else:
        y_sorted = _blocked(x_sorted, ids_A.index_select(0, order_A), counts_E, experts)
    y_AO = torch.empty_like(y_sorted).index_copy(0, order_A, y_sorted)
    return _combine(y_AO, ids_A, w_A, T, pool)


def _blocked(x_NI: Tensor, ids_N: Tensor, counts_E: Tensor, experts: Experts,
             block: int = 128) -> Tensor:
    """Grouped products without grouped GEMM and without a sync: ``(N, I) -> (N, O)``.

    Rows (sorted by expert, ``ids_N``) move into a buffer where each expert's group starts
    on a multiple of ``block``; the buffer's size, ``N + E * (block - 1)`` rounded up, is
    known without looking at the counts. Every block then belongs to one expert.
    """
    N, I = x_NI.shape
    E = experts.num_experts
    padded_E = (counts_E + block - 1) // block * block
    start_E = torch.cumsum(padded_E, 0) - padded_E
    first_E = torch.cumsum(counts_E, 0) - counts_E
    rows_N = start_E[ids_N] + torch.arange(N, device=x_NI.device) - first_E[ids_N]
    R = -(-(N + E * (block - 1)) // block) * block
    x_RI = x_NI.new_zeros(R, I).index_copy(0, rows_N, x_NI)
    block_start = torch.arange(0, R, block, device=x_NI.device)
    owner = torch.searchsorted(start_E + padded_E, block_start, right=True).clamp_max(E - 1)
    y_RO = experts.forward_blocks(x_RI.view(R // block, block, I), owner)
    return y_RO.reshape(R, -1).index_select(0, rows_N)


def outside_graphs(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run eagerly even inside a `torch.compile`d caller, as `torch.compiler.disable`
    makes it, without importing the compiler to say so: `torch.compiler.disable` at import
    time loads ``torch._dynamo`` (1.4 s on this project's 2-core machine, paid by every
    process that loads a model, most of which never compile). The disabled twin is made the
    first time a compiled caller traces the call (Dynamo then graph-breaks around it, as it
    would around the decorated function); eager calls go straight to ``fn``."""
    twin: list[Callable[P, R]] = []

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        # Once the compiler is loaded, even an eager call goes through the twin: Dynamo may
        # have skipped this frame and run it eagerly with its hook still on, which would
        # otherwise trace ``fn``.
        if torch.compiler.is_compiling() or "torch._dynamo" in sys.modules:
            if not twin:
                twin.append(torch.compiler.disable(fn))
            return twin[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return call


# Eager even under torch.compile: it reads group sizes on the host (a graph break anyway),
# and inductor cannot lower the oneDNN linear op it calls.
@outside_graphs
def _dropless_split(x_TD: Tensor, routing: TokenChoice, experts: Experts,
                    counts_E: Tensor, pool: Pool | None) -> Tensor:
    """The CPU's dropless path: group sizes on the host, one GEMM chain per expert.

    Each expert gathers its rows, runs, and adds its weighted output into ``y`` in place.
    Measured here (fp32, 2 cores): working expert by expert keeps every temporary at one
    expert's size, which the allocator recycles; the sort-everything layout of the CUDA
    path allocates several (K*T, D) buffers per call, and at 8,192 tokens their page faults
    cost about a fifth of the forward. Without autograd the temporaries are overwritten in
    place (`ExpertSlices`), and experts run in one-thread lanes side by side (`cpu_lanes`),
    their outputs then added in expert order, as one lane would.
    """
    T = x_TD.shape[0]
    ids_A, w_A = _flatten(routing)
    order_A = torch.argsort(ids_A, stable=True)
    # The one host sync of dropless dispatch: the CPU has no device to wait for.
    sizes = counts_E.to(torch.int64).tolist()
    inplace = not (torch.is_grad_enabled() and (
        x_TD.requires_grad or any(p.requires_grad for p in experts.parameters())))
    # Packing pays once per weight version: serving (eval), not a training loop's no-grad
    # evaluation between two steps.
    slices = ExpertSlices(inplace, packed=not experts.training and packable(x_TD.dtype))
    tokens_A = order_A.remainder(T).split(sizes)
    weights_A = w_A.index_select(0, order_A).to(x_TD.dtype).unsqueeze(-1).split(sizes)

    def expert(e: int) -> Tensor:
        """Expert e on its rows, weighted: ``(n_e, O)``."""
        out = experts.forward_one(e, x_TD.index_select(0, tokens_A[e]), slices)
        return slices.mul(out, weights_A[e])

    y_TO = x_TD.new_zeros(T, experts.output_dim)

    def add(e: int, weighted: Tensor) -> None:
        y_TO.index_add_(0, tokens_A[e], weighted)
        if pool is not None:
            pool.out_EBO[e].index_add_(0, pool.input_T[tokens_A[e]],
                                       weighted.to(pool.out_EBO.dtype))

    # Lanes run without autograd, so not while the router's weights want a gradient (frozen
    # experts, trained router); and not under training dropout, whose draws from the one
    # generator would come in whatever order the lanes ran.
    lanes = 1
    if (slices.inplace and not (torch.is_grad_enabled() and w_A.requires_grad)
            and not (experts.training and experts.dropout)):
        lanes = cpu_lanes(x_TD.dtype, sizes)
    if lanes < 2:
        for e in range(len(sizes)):
            if sizes[e]:
                add(e, expert(e))
        return y_TO
    slices.prefetch(experts.parameters(), x_TD.dtype)
    done = run_in_lanes(largest_first(sizes), expert, lanes)
    # Added in expert order whichever lane ran them: the same sums, bit for bit, as above.
    for e in sorted(done):
        add(e, done.pop(e))
    return y_TO


def fixed_capacity(x_TD: Tensor, routing: TokenChoice, experts: Experts,
                   capacity_factor: float, pool: Pool | None = None) -> tuple[Tensor, Tensor]:
    """Static-shape dispatch through an ``(E, C, D)`` buffer; returns (y_TO, dropped).

    Assignments past an expert's C slots are dropped (their contribution is zero) and
    counted in ``dropped``, a 0-dim int64 tensor. Every shape depends only on T, K, E and
    the capacity factor, so this compiles with ``fullgraph=True``.
    """
    T, D = x_TD.shape
    E, K = experts.num_experts, routing.expert_ids.shape[1]
    C = capacity(T, K, E, capacity_factor)
    ids_A, w_A = _flatten(routing)
    # Position of each assignment among those of its expert, in priority order.
    # A comparison, not F.one_hot: on CUDA one_hot checks its input's range on the host.
    onehot_AE = (ids_A.unsqueeze(1) == torch.arange(E, device=ids_A.device)).to(torch.int32)
    pos_A = (torch.cumsum(onehot_AE, 0) * onehot_AE).sum(-1) - 1
    kept_A = pos_A < C
    # Slot E*C is a trash row: dropped assignments write there and read zeros back.
    slot_A = torch.where(kept_A, ids_A * C + pos_A, E * C)
    token_of_slot = torch.full((E * C + 1,), T, dtype=torch.int64, device=x_TD.device)
    token_of_slot.scatter_(0, slot_A, torch.arange(ids_A.numel(), device=x_TD.device) % T)
    x_pad = torch.cat([x_TD, x_TD.new_zeros(1, D)])  # row T is the zero row
    x_ECD = x_pad.index_select(0, token_of_slot[: E * C]).view(E, C, D)
    y_ECO = experts.forward_padded(x_ECD)
    y_pad = torch.cat([y_ECO.reshape(E * C, -1), y_ECO.new_zeros(1, y_ECO.shape[-1])])
    y_AO = y_pad.index_select(0, slot_A)
    return _combine(y_AO, ids_A, w_A, T, pool), (~kept_A).sum()


def expert_choice(x_TD: Tensor, routing: ExpertChoice, experts: Experts) -> Tensor:
    """Each expert runs on the C tokens it chose; outputs scatter-add back weighted."""
    tok_EC, w_EC = routing.token_ids, routing.weights
    E, C = tok_EC.shape
    x_ECD = x_TD.index_select(0, tok_EC.reshape(-1)).view(E, C, -1)
    y_ECO = experts.forward_padded(x_ECD)
    y_ECO = y_ECO * w_EC.to(y_ECO.dtype).unsqueeze(-1)
    y_TO = y_ECO.new_zeros(x_TD.shape[0], y_ECO.shape[-1])
    return y_TO.index_add(0, tok_EC.reshape(-1), y_ECO.reshape(E * C, -1))


def soft(x_BND: Tensor, routing: SoftRouting, experts: Experts) -> Tensor:
    """Soft MoE: slots are convex mixes of tokens; expert e owns slots ``e*s .. e*s+s-1``."""
    B = x_BND.shape[0]
    E = experts.num_experts
    dispatch = routing.dispatch.to(x_BND.dtype)
    slots_BSD = torch.einsum("bns,bnd->bsd", dispatch, x_BND)
    per_expert = slots_BSD.shape[1] // E
    # (B, E*s, D) -> (E, B*s, D): each expert sees its s slots of every sequence.
    x_EMD = slots_BSD.view(B, E, per_expert, -1).transpose(0, 1).reshape(E, B * per_expert, -1)
    y_EMO = experts.forward_padded(x_EMD)
    y_BSO = y_EMO.view(E, B, per_expert, -1).transpose(0, 1).reshape(B, E * per_expert, -1)
    return torch.einsum("bns,bso->bno", routing.combine.to(y_BSO.dtype), y_BSO)
