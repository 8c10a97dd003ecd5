"""Grouped GEMMs over expert segments, the activation and the combine in their epilogues.

Legend: T tokens, D input dim, H hidden dim, O output dim, E experts (E_P the next power of
two), K experts per token, A = T*K slots (``a = t*K + k``), N = A rows sorted by expert (the
routing `Plan`), BM x BN x BK a program's tile.

Both kernels read the plan's per-expert counts and find their own tile: tiles are numbered
expert by expert, ``ceil(count_e / BM)`` of them for expert e, so program ``m`` recomputes the
running tile counts (E values, a cumsum) and picks the expert whose range holds ``m``. The
grid is sized from what the host knows, ``ceil(N / BM) + E`` row tiles (the most any routing
can need); programs past the last tile return at once. So the host never learns the counts,
the rows are not padded in memory, and the autotuner may choose any BM.

* `up_proj`: ``h = act(x[token(r)] @ w1_e^T)`` or, gated, ``silu(x @ w1_e^T) * (x @ w3_e^T)``
  with both accumulators in one program. The gather of each row's token from ``x`` is fused
  into the A-tile load (no sorted copy of x), the activation into the epilogue; with
  ``save=True`` it also stores the pre-activations for backward.
* `down_proj`: ``y[slot(r)] = w[slot(r)] * (h[r] @ w2_e^T)``: the routing weight and the
  unpermute fused into the epilogue, each row stored at its slot. The combine then is a sum
  over the K slots of a token (one reduction, in fp32, deterministic, unlike an atomic
  scatter-add whose order varies run to run).
* for backward, where ``torch._grouped_mm`` has no native kernel (it then reads the offsets
  on the host): `segment_mm`, the same kernel storing by row, unweighted, and
  `segment_wgrad`, ``a_e^T b_e`` summed over each expert's rows (one program per expert and
  output tile, looping over the rows; the token gather fused into the loads of b).

Accumulation is fp32. Under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests)
bf16 operands are widened before ``tl.dot`` (numpy has no bf16 product) and blocks are small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor

from pipeline.moe.kernels.plan import Plan

# Activation codes shared with `_act` below.
ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}
# Blocks under the interpreter: small, so the CPU tests stay quick.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:  # erf GELU, as F.gelu
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:  # tanh GELU: 0.5 * (1 + tanh(z)) is sigmoid(2z)
        y = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACT == 3:
        y = tl.maximum(x, 0.0)
    elif ACT == 4:
        y = x * tl.sigmoid(x)
    else:
        y = x
    return y


@triton.jit
def _tile(pid_m, counts_ptr, E: tl.constexpr, E_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program ``pid_m``'s expert and its row range ``[start, stop)`` (expert E_P: none)."""
    cols = tl.arange(0, E_P)
    counts = tl.load(counts_ptr + cols, mask=cols < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    row_end = tl.cumsum(counts, 0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    mine = cols == e
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    stop = tl.sum(tl.where(mine, row_end, 0), 0)
    start = stop - tl.sum(tl.where(mine, counts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    return e, start, stop


@triton.jit
def _k_loop(a_ptrs, b1_ptrs, b3_ptrs, live, n_ok, K, stride_bk, GATED: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile's products over ``K``: ``A B1`` and (``GATED``, sharing A's loads) ``A B3``, in
    float32. ``a_ptrs`` (BLOCK_M, BLOCK_K) step along K by one, ``b*_ptrs`` (BLOCK_K,
    BLOCK_N) by ``stride_bk``; rows past ``live`` and columns past ``n_ok`` read zeros."""
    ks = tl.arange(0, BLOCK_K)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kin = ks < K - k0
        a = tl.load(a_ptrs, mask=live[:, None] & kin[None, :], other=0.0)
        b1 = tl.load(b1_ptrs, mask=kin[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b1 = b1.to(tl.float32)
        acc1 = tl.dot(a, b1, acc1, input_precision=PREC)
        if GATED:
            b3 = tl.load(b3_ptrs, mask=kin[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                b3 = b3.to(tl.float32)
            acc3 = tl.dot(a, b3, acc3, input_precision=PREC)
        a_ptrs += BLOCK_K
        b1_ptrs += BLOCK_K * stride_bk
        b3_ptrs += BLOCK_K * stride_bk
    return acc1, acc3


@triton.jit
def _up_kernel(x_ptr, w1_ptr, w3_ptr, h_ptr, pre1_ptr, pre3_ptr, row_slot_ptr, counts_ptr, N,
               D, H,
               stride_xt, stride_we, stride_wh, stride_wd, ROWS_KEY,
               E: tl.constexpr, E_P: tl.constexpr, TOPK: tl.constexpr, ACT: tl.constexpr,
               GATED: tl.constexpr, SAVE: tl.constexpr, UPCAST: tl.constexpr,
               PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, BUCKET: tl.constexpr):
    e, start, stop = _tile(tl.program_id(0), counts_ptr, E, E_P, BLOCK_M)
    if e >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    live = rows < stop
    tok = tl.load(row_slot_ptr + rows, mask=live, other=0) // TOPK
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok.to(tl.int64)[:, None] * stride_xt + ks[None, :]
    w_off = e.to(tl.int64) * stride_we + cols[None, :] * stride_wh + ks[:, None] * stride_wd
    acc1, acc3 = _k_loop(a_ptrs, w1_ptr + w_off, w3_ptr + w_off, live, cols < H, D, stride_wd,
                         GATED, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    h = _act(acc1, ACT)
    if GATED:
        h = h * acc3
    out = rows.to(tl.int64)[:, None] * H + cols[None, :]
    keep = live[:, None] & (cols[None, :] < H)
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=keep)
    if SAVE:
        # Two planes by two pointers: an offset of N * H in the kernel's int32 would wrap
        # past 2^31 (64k tokens x top-8 x H 4096).
        tl.store(pre1_ptr + out, acc1.to(pre1_ptr.dtype.element_ty), mask=keep)
        if GATED:
            tl.store(pre3_ptr + out, acc3.to(pre3_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _down_kernel(h_ptr, w2_ptr, y_ptr, wts_ptr, row_slot_ptr, counts_ptr, H, O,
                 stride_we, stride_wo, stride_wh, ROWS_KEY, E: tl.constexpr,
                 E_P: tl.constexpr, SCATTER: tl.constexpr, UPCAST: tl.constexpr,
                 PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BUCKET: tl.constexpr):
    """Row r times its expert's ``w_e^T``; ``SCATTER``: weighted, stored at r's slot."""
    e, start, stop = _tile(tl.program_id(0), counts_ptr, E, E_P, BLOCK_M)
    if e >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    live = rows < stop
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * H + ks[None, :]
    b_ptrs = (w2_ptr + e.to(tl.int64) * stride_we + cols[None, :] * stride_wo
              + ks[:, None] * stride_wh)
    acc, _ = _k_loop(a_ptrs, b_ptrs, b_ptrs, live, cols < O, H, stride_wh, False, UPCAST, PREC,
                     BLOCK_M, BLOCK_N, BLOCK_K)
    keep = live[:, None] & (cols[None, :] < O)
    if SCATTER:
        slot = tl.load(row_slot_ptr + rows, mask=live, other=0)
        acc = acc * tl.load(wts_ptr + slot, mask=live, other=0.0)[:, None]
        out = slot.to(tl.int64)[:, None] * O + cols[None, :]
    else:
        out = rows.to(tl.int64)[:, None] * O + cols[None, :]
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _wgrad_kernel(a_ptr, b_ptr, out_ptr, row_slot_ptr, counts_ptr, M, P, stride_b, ROWS_KEY,
                  TOPK: tl.constexpr, GATHER: tl.constexpr, E: tl.constexpr,
                  E_P: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BUCKET: tl.constexpr):
    """``out[e] = a_e^T b_e`` over expert e's rows: ``(N, M), (N, P) -> (E, M, P)``; with
    ``GATHER`` the rows of b are its tokens' (``b`` is ``x_TP``)."""
    e = tl.program_id(0)
    cols_e = tl.arange(0, E_P)
    counts = tl.load(counts_ptr + cols_e, mask=cols_e < E, other=0)
    ends = tl.cumsum(counts, 0)
    stop = tl.sum(tl.where(cols_e == e, ends, 0), 0)
    start = stop - tl.sum(tl.where(cols_e == e, counts, 0), 0)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ps = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, stop, BLOCK_K):
        rows = r0 + ks
        live = rows < stop
        a = tl.load(a_ptr + rows.to(tl.int64)[None, :] * M + ms[:, None],
                    mask=live[None, :] & (ms[:, None] < M), other=0.0)
        src = rows
        if GATHER:
            src = tl.load(row_slot_ptr + rows, mask=live, other=0) // TOPK
        b = tl.load(b_ptr + src.to(tl.int64)[:, None] * stride_b + ps[None, :],
                    mask=live[:, None] & (ps[None, :] < P), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    out = e.to(tl.int64) * M * P + ms[:, None] * P + ps[None, :]
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty),
             mask=(ms[:, None] < M) & (ps[None, :] < P))


# -- tile choice (CUDA) ----------------------------------------------------------------------
# Candidates for H100/H200, by the mean rows per expert (``ROWS_KEY``): decode gives each
# expert a handful of rows, where the weights' bandwidth is what counts (short row tiles, more
# programs along the columns); prefill wants 64-128 x 128-256 tiles for the tensor cores.
_CANDIDATES = {  # bucket: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), ...
    "decode": [(16, 64, 64, 4, 3), (16, 128, 64, 4, 4), (32, 64, 64, 4, 3), (16, 64, 128, 4, 3)],
    "small": [(32, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (32, 64, 64, 4, 3)],
    "prefill": [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)],
}
_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "BUCKET": bucket},
                          num_warps=w, num_stages=st)
            for bucket, shapes in _CANDIDATES.items() for m, n, k, w, st in shapes]
