"""Benchmark: the MoE layer against the two ways MoE blocks are usually written.

At the configuration users quote (d=512, hidden=2048, 32 experts, top-3) on 8 x 128 tokens
and on 8,192 tokens, all on the same weights and the same routing, measured side by side:

* ours: `MoELayer` (dropless dispatch), forward (inference) and forward + backward;
* reference A, ``loop``: a readable loop over experts that gathers each expert's tokens and
  scatter-adds its weighted output (how most transformer libraries wrote their MoE blocks);
  the same FLOPs as ours;
* reference B, ``masked``: every expert on every token, then a masked combine (E/k times the
  FLOPs; the "masked operations instead of conditionals" of the original framework);
* the roofline: the best rate of one dense matmul, a square one of the same FLOPs or a
  2048-side one, by the fastest GEMM this torch build has on the device (``torch.mm``, and
  oneDNN's linear on x86 CPUs).

Usage: ``python bench/moe_layer.py [--quick] [--device cuda] [--dtype bfloat16]``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, interleaved, target  # noqa: E402

from pipeline import MoEConfig, MoELayer  # noqa: E402
from pipeline.moe.grouped_mm import activation_fn, onednn_available, onednn_dtypes  # noqa: E402


def expert_flops(cfg: MoEConfig, tokens: int) -> float:
    """Forward FLOPs of the routed experts (2 per multiply-add)."""
    per_assignment = 2 * cfg.hidden_dim * (cfg.input_dim + cfg.output_dim)
    if cfg.expert_type == "gated":
        per_assignment += 2 * cfg.hidden_dim * cfg.input_dim
    return float(tokens * cfg.top_k_experts * per_assignment)


def _per_expert_weights(layer: MoELayer) -> list[dict[str, torch.Tensor]]:
    """The stacked weights as one set per expert, like a ModuleList of nn.Linear experts
    (``unbind`` once, so backward costs what separate modules would)."""
    names = ["w1", "w2"] + (["w3"] if layer.experts.expert_type == "gated" else [])
    slices = {n: getattr(layer.experts, n).unbind(0) for n in names}
    return [{n: slices[n][e] for n in names} for e in range(layer.config.num_experts)]


def _expert(layer: MoELayer, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    if layer.experts.expert_type == "gated":
        return F.linear(F.silu(F.linear(h, w["w1"])) * F.linear(h, w["w3"]), w["w2"])
    return F.linear(activation_fn(layer.experts.activation, F.linear(h, w["w1"])), w["w2"])


def loop_over_experts(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Reference A: route, then per expert gather its tokens, run it, scatter-add back."""
    routing = layer.gate(x_TD)
    ids_TK, w_TK = routing.expert_ids, routing.weights
    out = torch.zeros(x_TD.shape[0], layer.config.output_dim, device=x_TD.device,
                      dtype=x_TD.dtype)
    for e, w in enumerate(_per_expert_weights(layer)):
        token, slot = torch.where(ids_TK == e)
        y = _expert(layer, w, x_TD[token]) * w_TK[token, slot, None].to(x_TD.dtype)
        out.index_add_(0, token, y)
    return out


