"""Autograd around the kernels: forward in Triton, backward in grouped GEMMs.

Legend: T tokens, D input dim, H hidden dim, O output dim, E experts, K experts per token,
A = T*K slots (``a = t*K + k``), N = A rows sorted by expert.

Forward (`ExpertsFunction`): `up_proj` then `down_proj`, giving ``y_AO``, every slot's
weighted expert output; the caller sums the K slots of each token. Backward, in grouped GEMMs
over the same segments, with ``g_a`` the gradient of slot a's output, ``r`` its row, ``e`` its
expert::

    g_u[r]   = g_a @ w2_e                 the unweighted output's gradient (N, H)
    dw[a]    = <g_u[r], h[r]>             the routing weight's
    g_h[r]   = w[a] * g_u[r]
    dW2_e    = sum_r (w[a] g_a)^T h[r]
    g_pre    = act'(pre) * g_h            (gated: silu'(g) u g_h and silu(g) g_h)
    dx[t]    = sum_k g_pre[r] @ w1_e  (+ g_up[r] @ w3_e)
    dW1_e    = sum_r g_pre[r]^T x[t]      (dW3 likewise)

The grouped GEMMs of backward are ``torch._grouped_mm`` (the plan's offsets as its ``offs``)
where it runs natively (bf16 on Hopper and newer, see `grouped_mm.grouped_mm_supported`), and
`grouped_gemm.segment_mm` / `segment_wgrad` elsewhere: torch's fallback would read the offsets
on the host, a sync in every backward.

`RoutingFunction` wraps the routing prologue; its backward is the softmax's (see
`routing.routing_backward`). The activation's derivative comes from autograd on the saved
pre-activations, so every activation the experts know is covered by one line.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.moe.grouped_mm import activation_fn, grouped_mm_supported
from pipeline.moe.kernels import grouped_gemm, routing
from pipeline.moe.kernels.plan import Plan


class _Products:
    """Backward's grouped products over a plan's segments, by torch or by the kernels."""

    def __init__(self, plan: Plan, num_experts: int, top_k: int, native: bool,
                 interpreted: bool) -> None:
        self.plan, self.E, self.K = plan, num_experts, top_k
        self.native, self.interpreted = native, interpreted

    def rows(self, a_NK: Tensor, w_EKP: Tensor) -> Tensor:
        """``a[r] @ w_e`` for each sorted row r of expert e: ``(N, K) -> (N, P)``."""
        if self.native:
            return torch._grouped_mm(a_NK, w_EKP, offs=self.plan.offsets_E)
        return grouped_gemm.segment_mm(a_NK, w_EKP.transpose(1, 2), self.plan,
                                       self.interpreted)

    def wgrad(self, a_NM: Tensor, b_NP: Tensor | None, x_TP: Tensor | None = None) -> Tensor:
        """``sum_r a[r]^T b[r]`` per expert ``(E, M, P)``; ``x_TP`` given: b's rows are the
        tokens' rows of x, and the kernels read them from x (``b_NP`` may then be None)."""
        if x_TP is not None and not self.native:
            return grouped_gemm.segment_wgrad(a_NM, x_TP, self.plan, self.E, self.K,
                                              self.interpreted)
        if b_NP is None:
            raise ValueError("wgrad needs b_NP unless the kernels read its rows from x_TP")
        if self.native:
            return torch._grouped_mm(a_NM.t(), b_NP, offs=self.plan.offsets_E)
        return grouped_gemm.segment_wgrad(a_NM, b_NP, self.plan, self.E, None,
                                          self.interpreted)


def native_backward(x: Tensor, dims: tuple[int, ...]) -> bool:
    """Whether backward's grouped products go to ``torch._grouped_mm`` (no host sync)."""
    return grouped_mm_supported(x, dims)


class RoutingFunction(torch.autograd.Function):
    """``logits_TE -> (probs_TE, ids_TK, w_TK, *plan)``; gradients reach the logits."""

    @staticmethod
    def forward(ctx, logits_TE: Tensor, bias_E: Tensor | None, allowed_TE: Tensor | None,
                k: int, renormalize: bool, block_tokens: int | None,
                interpreted: bool) -> tuple[Tensor, ...]:
        probs, ids, w, plan = routing.launch(
            logits_TE, None, logits_TE.shape[-1], k, bias_E=bias_E, allowed_TE=allowed_TE,
            renormalize=renormalize, block_tokens=block_tokens, interpreted=interpreted)
        assert probs is not None and w is not None  # launch computes both from logits
        ctx.renormalize = renormalize
        ctx.save_for_backward(probs, ids, w)
        ctx.mark_non_differentiable(ids, *plan)
        return (probs, ids, w, *plan)

    @staticmethod
    def backward(ctx, grad_probs: Tensor | None, _ids: None, grad_w: Tensor | None,
                 *_plan: None) -> tuple[Tensor | None, ...]:
        probs, ids, w = ctx.saved_tensors
        grad = routing.routing_backward(probs, ids, w, ctx.renormalize, grad_probs, grad_w)
        return grad, None, None, None, None, None, None


