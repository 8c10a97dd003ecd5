"""Looking inside a MoE model: parameter counts, expert usage, routing entropy, comparisons.

These run outside the hot path and return plain Python values (they read tensors back).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.moe.balancing import routing_entropy
from pipeline.moe.layer import MoEAux, MoELayer


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def active_fraction(layer: MoELayer) -> float:
    """The share of a layer's routed expert parameters one token uses on average."""
    cfg = layer.config
    if cfg.gate_type == "soft":
        return 1.0  # every token mixes into every slot
    per_token: float = cfg.top_k_experts
    if cfg.gate_type == "expert_choice":
        per_token = cfg.top_k_experts * cfg.capacity_factor
    return min(1.0, per_token / cfg.num_experts)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total and active (used per token) parameters of a model or layer.

    ``routed_experts`` counts every routed expert's weights and ``active`` counts, for them,
    only the average share a token passes through; everything else is active.
    """
    total = _numel(model)
    routed = active_routed = 0
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            n = _numel(layer.experts)
            routed += n
            active_routed += round(n * active_fraction(layer))
    return {"total": total, "active": total - routed + active_routed,
            "routed_experts": routed, "active_routed_experts": active_routed}


def expert_usage(aux: MoEAux | Tensor, bins: int = 10) -> dict[str, Any]:
    """Per-expert work, share in percent, and a histogram of the shares.

    Takes a layer's `MoEAux` or its ``counts`` tensor.
    """
    counts = (aux.counts if isinstance(aux, MoEAux) else aux).detach().double().cpu()
    share = counts / counts.sum().clamp_min(1e-12)
    edges = torch.linspace(0.0, float(share.max()) if share.numel() else 1.0, bins + 1,
                           dtype=torch.float64)
    hist = torch.histc(share, bins=bins, min=float(edges[0]), max=float(edges[-1]))
    return {"counts": counts.tolist(), "percent": (share * 100).tolist(),
            "histogram": {"edges": edges.tolist(), "experts": [int(h) for h in hist.tolist()]},
            "unused_experts": int((counts == 0).sum())}


def entropy(probs_TE: Tensor) -> dict[str, float]:
    """Routing entropy in nats and as a fraction of the maximum, ``ln E``."""
    h = float(routing_entropy(probs_TE.detach().float()))
    max_h = float(torch.log(torch.tensor(float(probs_TE.shape[-1]))))
    return {"entropy": h, "normalized": h / max_h if max_h else 0.0}


def _forward(model: nn.Module, x: Tensor) -> tuple[Tensor, list[MoEAux]]:
    auxes: list[MoEAux] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: auxes.append(out[1]))
             for m in model.modules() if isinstance(m, MoELayer)]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return (out[0] if isinstance(out, tuple) else out), auxes


@torch.no_grad()
def compare(a: nn.Module, b: nn.Module, x: Tensor) -> dict[str, Any]:
    """Run two layers or models on the same input (eval mode) and report how they differ.

    Returns output differences (max and mean absolute, relative L2, mean cosine similarity
    per row), both models' parameter counts, and per-MoE-layer expert usage of each.
    """
    modes = (a.training, b.training)
    a.eval(), b.eval()
    try:
        ya, aux_a = _forward(a, x)
        yb, aux_b = _forward(b, x)
    finally:
        a.train(modes[0]), b.train(modes[1])
    if ya.shape != yb.shape:
        raise ValueError(f"outputs differ in shape: {tuple(ya.shape)} vs {tuple(yb.shape)}")
    diff = (ya.double() - yb.double())
    rows_a, rows_b = ya.double().reshape(-1, ya.shape[-1]), yb.double().reshape(-1, yb.shape[-1])
    return {
        "max_abs_diff": float(diff.abs().max()),
        "mean_abs_diff": float(diff.abs().mean()),
        "relative_l2": float(diff.norm() / yb.double().norm().clamp_min(1e-30)),
        "mean_cosine": float(torch.nn.functional.cosine_similarity(rows_a, rows_b, dim=-1).mean()),
        "parameters": {"a": parameter_counts(a), "b": parameter_counts(b)},
        "expert_usage": {"a": [expert_usage(aux)["percent"] for aux in aux_a],
                         "b": [expert_usage(aux)["percent"] for aux in aux_b]},
    }