def masked_dense(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Reference B: every expert on every token, combined through a dense weight mask."""
    routing = layer.gate(x_TD)
    mask_TE = torch.zeros(x_TD.shape[0], layer.config.num_experts, device=x_TD.device)
    mask_TE.scatter_(1, routing.expert_ids, routing.weights)
    out = torch.zeros(x_TD.shape[0], layer.config.output_dim, device=x_TD.device,
                      dtype=x_TD.dtype)
    for e, w in enumerate(_per_expert_weights(layer)):
        out += _expert(layer, w, x_TD) * mask_TE[:, e : e + 1].to(x_TD.dtype)
    return out


def roofline(flops: float, device: torch.device, dtype: torch.dtype,
             rounds: int) -> tuple[float, str]:
    """The best dense GEMM rate here: FLOP/s and which kernel and shape gave it.

    Tries one square matmul of the same FLOPs and, to keep the bar high where a large
    output's first-touch page faults slow the former, a 2048-side square; each by
    ``torch.mm`` into a preallocated output and, on x86 CPUs, by oneDNN's linear.
    """
    rates: dict[str, float] = {}
    same = max(64, round((flops / 2) ** (1 / 3) / 64) * 64)
    for side in sorted({same, 2048}):
        a = torch.randn(side, side, device=device, dtype=dtype)
        b = torch.randn(side, side, device=device, dtype=dtype)
        out = torch.empty(side, side, device=device, dtype=dtype)
        kernels: dict[str, Callable[[], object]] = {
            f"torch.mm_{side}": lambda a=a, b=b, out=out: torch.mm(a, b, out=out)}
        if device.type == "cpu" and onednn_available() and dtype in onednn_dtypes():
            kernels[f"onednn_linear_{side}"] = lambda a=a, b=b: (
                torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
        secs = interleaved(kernels, rounds, device)
        rates.update({name: 2 * side**3 / t for name, t in secs.items()})
    best = max(rates, key=rates.__getitem__)
    return rates[best], best


def measure(layer: MoELayer, tokens: int, rounds: int, device: torch.device,
            dtype: torch.dtype, with_masked: bool) -> dict[str, float]:
    cfg = layer.config
    x = torch.randn(tokens, cfg.input_dim, device=device, dtype=dtype)
    out: dict[str, float] = {}

    def fwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn(x)
        return run

    def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            xg = x.detach().requires_grad_()
            fn(xg).float().pow(2).mean().backward()
        return run

    ours = lambda t: layer(t)[0]  # noqa: E731
    loop = lambda t: loop_over_experts(layer, t)  # noqa: E731
    layer.eval()
    fns = {"ours_fwd": fwd(ours), "loop_fwd": fwd(loop)}
    if with_masked:
        fns["masked_fwd"] = fwd(lambda t: masked_dense(layer, t))
    out.update(interleaved(fns, rounds, device))
    layer.train()
    out.update(interleaved({"ours_fwdbwd": fwd_bwd(ours), "loop_fwdbwd": fwd_bwd(loop)},
                           max(1, rounds // 2 + 1), device))
    layer.eval()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--expert-type", default="standard", choices=["standard", "gated"])
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.quick:
        cfg = MoEConfig(input_dim=64, hidden_dim=128, output_dim=64, num_experts=8,
                        top_k_experts=2, expert_type=args.expert_type, dtype=args.dtype)
        sizes, rounds = {"small": 64, "large": 256}, args.rounds or 2
    else:
        cfg = MoEConfig(input_dim=512, hidden_dim=2048, output_dim=512, num_experts=32,
                        top_k_experts=3, expert_type=args.expert_type, dtype=args.dtype)
        sizes, rounds = {"8x128": 8 * 128, "8192": 8192}, args.rounds or 7
    layer = MoELayer(cfg).to(device)
    results: dict[str, float] = {}
    references: dict[str, float] = {}
    ratios: dict[str, float] = {}
    targets: dict[str, dict] = {}
    for label, tokens in sizes.items():
        secs = measure(layer, tokens, rounds, device, dtype,
                       with_masked=(label in ("8x128", "small")))
        rate = {k: tokens / v for k, v in secs.items()}
        results[f"ours_fwd_tokens_per_s_{label}"] = round(rate["ours_fwd"], 1)
        results[f"ours_fwdbwd_tokens_per_s_{label}"] = round(rate["ours_fwdbwd"], 1)
        references[f"loop_over_experts_fwd_tokens_per_s_{label}"] = round(rate["loop_fwd"], 1)
        references[f"loop_over_experts_fwdbwd_tokens_per_s_{label}"] = round(
            rate["loop_fwdbwd"], 1)
        ratios[f"ours_vs_loop_fwd_{label}"] = rate["ours_fwd"] / rate["loop_fwd"]
        ratios[f"ours_vs_loop_fwdbwd_{label}"] = rate["ours_fwdbwd"] / rate["loop_fwdbwd"]
        targets[f"ours_vs_loop_fwd_{label}"] = target(1.25, ratios[f"ours_vs_loop_fwd_{label}"])
        if "masked_fwd" in rate:
            references[f"masked_dense_fwd_tokens_per_s_{label}"] = round(rate["masked_fwd"], 1)
            ratios[f"ours_vs_masked_fwd_{label}"] = rate["ours_fwd"] / rate["masked_fwd"]
            targets[f"ours_vs_masked_fwd_{label}"] = target(
                5.0, ratios[f"ours_vs_masked_fwd_{label}"])
        flops = expert_flops(cfg, tokens)
        peak, kernel = roofline(flops, device, dtype, rounds)
        references[f"roofline_fwd_tokens_per_s_{label}"] = round(tokens * peak / flops, 1)
        references[f"roofline_gflops_{label}"] = round(peak / 1e9, 1)
        references[f"roofline_kernel_{label}"] = kernel  # type: ignore[assignment]
        results[f"ours_fwd_gflops_{label}"] = round(flops * rate["ours_fwd"] / tokens / 1e9, 1)
        ratios[f"ours_vs_roofline_fwd_{label}"] = rate["ours_fwd"] * flops / tokens / peak
        if label in ("8192", "large"):
            targets[f"ours_vs_roofline_fwd_{label}"] = target(
                0.75, ratios[f"ours_vs_roofline_fwd_{label}"])
        if device.type == "cuda" and label == "8x128":
            seqs = rate["ours_fwd"] / 128
            results["ours_fwd_sequences_per_s_8x128"] = round(seqs, 1)
            targets["ours_fwd_sequences_per_s_8x128"] = target(50_000, seqs)
    config = {**{k: v for k, v in cfg.to_dict().items() if k in (
        "input_dim", "hidden_dim", "output_dim", "num_experts", "top_k_experts", "expert_type",
        "activation", "gate_type", "dispatch", "dtype")}, "tokens": sizes, "rounds": rounds,
        "quick": args.quick}
    return emit("moe_layer", device, config, results, references, ratios, targets,
                flops_fwd={k: expert_flops(cfg, t) for k, t in sizes.items()},
                note="flops count routed expert matmuls only; ratios are medians of "
                     "interleaved rounds on the same weights and inputs")


if __name__ == "__main__":
    main()
    sys.exit(0)