class ExpertsFunction(torch.autograd.Function):
    """``(x_TD, w_A, w1, w3 | None, w2, *plan) -> y_AO`` (x's dtype), weights of x's dtype."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, w_A: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor,
                counts_E: Tensor, offsets_E: Tensor, row_slot_N: Tensor, slot_row_A: Tensor,
                activation: str, top_k: int, interpreted: bool) -> Tensor:
        plan = Plan(counts_E, offsets_E, row_slot_N, slot_row_A)
        save = any(ctx.needs_input_grad[:5])
        h, pre = grouped_gemm.up_proj(x_TD, w1, w3, plan, top_k, activation, save, interpreted)
        y_AO = grouped_gemm.down_proj(h, w2, w_A, plan, interpreted)
        if save:
            ctx.save_for_backward(x_TD, w_A, w1, w3, w2, counts_E, offsets_E, row_slot_N,
                                  slot_row_A, h, pre)
            ctx.activation, ctx.top_k, ctx.interpreted = activation, top_k, interpreted
        return y_AO

    @staticmethod
    def backward(ctx, g_AO: Tensor) -> tuple[Tensor | None, ...]:
        x, w_A, w1, w3, w2, counts, offsets, row_slot, slot_row, h, pre = ctx.saved_tensors
        dtype, T, K = x.dtype, x.shape[0], ctx.top_k
        plan = Plan(counts, offsets, row_slot, slot_row)
        mm = _Products(plan, w1.shape[0], K, native_backward(x, (*w1.shape[1:], w2.shape[1])),
                       ctx.interpreted)
        rows = row_slot.long()
        g_NO = g_AO.index_select(0, rows).to(dtype).contiguous()
        w_N = w_A.index_select(0, rows).unsqueeze(-1)
        g_u = mm.rows(g_NO, w2)  # (N, H): w2 is (E, O, H)
        grad_w = (g_u.float() * h.float()).sum(-1).index_select(0, slot_row.long())
        grad_w2 = mm.wgrad((g_NO.float() * w_N).to(dtype), h)
        with torch.enable_grad():
            pres = [p.detach().float().requires_grad_() for p in pre]
            if w3 is None:
                out = activation_fn(ctx.activation, pres[0])
            else:
                out = activation_fn("silu", pres[0]) * pres[1]
            g_pres = [g.to(dtype).contiguous()
                      for g in torch.autograd.grad(out, pres, g_u.float() * w_N)]
        x_N = x.index_select(0, rows // K) if mm.native else None
        g_x = mm.rows(g_pres[0], w1)  # w1 is (E, H, D)
        grad_w1 = mm.wgrad(g_pres[0], x_N, x)
        grad_w3 = None
        if w3 is not None:
            g_x = g_x + mm.rows(g_pres[1], w3)
            grad_w3 = mm.wgrad(g_pres[1], x_N, x)
        grad_x = g_x.float().index_select(0, slot_row.long()).view(T, K, -1).sum(1).to(dtype)
        return (grad_x, grad_w, grad_w1, grad_w3, grad_w2,
                None, None, None, None, None, None, None)


def route(logits_TE: Tensor, k: int, *, bias_E: Tensor | None = None,
          allowed_TE: Tensor | None = None, renormalize: bool = True,
          block_tokens: int | None = None,
          interpreted: bool = False) -> tuple[Tensor, Tensor, Tensor, Plan]:
    """``(probs_TE, ids_TK, w_TK, plan)`` from router logits; see `routing`."""
    probs, ids, w, *plan = RoutingFunction.apply(logits_TE, bias_E, allowed_TE, k,
                                                 renormalize, block_tokens, interpreted)
    return probs, ids, w, Plan(*plan)


def plan_for(ids_TK: Tensor, num_experts: int, interpreted: bool = False,
             block_tokens: int | None = None) -> Plan:
    """The plan of routing chosen elsewhere (hash, random gates; constraint-free torch gates)."""
    return routing.launch(None, ids_TK, num_experts, ids_TK.shape[1],
                          block_tokens=block_tokens, interpreted=interpreted)[3]


def experts(x_TD: Tensor, w_TK: Tensor, plan: Plan, w1: Tensor, w3: Tensor | None,
            w2: Tensor, activation: str, interpreted: bool = False) -> Tensor:
    """``y_AO`` (A, O): each slot's expert output times its weight; differentiable in
    ``x_TD``, ``w_TK`` and the weights (cast to x's dtype by the caller)."""
    return ExpertsFunction.apply(x_TD.contiguous(), w_TK.reshape(-1).float().contiguous(),
                                 w1, w3, w2, *plan, activation, w_TK.shape[1], interpreted)
