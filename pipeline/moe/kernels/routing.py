"""The routing prologue: router logits -> top-k -> per-expert counts and offsets -> permutation.

Legend: T tokens, E experts (E_P the next power of two), K experts per token (K_P likewise),
A = T*K assignment slots numbered token-major (slot ``a = t*K + k``), N = A rows sorted by
expert, NB token blocks of BLOCK_T tokens.

What the torch path does in about ten launches (softmax, top-k, gather, renormalise, a count,
a stable argsort, two index ops) runs here as:

* one kernel when the tokens fit in ``_ONE_KERNEL_BLOCKS`` blocks (decode and small batches):
  a single program walks the blocks twice, first choosing the experts and counting them, then,
  the counts known, placing every assignment in its expert's segment;
* two kernels otherwise: every block chooses and counts its own tokens (a per-block histogram),
  then every block sums the histograms of the blocks before it and places its assignments.
  The offsets need every token's choice before any can be placed, so no single-pass kernel over
  many programs exists without a grid-wide barrier.

Placement is deterministic: within an expert, rows follow the block, then k, then the token.
(The order does not change the result: each row is its own dot product, and the combine reads
rows back by slot.)

The maths is `pipeline.moe.gating.TopKGate`'s: a softmax over the logits (forbidden experts at
-inf), the top k of ``probs + bias`` among the allowed experts (the bias steers the choice,
never the weights), weights the chosen probabilities, renormalised to sum to 1 unless
``renormalize=False`` (switch routing). Ties go to the lowest expert index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pipeline.moe.kernels.plan import Plan

# At or below this many token blocks one program does the whole prologue (one launch).
_ONE_KERNEL_BLOCKS = 2


@triton.jit
def _choose_block(b, logits_ptr, bias_ptr, allowed_ptr, probs_ptr, ids_ptr, w_ptr, T,
                  E: tl.constexpr, E_P: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr,
                  BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALLOWED: tl.constexpr,
                  RENORM: tl.constexpr, FROM_IDS: tl.constexpr):
    """Top-k of block ``b`` (or its given ids), stored; returns its histogram ``(E_P,)``."""
    rows = b * BLOCK_T + tl.arange(0, BLOCK_T)
    live = rows < T
    cols = tl.arange(0, E_P)
    hist = tl.zeros((E_P,), dtype=tl.int32)
    if FROM_IDS:
        for j in tl.static_range(K):
            idx = tl.load(ids_ptr + rows * K + j, mask=live, other=E_P).to(tl.int32)
            hist += tl.sum((cols[None, :] == idx[:, None]).to(tl.int32), 0)
    else:
        off = rows[:, None] * E + cols[None, :]
        inside = live[:, None] & (cols[None, :] < E)
        # Rows past T read zeros, so no row is all -inf (a NaN softmax); none is stored.
        logits = tl.load(logits_ptr + off, mask=inside, other=0.0).to(tl.float32)
        ok = tl.broadcast_to(cols[None, :] < E, (BLOCK_T, E_P))
        if HAS_ALLOWED:
            ok = ok & (tl.load(allowed_ptr + off, mask=inside, other=1) != 0)
        logits = tl.where(ok, logits, float("-inf"))
        p = tl.exp(logits - tl.max(logits, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]
        tl.store(probs_ptr + off, p, mask=inside)
        score = p
        if HAS_BIAS:
            score = score + tl.load(bias_ptr + cols, mask=cols < E, other=0.0)[None, :]
        # A NaN score (NaN logits) counts as -inf, so each pick is a real expert not yet
        # taken: past the allowed ones (or on a NaN row) the lowest such column. The
        # token's weights are then NaN, as on the torch path, and its plan stays whole.
        score = tl.where(ok & (score == score), score, float("-inf"))
        taken = tl.broadcast_to(cols[None, :] >= E, (BLOCK_T, E_P))
        kcols = tl.arange(0, K_P)
        ids = tl.zeros((BLOCK_T, K_P), dtype=tl.int32)
        w = tl.zeros((BLOCK_T, K_P), dtype=tl.float32)
        for j in tl.static_range(K):
            best = tl.max(tl.where(taken, float("-inf"), score), 1)
            idx = tl.min(tl.where(~taken & (score == best[:, None]), cols[None, :], E_P), 1)
            hit = cols[None, :] == idx[:, None]
            ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
            w = tl.where(kcols[None, :] == j, tl.sum(tl.where(hit, p, 0.0), 1)[:, None], w)
            hist += tl.sum((hit & live[:, None]).to(tl.int32), 0)
            taken = taken | hit
        if RENORM:
            w = w / tl.sum(w, 1)[:, None]
        kept = live[:, None] & (kcols[None, :] < K)
        tl.store(ids_ptr + rows[:, None] * K + kcols[None, :], ids.to(tl.int64), mask=kept)
        tl.store(w_ptr + rows[:, None] * K + kcols[None, :], w, mask=kept)
    return hist


@triton.jit
def _place_block(b, base, ids_ptr, slot_row_ptr, row_slot_ptr, T, E_P: tl.constexpr,
                 K: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows of block ``b``'s assignments, from each expert's next free row ``base`` ``(E_P,)``;
    returns ``base`` moved past them."""
    rows = b * BLOCK_T + tl.arange(0, BLOCK_T)
    live = rows < T
    cols = tl.arange(0, E_P)
    for j in tl.static_range(K):
        idx = tl.load(ids_ptr + rows * K + j, mask=live, other=E_P).to(tl.int32)
        hit = (cols[None, :] == idx[:, None]).to(tl.int32)  # rows past T hit nothing
        rank = tl.cumsum(hit, 0)  # 1 for a block's first assignment to an expert, 2 ...
        row = tl.sum(hit * (base[None, :] + rank - 1), 1)
        slot = rows * K + j
        tl.store(slot_row_ptr + slot, row, mask=live)
        tl.store(row_slot_ptr + row, slot, mask=live)
        base += tl.sum(hit, 0)
    return base


