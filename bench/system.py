"""Benchmark: the whole system forward, base against optimized, at the quoted configuration.

Input 512, hidden 2048, output 512, 32 experts, top-3, batch 8 x 128 (the original
framework's README example), inference: `MixtureOfExpertsSystem` against
`FullyOptimizedMoESystem` (torch.compile + autocast) on the same weights, interleaved.
Samples are sequences of 128 tokens.

Usage: ``python bench/system.py [--quick] [--device cuda] [--no-compile] [--amp-dtype ...]``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, interleaved, target

from pipeline import MoEConfig
from pipeline.moe.optimized import FullyOptimizedMoESystem
from pipeline.moe.system import MixtureOfExpertsSystem


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--dispatch", default="dropless", choices=["dropless", "capacity"])
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
    p.add_argument("--pipeline-model", action="store_true",
                   help="the pipeline's default model on a batch of 256 items, as a GPU "
                        "worker routes them")
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    extra: dict = {}
    if args.pipeline_model:
        from pipeline.serving import default_config

        full = default_config().to_dict()
        dims = {k: full[k] for k in ("input_dim", "hidden_dim", "output_dim", "num_experts",
                                     "top_k_experts")}
        extra = {"num_layers": full["num_layers"], "constellations": full["constellations"]}
        batch, seq, rounds = 256, 1, args.rounds or (2 if args.quick else 15)
    elif args.quick:
        dims = dict(input_dim=64, hidden_dim=128, output_dim=64, num_experts=8, top_k_experts=2)
        batch, seq, rounds = 4, 16, args.rounds or 2
    else:
        dims = dict(input_dim=512, hidden_dim=2048, output_dim=512, num_experts=32,
                    top_k_experts=3)
        batch, seq, rounds = 8, 128, args.rounds or 7
    common = dict(**dims, **extra, dispatch=args.dispatch, capacity_factor=2.0)
    base = MixtureOfExpertsSystem(MoEConfig(**common, use_compile=False, use_amp=False))
    fast = FullyOptimizedMoESystem(MoEConfig(**common, use_compile=not args.no_compile,
                                             compile_mode=args.compile_mode,
                                             use_amp=True, amp_dtype=args.amp_dtype))
    fast.load_state_dict(base.state_dict())
    base.to(device).eval()
    fast.to(device).eval()
    shape = (batch, dims["input_dim"]) if args.pipeline_model else (batch, seq,
                                                                      dims["input_dim"])
    x = torch.randn(*shape, device=device)

    def run_base() -> object:
        with torch.inference_mode():
            return base(x)

    def run_fast() -> object:
        return fast.infer(x)

    secs = interleaved({"base": run_base, "optimized": run_fast}, rounds, device, warmup=2)
    rate = {k: batch / v for k, v in secs.items()}
    with torch.inference_mode():
        y_base, y_fast = base(x), fast.infer(x).output.float()
    cos = torch.nn.functional.cosine_similarity(y_base.flatten(1), y_fast.flatten(1)).min()
    ratios = {"optimized_vs_base": rate["optimized"] / rate["base"]}
    targets = {}
    if device.type == "cuda" and not args.quick and not args.pipeline_model:
        targets["optimized_samples_per_s"] = target(500.0, rate["optimized"])
    return emit(
        "system", device,
        {**dims, "batch": batch, "seq": seq, "num_layers": base.config.num_layers,
         "dispatch": args.dispatch, "compile": not args.no_compile, "amp_dtype": args.amp_dtype,
         "compile_mode": args.compile_mode, "pipeline_model": args.pipeline_model,
         "rounds": rounds, "quick": args.quick},
        results={"optimized_samples_per_s": round(rate["optimized"], 2),
                 "optimized_tokens_per_s": round(rate["optimized"] * seq, 1),
                 "min_cosine_optimized_vs_base": round(float(cos), 6)},
        references={"base_samples_per_s": round(rate["base"], 2),
                    "base_tokens_per_s": round(rate["base"] * seq, 1)},
        ratios=ratios, targets=targets,
        note="samples are sequences; the original README quotes 450-500 samples/s on an A100 "
             "with all its optimisations")


if __name__ == "__main__":
    main()
    sys.exit(0)
