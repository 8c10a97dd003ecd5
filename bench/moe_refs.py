"""Reference MoE blocks for bench/moe_layer.py, each built on one `MoELayer`'s weights.

Legend: T tokens, D model dim, H hidden dim, E experts, K experts per token, A = T*K.

* `hf_qwen3`: transformers' own Qwen3-MoE sparse block (``Qwen3MoeSparseMoeBlock``: softmax
  router, top-k, renormalised weights, SwiGLU experts; Mixtral's block is the same maths) from
  a small config with our weights copied in, run under each of its experts implementations
  (``config._experts_implementation``: "eager" loops over the experts hit, "batched_mm"
  gathers one weight copy per assignment, "grouped_mm" sorts and calls grouped GEMM);
* `grouped_mm_moe`: the straight way to write a dropless MoE on grouped GEMM: router,
  top-k, sort by expert, ``F.grouped_mm`` twice, unsort, sum (what our torch path also does);
* `liger_silu_mul`: Liger Kernel's fused SiLU-and-multiply, when ``liger_kernel`` imports
  (Liger has no fused MoE: its Qwen3-MoE support swaps this activation into the experts).

Every builder also returns an experts-only form taking the routing, so that balanced and
skewed routings can be forced identically on all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import common  # noqa: F401  (first: takes bench/ off sys.path, see common.py)
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import MoELayer

Experts = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_TD, ids_TK, w_TK) -> y_TD


def hf_qwen3(layer: MoELayer, device: torch.device, dtype: torch.dtype):
    """transformers' ``Qwen3MoeSparseMoeBlock`` holding ``layer``'s weights (gated experts)."""
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = layer.config
    if cfg.expert_type != "gated" or cfg.gate_type != "topk":
        raise ValueError("transformers' Qwen3-MoE block is top-k routing over SwiGLU experts")
    hf_cfg = Qwen3MoeConfig(hidden_size=cfg.input_dim, moe_intermediate_size=cfg.hidden_dim,
                            num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k_experts,
                            norm_topk_prob=True, hidden_act="silu", num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=4, vocab_size=32)
    with torch.device(device):
        block = Qwen3MoeSparseMoeBlock(hf_cfg)
    ex = layer.experts
    with torch.no_grad():
        block.gate.weight.copy_(layer.gate.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ex.w1, ex.w3], dim=1))  # [gate; up]
        block.experts.down_proj.copy_(ex.w2)
    return block.to(device=device, dtype=dtype).eval()


def hf_forward(block, impl: str) -> Callable[[Tensor], Tensor]:
    """The whole block (router included) under experts implementation ``impl``."""
    def run(x_TD: Tensor) -> Tensor:
        block.experts.config._experts_implementation = impl
        return block(x_TD.unsqueeze(0))[0]
    return run


def hf_experts(block, impl: str) -> Experts:
    """The block's experts alone, routing given."""
    def run(x_TD: Tensor, ids_TK: Tensor, w_TK: Tensor) -> Tensor:
        block.experts.config._experts_implementation = impl
        return block.experts(x_TD, ids_TK, w_TK.to(x_TD.dtype))
    return run


def hf_batched_bytes(tokens: int, layer: MoELayer, dtype: torch.dtype) -> int:
    """What "batched_mm" gathers: one copy of the expert weights per assignment."""
    cfg = layer.config
    per = 3 * cfg.hidden_dim * cfg.input_dim
    return tokens * cfg.top_k_experts * per * torch.finfo(dtype).bits // 8


def liger_silu_mul() -> Callable[[Tensor, Tensor], Tensor] | None:
    """Liger's fused ``silu(g) * u``, or None when liger_kernel does not import."""
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return LigerSiLUMulFunction.apply


def grouped_mm_moe(layer: MoELayer, dtype: torch.dtype,
                   silu_mul: Callable[[Tensor, Tensor], Tensor] | None = None,
                   ) -> tuple[Callable[[Tensor], Tensor], Experts]:
    """Sort + ``F.grouped_mm`` MoE on ``layer``'s weights: ``(forward, experts_only)``."""
    cfg, ex = layer.config, layer.experts
    E, K = cfg.num_experts, cfg.top_k_experts
    gated = cfg.expert_type == "gated"
    w_in = (torch.cat([ex.w1, ex.w3], 1) if gated else ex.w1).detach().to(dtype)
    w_in_t, w_out_t = w_in.transpose(1, 2), ex.w2.detach().to(dtype).transpose(1, 2)
    router = layer.gate.router.weight.detach().float()
    act = silu_mul or (lambda g, u: F.silu(g) * u)

    def experts_only(x_TD: Tensor, ids_TK: Tensor, w_TK: Tensor) -> Tensor:
        T = x_TD.shape[0]
        ids_A = ids_TK.reshape(-1)
        order = torch.argsort(ids_A, stable=True)
        counts = torch.zeros(E, dtype=torch.int32, device=x_TD.device).index_add_(
            0, ids_A, torch.ones_like(ids_A, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = F.grouped_mm(x_TD.index_select(0, order // K), w_in_t, offs=offs)
        if gated:
            g, u = h.chunk(2, dim=-1)
            h = act(g.contiguous(), u.contiguous())
        else:
            h = F.gelu(h)
        y = F.grouped_mm(h, w_out_t, offs=offs)
        y = y * w_TK.reshape(-1).index_select(0, order).to(y.dtype).unsqueeze(-1)
        y_AD = torch.empty_like(y).index_copy_(0, order, y)
        return y_AD.view(T, K, -1).sum(1)

    def forward(x_TD: Tensor) -> Tensor:
        probs = torch.softmax(F.linear(x_TD.float(), router), dim=-1)
        w_TK, ids_TK = probs.topk(K, dim=-1)
        return experts_only(x_TD, ids_TK, w_TK / w_TK.sum(-1, keepdim=True))

    return forward, experts_only


def forced_routing(tokens: int, num_experts: int, k: int, mode: str, device: torch.device,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(ids_TK, w_TK)``: "balanced" gives every expert exactly ``T*K/E`` assignments (the
    ceiling); "skewed" draws experts with Zipf(1.2) popularity, the hottest taking several
    times its share (what an untrained or collapsing router does)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if mode == "balanced":
        # Token t takes experts tK .. tK+K-1 (mod E): distinct, and each expert's share equal.
        ids = (torch.arange(tokens * k) % num_experts).view(tokens, k)
    else:
        pop = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.2
        pop = pop[torch.randperm(num_experts, generator=gen)]
        ids = torch.multinomial(pop.expand(tokens, -1), k, replacement=False, generator=gen)
    w = torch.rand(tokens, k, generator=gen) + 0.1
    return ids.to(device), (w / w.sum(-1, keepdim=True)).to(device)