# Below this many multiply-adds a problem is launch-bound: one fixed tile, no tuning run (which
# would compile every candidate first; the tests' small problems all land here).
_TUNE_MIN_WORK = 1 << 22
_FIXED = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}


def _bucket(rows_key: int) -> str:
    return "decode" if rows_key <= 16 else "small" if rows_key <= 64 else "prefill"


def _prune(configs: list, named_args: dict, **_: object) -> list:
    """Keep the candidates of the problem's bucket."""
    bucket = _bucket(named_args["ROWS_KEY"])
    return [c for c in configs if c.kwargs["BUCKET"] == bucket]


def _bench(kernel_call, quantiles):  # shorter than Triton's 25 ms + 100 ms per candidate
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _tuned(kernel, key: list[str], configs: list = _CONFIGS, prune: bool = True):
    return triton.autotune(configs, key=key, do_bench=_bench, cache_results=True,
                           prune_configs_by={"early_config_prune": _prune} if prune else None,
                           )(kernel)


_up_tuned = _tuned(_up_kernel, ["ROWS_KEY", "D", "H", "GATED", "SAVE"])
_down_tuned = _tuned(_down_kernel, ["ROWS_KEY", "H", "O", "SCATTER"])
# Weight gradients loop over an expert's rows whatever their number: prefill tiles only.
_wgrad_tuned = _tuned(_wgrad_kernel, ["ROWS_KEY", "M", "P", "GATHER"],
                      [c for c in _CONFIGS if c.kwargs["BUCKET"] == "prefill"], prune=False)