@triton.jit
def _route_one_kernel(logits_ptr, bias_ptr, allowed_ptr, probs_ptr, ids_ptr, w_ptr,
                      counts_ptr, offsets_ptr, slot_row_ptr, row_slot_ptr, T,
                      E: tl.constexpr, E_P: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr,
                      BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_ALLOWED: tl.constexpr, RENORM: tl.constexpr,
                      FROM_IDS: tl.constexpr):
    """The whole prologue in one program: choose and count, then place."""
    blocks = tl.cdiv(T, BLOCK_T)
    counts = tl.zeros((E_P,), dtype=tl.int32)
    for b in range(0, blocks):
        counts += _choose_block(b, logits_ptr, bias_ptr, allowed_ptr, probs_ptr, ids_ptr,
                                w_ptr, T, E, E_P, K, K_P, BLOCK_T, HAS_BIAS, HAS_ALLOWED,
                                RENORM, FROM_IDS)
    tl.debug_barrier()  # the ids stored above are read back by other threads below
    cols = tl.arange(0, E_P)
    ends = tl.cumsum(counts, 0)
    tl.store(counts_ptr + cols, counts, mask=cols < E)
    tl.store(offsets_ptr + cols, ends, mask=cols < E)
    base = ends - counts
    for b in range(0, blocks):
        base = _place_block(b, base, ids_ptr, slot_row_ptr, row_slot_ptr, T, E_P, K, BLOCK_T)


@triton.jit
def _route_choose_kernel(logits_ptr, bias_ptr, allowed_ptr, probs_ptr, ids_ptr, w_ptr,
                         hist_ptr, T, E: tl.constexpr, E_P: tl.constexpr, K: tl.constexpr,
                         K_P: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_ALLOWED: tl.constexpr, RENORM: tl.constexpr,
                         FROM_IDS: tl.constexpr):
    """Launch 1 of 2: each program chooses for its block and stores its histogram."""
    b = tl.program_id(0)
    hist = _choose_block(b, logits_ptr, bias_ptr, allowed_ptr, probs_ptr, ids_ptr, w_ptr, T,
                         E, E_P, K, K_P, BLOCK_T, HAS_BIAS, HAS_ALLOWED, RENORM, FROM_IDS)
    tl.store(hist_ptr + b * E_P + tl.arange(0, E_P), hist)


@triton.jit
def _route_place_kernel(ids_ptr, hist_ptr, prefix_ptr, counts_ptr, offsets_ptr, slot_row_ptr,
                        row_slot_ptr, T, NB, E: tl.constexpr, E_P: tl.constexpr,
                        K: tl.constexpr, BLOCK_T: tl.constexpr):
    """Launch 2 of 2 (after a cumsum of the histograms over blocks, ``prefix``): each program
    places its block from the totals and the blocks before it."""
    b = tl.program_id(0)
    cols = tl.arange(0, E_P)
    total = tl.load(prefix_ptr + (NB - 1) * E_P + cols)
    before = tl.load(prefix_ptr + b * E_P + cols) - tl.load(hist_ptr + b * E_P + cols)
    ends = tl.cumsum(total, 0)
    if b == 0:
        tl.store(counts_ptr + cols, total, mask=cols < E)
        tl.store(offsets_ptr + cols, ends, mask=cols < E)
    _place_block(b, ends - total + before, ids_ptr, slot_row_ptr, row_slot_ptr, T, E_P, K,
                 BLOCK_T)


