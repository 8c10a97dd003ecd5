"""Benchmark: where a MoE layer forward's time goes, and what CUDA graphs would save.

Counts the kernels (ops, on the CPU) one forward launches and their device time with
`torch.profiler`, then times the eager forward against `torch.compile` (default mode) and,
on CUDA, `torch.compile(mode="reduce-overhead")` (CUDA graphs), all on the same weights and
input: the configuration of `bench/moe_layer.py` (d=512, hidden 2048, 32 experts, top-3),
bfloat16 on CUDA and float32 on the CPU.

Usage: ``python bench/moe_layer_profile.py [--quick] [--device cuda|cpu]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit

from pipeline import MoEConfig, MoELayer


def timed(fn, x, device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    d, h, e, k = (64, 128, 8, 2) if args.quick else (512, 2048, 32, 3)
    sizes = (256,) if args.quick else (1024, 8192)
    reps = 5 if args.quick else 50
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = MoEConfig(input_dim=d, hidden_dim=h, output_dim=d, num_experts=e, top_k_experts=k,
                    expert_type="standard")
    results: dict = {}
    references: dict = {}
    ratios: dict = {}
    torch.manual_seed(0)
    layer = MoELayer(cfg).to(device=device, dtype=dtype).eval()
    layer.gate.float()  # the router stays fp32
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    for n in sizes:
        x = torch.randn(n, d, device=device, dtype=dtype)
        with torch.no_grad():
            eager = timed(layer, x, device, reps)
            with profile(activities=activities) as prof:
                layer(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            events = prof.key_averages()
            if device.type == "cuda":
                kernels = [ev for ev in events if ev.device_time_total > 0
                           and not ev.key.startswith("aten::")]
                results[f"kernels_per_fwd_{n}"] = sum(ev.count for ev in kernels)
                results[f"device_us_per_fwd_{n}"] = round(
                    sum(ev.device_time_total for ev in kernels), 1)
            else:
                results[f"aten_ops_per_fwd_{n}"] = sum(
                    ev.count for ev in events if ev.key.startswith("aten::"))
            references[f"eager_us_per_fwd_{n}"] = round(eager, 1)
            modes = ["default"] + (["reduce-overhead"] if device.type == "cuda" else [])
            for mode in modes:
                torch._dynamo.reset()
                compiled = torch.compile(layer, mode=mode)
                us = timed(compiled, x, device, reps)
                results[f"compiled_{mode}_us_per_fwd_{n}"] = round(us, 1)
                ratios[f"compiled_{mode}_vs_eager_{n}"] = eager / us
    return emit("moe_layer_profile", device,
                {"d": d, "hidden": h, "experts": e, "top_k": k, "dtype": str(dtype),
                 "sizes": list(sizes), "quick": args.quick}, results, references, ratios, {},
                note="kernels: device kernels of one forward (CUDA); aten ops on the CPU")


if __name__ == "__main__":
    main()
    sys.exit(0)