def _rows_key(rows: int, num_experts: int) -> int:
    """Mean rows per expert, as a power of two: what the tile choice depends on."""
    return min(4096, triton.next_power_of_2(max(1, rows // num_experts)))


def _precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32 unless torch itself allows TF32 for matmuls (the reference would too).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(tuned, raw, grid, work: int, interpreted: bool,
            *args: object, **meta: object) -> None:
    """``raw`` with the interpreter's or the fixed tile, or ``tuned``; ``grid(BM, BN)``."""
    if interpreted or work < _TUNE_MIN_WORK:
        tile = _INTERPRETER_BLOCKS if interpreted else _FIXED
        extra = {} if interpreted else {"num_warps": 4, "num_stages": 3}
        raw[grid(tile["BLOCK_M"], tile["BLOCK_N"])](*args, **meta, **tile, BUCKET="fixed",
                                                    **extra)
        return
    tuned[lambda m: grid(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)


def _row_grid(rows: int, cols: int, num_experts: int):
    """Row tiles: ``ceil(rows / BM) + E`` covers any routing (module docstring)."""
    return lambda bm, bn: (triton.cdiv(rows, bm) + num_experts, triton.cdiv(cols, bn))


def up_proj(x_TD: Tensor, w1_EHD: Tensor, w3_EHD: Tensor | None, plan: Plan, top_k: int,
            activation: str | None, save: bool,
            interpreted: bool = False) -> tuple[Tensor, Tensor | None]:
    """``h_NH`` for the sorted rows, and (``save``) the pre-activations ``(1 or 2, N, H)``.

    ``x_TD`` (T, D) contiguous; weights ``(E, H, D)`` of x's dtype; ``w3`` for gated experts.
    """
    E, H, D = w1_EHD.shape
    N = plan.row_slot_N.numel()
    h = x_TD.new_empty(N, H)
    pre = x_TD.new_empty(2 if w3_EHD is not None else 1, N, H) if save else None
    _launch(_up_tuned, _up_kernel, _row_grid(N, H, E), N * H * D, interpreted,
            x_TD, w1_EHD, w3_EHD if w3_EHD is not None else w1_EHD, h,
            pre[0] if pre is not None else h, pre[-1] if pre is not None else h,
            plan.row_slot_N, plan.counts_E, N, D, H,
            x_TD.stride(0), *w1_EHD.stride(), _rows_key(N, E),
            E=E, E_P=triton.next_power_of_2(E), TOPK=top_k, ACT=ACTIVATIONS[activation],
            GATED=w3_EHD is not None, SAVE=save, UPCAST=interpreted,
            PREC=_precision(x_TD.dtype))
    return h, pre


def down_proj(h_NH: Tensor, w2_EOH: Tensor, w_A: Tensor, plan: Plan,
              interpreted: bool = False) -> Tensor:
    """``y_AO``: each sorted row's expert output times its routing weight, stored at its slot.

    ``w_A`` (A,) float32, the routing weights in slot order.
    """
    return _segment(h_NH, w2_EOH, w_A, plan, True, interpreted)


def segment_mm(a_NK: Tensor, w_EPK: Tensor, plan: Plan, interpreted: bool = False) -> Tensor:
    """``(N, K) -> (N, P)``: each sorted row times its expert's ``w_e^T`` (``w`` may be a
    transposed view: ``w1.transpose(1, 2)`` gives ``row @ w1_e``)."""
    return _segment(a_NK, w_EPK, a_NK, plan, False, interpreted)


def _segment(a_NK: Tensor, w_EPK: Tensor, w_A: Tensor, plan: Plan, scatter: bool,
             interpreted: bool) -> Tensor:
    E, P, K = w_EPK.shape
    N = plan.row_slot_N.numel()
    y = a_NK.new_empty(N, P)
    _launch(_down_tuned, _down_kernel, _row_grid(N, P, E), N * P * K, interpreted,
            a_NK, w_EPK, y, w_A, plan.row_slot_N, plan.counts_E, K, P, *w_EPK.stride(),
            _rows_key(N, E), E=E, E_P=triton.next_power_of_2(E), SCATTER=scatter,
            UPCAST=interpreted, PREC=_precision(a_NK.dtype))
    return y


def segment_wgrad(a_NM: Tensor, b: Tensor, plan: Plan, num_experts: int,
                  top_k: int | None = None, interpreted: bool = False) -> Tensor:
    """``(E, M, P)``: per expert, the sum over its rows of ``a[r]^T b[r]``; ``b`` is (N, P)
    sorted rows, or, with ``top_k``, (T, P) token rows gathered by each row's token."""
    N, M = a_NM.shape
    P = b.shape[1]
    E = num_experts
    out = a_NM.new_empty(E, M, P)
    args = (a_NM, b, out, plan.row_slot_N, plan.counts_E, M, P, b.stride(0),
            _rows_key(N, E))
    meta = dict(TOPK=top_k or 1, GATHER=top_k is not None, E=E,
                E_P=triton.next_power_of_2(E), UPCAST=interpreted, PREC=_precision(a_NM.dtype))
    _launch(_wgrad_tuned, _wgrad_kernel,
            lambda bm, bn: (E, triton.cdiv(M, bm), triton.cdiv(P, bn)), N * M * P,
            interpreted, *args, **meta)
    return out