def _block_tokens(num_experts: int, interpreted: bool) -> int:
    if interpreted:
        return 16
    # A (BLOCK_T, E_P) tile per step of at most 8k values stays in the registers of 8 warps
    # (sm90 builds of these kernels spill past it).
    return max(16, min(128, 8192 // triton.next_power_of_2(num_experts)))


def launch(logits_TE: Tensor | None, ids_TK: Tensor | None, num_experts: int, k: int, *,
           bias_E: Tensor | None = None, allowed_TE: Tensor | None = None,
           renormalize: bool = True, block_tokens: int | None = None,
           interpreted: bool = False) -> tuple[Tensor | None, Tensor, Tensor | None, Plan]:
    """Run the prologue on ``logits_TE`` (T, E) float32, or, given ``ids_TK`` (T, K) int64
    chosen elsewhere, only its counting and placing half.

    Returns ``(probs_TE float32 | None, ids_TK int64, w_TK float32 | None, plan)``; the first
    and third are None when ``ids_TK`` was given. No value is read back to the host.
    """
    src = logits_TE if logits_TE is not None else ids_TK
    if src is None:
        raise ValueError("the routing prologue needs logits_TE or ids_TK")
    T, dev = src.shape[0], src.device
    E, E_P, K_P = num_experts, triton.next_power_of_2(num_experts), triton.next_power_of_2(k)
    from_ids = ids_TK is not None
    if ids_TK is not None:
        ids_TK = ids_TK.contiguous()
        probs_TE = w_TK = None
        logits = probs = w = ids_TK  # never read
    else:
        logits = src.float().contiguous()  # logits_TE: no ids were given
        probs_TE = torch.empty_like(logits)
        ids_TK = torch.empty(T, k, dtype=torch.int64, device=dev)
        w_TK = torch.empty(T, k, dtype=torch.float32, device=dev)
        probs, w = probs_TE, w_TK
    bias = bias_E.float().contiguous() if bias_E is not None else logits
    allowed = allowed_TE.contiguous().view(torch.uint8) if allowed_TE is not None else logits
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E, dtype=torch.int32, device=dev)
    slot_row = torch.empty(T * k, dtype=torch.int32, device=dev)
    row_slot = torch.empty(T * k, dtype=torch.int32, device=dev)
    BT = block_tokens or _block_tokens(E, interpreted)
    blocks = triton.cdiv(T, BT)
    flags = dict(E=E, E_P=E_P, K=k, BLOCK_T=BT)
    choice = dict(K_P=K_P, HAS_BIAS=bias_E is not None, HAS_ALLOWED=allowed_TE is not None,
                  RENORM=renormalize, FROM_IDS=from_ids)
    warps = 8 if E_P * BT >= 4096 else 4
    if blocks <= _ONE_KERNEL_BLOCKS:
        _route_one_kernel[(1,)](logits, bias, allowed, probs, ids_TK, w, counts, offsets,
                                slot_row, row_slot, T, **flags, **choice, num_warps=warps)
    else:
        hist = torch.empty(blocks, E_P, dtype=torch.int32, device=dev)
        _route_choose_kernel[(blocks,)](logits, bias, allowed, probs, ids_TK, w, hist, T,
                                        **flags, **choice, num_warps=warps)
        # Each block's offset from one scan, not from every program re-reading every
        # histogram (NB^2 * E reads: 16 GB at 131k tokens and 256 experts).
        prefix = torch.cumsum(hist, 0, dtype=torch.int32)
        _route_place_kernel[(blocks,)](ids_TK, hist, prefix, counts, offsets, slot_row,
                                       row_slot, T, blocks, **flags, num_warps=warps)
    return probs_TE, ids_TK, w_TK, Plan(counts, offsets, row_slot, slot_row)


def routing_backward(probs_TE: Tensor, ids_TK: Tensor, w_TK: Tensor, renormalize: bool,
                     grad_probs_TE: Tensor | None, grad_w_TK: Tensor | None) -> Tensor:
    """Gradient of the logits from those of ``probs`` and of the combine weights ``w``.

    With ``q = probs[ids]`` and ``w = q / sum(q)`` (or ``w = q``), ``dL/dq = (g_w - sum(g_w *
    w)) / sum(q)`` (or ``g_w``) adds into ``dL/dprobs`` at ``ids``; the softmax then gives
    ``dL/dlogits = probs * (g - sum(g * probs))``. Forbidden experts have probability 0 and so
    get no gradient, as ``masked_fill`` before a softmax gives.
    """
    g_TE = grad_probs_TE.float() if grad_probs_TE is not None else torch.zeros_like(probs_TE)
    if grad_w_TK is not None:
        g_w = grad_w_TK.float()
        if renormalize:
            q_TK = probs_TE.gather(1, ids_TK)
            g_q = (g_w - (g_w * w_TK).sum(-1, keepdim=True)) / q_TK.sum(-1, keepdim=True)
        else:
            g_q = g_w
        g_TE = g_TE.scatter_add(1, ids_TK, g_q)
    return probs_TE * (g_TE - (g_TE * probs_TE).sum(-1, keepdim=True))
