"""Benchmark: the MoE layer against the ways MoE blocks are usually written, same weights.

Everything is measured side by side on the same weights and the same tokens (interleaved
rounds, medians; CUDA events on the GPU):

* the seed configuration users quote (d=512, hidden=2048, 32 experts, top-3) on 8 x 128 and
  8,192 tokens: ours (`MoELayer`, dropless) forward and forward + backward against a readable
  loop over experts (same FLOPs) and a masked dense block (E/k times the FLOPs), and the
  roofline: the best dense GEMM of the same FLOPs (``torch.mm``; oneDNN's linear on x86);
* transformers' Qwen3-MoE sparse block under each experts implementation that runs ("eager";
  "grouped_mm"; "batched_mm" where its per-assignment weight copies fit in memory, never on
  the CPU), a straight sort + ``F.grouped_mm`` MoE, and Liger's fused SiLU-mul in the latter
  when liger_kernel imports: all gated (SwiGLU, as theirs are) at the seed dimensions, with
  the ratio of ours to the fastest transformers implementation (target 1.25);
* on CUDA also: ours eager, compiled and CUDA-graphed, on the Triton kernels and on the torch
  path; the Qwen3-30B-A3B expert shape (E=128, top-8, d=2048, h=768, 32k tokens) with router
  routing, forced-balanced routing (the ceiling) and Zipf-skewed routing, in TFLOP/s and as a
  fraction of the dense GEMM; decode (1-64 tokens) under CUDA graphs against the HBM floor
  (the bytes of the experts the tokens touch, at the bandwidth of a device-to-device copy).

With ``--busy-neighbour`` every comparison is timed twice in each round, once quiet and once
while a second process burns one core (a plain Python loop), the two calls back to back so
that both see the same machine: the figures of the second carry a ``_busy`` suffix. This is
what a routing worker meets when its pool or a librarian shares its cores.

Usage: ``python bench/moe_layer.py [--quick] [--device cuda] [--dtype bfloat16]
[--busy-neighbour] [--sections loop,hf] [--sizes 8x128,8192]``
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_refs  # imports common first, which then takes bench/ off sys.path
from common import emit, interleaved, interleaved_rounds, target

from pipeline import MoEConfig, MoELayer
from pipeline.moe import dispatch, kernels
from pipeline.moe.balancing import expert_counts
from pipeline.moe.cpu import onednn_available, onednn_dtypes
from pipeline.moe.gating import TokenChoice
from pipeline.moe.grouped_mm import activation_fn

SEED = dict(input_dim=512, hidden_dim=2048, output_dim=512, num_experts=32, top_k_experts=3)
QWEN3 = dict(input_dim=2048, hidden_dim=768, output_dim=2048, num_experts=128, top_k_experts=8,
             expert_type="gated")
DECODE = (1, 2, 4, 8, 16, 32, 64)


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


def timed(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device,
          reps: int = 1, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call, implementations taking turns every round. On CUDA each
    round times ``reps`` back-to-back calls with events (a host sync per call would
    dominate small ones)."""
    if device.type != "cuda":
        return interleaved(fns, rounds, device, warmup=warmup)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / reps)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def quantiles(values: list[float]) -> dict[str, float]:
    """Min, quartiles and max, rounded: the spread of a ratio over rounds."""
    if len(values) == 1:
        values = values * 2
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"min": round(min(values), 3), "q1": round(q1, 3), "median": round(q2, 3),
            "q3": round(q3, 3), "max": round(max(values), 3)}


class OthersLoad:
    """How busy the rest of the machine kept its CPUs while a block ran: CPU time used by
    everything but this process, as a share of wall time x CPUs (Linux /proc/stat; None
    elsewhere). What the 1-minute load average cannot say, since it counts us too."""

    def __enter__(self) -> OthersLoad:
        self.share: float | None = None
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._snapshot()
        if end is not None and self._start is not None:
            wall, busy, own = (b - a for a, b in zip(self._start, end, strict=True))
            self.share = round(max(0.0, busy - own) / (wall * (os.cpu_count() or 1)), 3)

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system, then irq softirq steal (idle and iowait are not busy)
        busy = (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, usage.ru_utime + usage.ru_stime


BUSY = "@busy"  # the suffix of a function's name when it runs beside the neighbour
CONDITIONS = (("", ""), (BUSY, "_busy"))  # (function-name suffix, record-key suffix)


# The neighbour dies with the bench, even while stopped: Linux's parent-death signal where
# libc's prctl is there, else its own check that its parent is still the bench.
_BURN = """
import ctypes, os, signal
parent = os.getppid()
try:
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


class BusyNeighbour:
    """A second process burning one core, a plain Python loop, that runs only while a call
    wrapped by `beside` runs (stopped by SIGSTOP otherwise) and is killed on exit."""

    def __enter__(self) -> BusyNeighbour:
        self._proc = subprocess.Popen([sys.executable, "-c", _BURN])
        os.kill(self._proc.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.kill()
        self._proc.wait()

    def beside(self, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            os.kill(self._proc.pid, signal.SIGCONT)
            try:
                return fn()
            finally:
                os.kill(self._proc.pid, signal.SIGSTOP)
        return run


def with_neighbour(fns: dict[str, Callable[[], object]], neighbour: BusyNeighbour | None,
                   ) -> dict[str, Callable[[], object]]:
    """``fns`` and, with a neighbour, each also beside it (named ``name@busy``), every pair
    back to back so that the two conditions take turns within each round."""
    if neighbour is None:
        return fns
    return {k: v for name, fn in fns.items()
            for k, v in ((name, fn), (name + BUSY, neighbour.beside(fn)))}


def conditions(neighbour: BusyNeighbour | None) -> tuple[tuple[str, str], ...]:
    return CONDITIONS if neighbour is not None else CONDITIONS[:1]


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
        kernels_: dict[str, Callable[[], object]] = {
            f"torch.mm_{side}": lambda a=a, b=b, out=out: torch.mm(a, b, out=out)}
        if device.type == "cpu" and onednn_available() and dtype in onednn_dtypes():
            kernels_[f"onednn_linear_{side}"] = lambda a=a, b=b: (
                torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
        secs = timed(kernels_, rounds, device, reps=5)
        rates.update({name: 2 * side**3 / t for name, t in secs.items()})
    best = max(rates, key=rates.__getitem__)
    return rates[best], best


def cuda_graph(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], None]:
    """``fn(x)`` captured once (after warm-up on a side stream) and replayed."""
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(static)
    return graph.replay


def twins(cfg: MoEConfig, device: torch.device) -> tuple[MoELayer, MoELayer]:
    """One layer on the Triton kernels and one on the torch path, the same weights."""
    with torch.device(device):
        ours = MoELayer(cfg).eval()
        torch_path = MoELayer(dataclasses.replace(cfg, kernels="torch")).eval()
    torch_path.load_state_dict(ours.state_dict())
    return ours, torch_path


def no_grad(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn(x)
    return run


# -- section 1: ours against a loop over experts and a masked dense block --------------------
def measure(layer: MoELayer, tokens: int, rounds: int, device: torch.device,
            dtype: torch.dtype, with_masked: bool,
            neighbour: BusyNeighbour | None = None) -> dict[str, float]:
    cfg = layer.config
    x = torch.randn(tokens, cfg.input_dim, device=device, dtype=dtype)

    def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            xg = x.detach().requires_grad_()
            fn(xg).float().pow(2).mean().backward()
        return run

    ours = lambda t: layer(t)[0]  # noqa: E731
    loop = lambda t: loop_over_experts(layer, t)  # noqa: E731
    layer.eval()
    fns = {"ours_fwd": no_grad(ours, x), "loop_fwd": no_grad(loop, x)}
    if with_masked:
        fns["masked_fwd"] = no_grad(lambda t: masked_dense(layer, t), x)
    out = timed(with_neighbour(fns, neighbour), rounds, device)
    layer.train()
    out.update(timed(with_neighbour({"ours_fwdbwd": fwd_bwd(ours), "loop_fwdbwd": fwd_bwd(loop)},
                                    neighbour), max(1, rounds // 2 + 1), device))
    layer.eval()
    return out


def loop_section(cfg: MoEConfig, sizes: dict[str, int], rounds: int, device: torch.device,
                 dtype: torch.dtype, rec: dict[str, dict],
                 neighbour: BusyNeighbour | None = None) -> None:
    with torch.device(device):
        layer = MoELayer(cfg)
    res, refs, ratios, targets = rec["results"], rec["references"], rec["ratios"], rec["targets"]
    for label, tokens in sizes.items():
        secs = measure(layer, tokens, rounds, device, dtype,
                       with_masked=(label in ("8x128", "small")), neighbour=neighbour)
        flops = expert_flops(cfg, tokens)
        peak, kernel = roofline(flops, device, dtype, rounds)
        rec["roofline"][label] = peak
        refs[f"roofline_fwd_tokens_per_s_{label}"] = round(tokens * peak / flops, 1)
        refs[f"roofline_gflops_{label}"] = round(peak / 1e9, 1)
        refs[f"roofline_kernel_{label}"] = kernel
        for fn_suffix, key in conditions(neighbour):
            rate = {k.removesuffix(fn_suffix): tokens / v for k, v in secs.items()
                    if (k.endswith(BUSY) if fn_suffix else not k.endswith(BUSY))}
            tag = f"{label}{key}"
            res[f"ours_fwd_tokens_per_s_{tag}"] = round(rate["ours_fwd"], 1)
            res[f"ours_fwdbwd_tokens_per_s_{tag}"] = round(rate["ours_fwdbwd"], 1)
            refs[f"loop_over_experts_fwd_tokens_per_s_{tag}"] = round(rate["loop_fwd"], 1)
            refs[f"loop_over_experts_fwdbwd_tokens_per_s_{tag}"] = round(rate["loop_fwdbwd"], 1)
            ratios[f"ours_vs_loop_fwd_{tag}"] = rate["ours_fwd"] / rate["loop_fwd"]
            ratios[f"ours_vs_loop_fwdbwd_{tag}"] = rate["ours_fwdbwd"] / rate["loop_fwdbwd"]
            targets[f"ours_vs_loop_fwd_{tag}"] = target(1.25, ratios[f"ours_vs_loop_fwd_{tag}"])
            if "masked_fwd" in rate:
                refs[f"masked_dense_fwd_tokens_per_s_{tag}"] = round(rate["masked_fwd"], 1)
                ratios[f"ours_vs_masked_fwd_{tag}"] = rate["ours_fwd"] / rate["masked_fwd"]
                targets[f"ours_vs_masked_fwd_{tag}"] = target(
                    5.0, ratios[f"ours_vs_masked_fwd_{tag}"])
            res[f"ours_fwd_gflops_{tag}"] = round(flops * rate["ours_fwd"] / tokens / 1e9, 1)
            ratios[f"ours_vs_roofline_fwd_{tag}"] = rate["ours_fwd"] * flops / tokens / peak
            if label in ("8192", "large") and device.type == "cpu":
                targets[f"ours_vs_roofline_fwd_{tag}"] = target(
                    0.75, ratios[f"ours_vs_roofline_fwd_{tag}"])


# -- section 2: transformers' Qwen3-MoE block and a straight grouped_mm MoE ------------------
def hf_section(cfg: MoEConfig, sizes: dict[str, int], rounds: dict[str, int],
               device: torch.device, dtype: torch.dtype, rec: dict[str, dict],
               neighbour: BusyNeighbour | None = None) -> None:
    """Ours (gated, top-k) against transformers' block on our weights, full forward."""
    with torch.device(device):
        layer = MoELayer(cfg).eval()
    block = moe_refs.hf_qwen3(layer, device, dtype)
    straight, _ = moe_refs.grouped_mm_moe(layer, dtype)
    silu_mul = moe_refs.liger_silu_mul()
    res = rec["results"]
    rec["notes"]["liger_kernel"] = ("fused SiLU-mul inside the grouped_mm MoE" if silu_mul
                                    else "not importable: skipped")
    for label, tokens in sizes.items():
        x = torch.randn(tokens, cfg.input_dim, device=device, dtype=dtype)
        hf = {f"hf_qwen3_{impl}": moe_refs.hf_forward(block, impl)
              for impl in ("eager", "grouped_mm", "batched_mm")}
        copies = moe_refs.hf_batched_bytes(tokens, layer, dtype)
        if device.type != "cuda":
            del hf["hf_qwen3_batched_mm"]
            rec["notes"]["hf_qwen3_batched_mm"] = "not run on the CPU (weights copied per token)"
        elif copies > torch.cuda.mem_get_info(device)[0] // 2:
            del hf["hf_qwen3_batched_mm"]  # its per-assignment weight copies would not fit
            rec["notes"][f"hf_qwen3_batched_mm_{label}"] = f"skipped: {copies / 2**30:.0f} GiB"
        with torch.no_grad():
            want = layer(x)[0].float()
            for name, fn in hf.items():
                got = fn(x).float()
                res[f"max_abs_diff_ours_vs_{name}_{label}"] = float((got - want).abs().max())
        fns = {"ours": no_grad(lambda t: layer(t)[0], x),
               **{name: no_grad(fn, x) for name, fn in hf.items()},
               "grouped_mm_moe": no_grad(straight, x)}
        if silu_mul is not None:
            fns["grouped_mm_moe_liger"] = no_grad(moe_refs.grouped_mm_moe(layer, dtype,
                                                                          silu_mul)[0], x)
        if device.type == "cuda":
            fns["ours_cuda_graph"] = cuda_graph(lambda t: layer(t)[0], x)
        fns = with_neighbour(fns, neighbour)
        # Three warm-up calls each: on the CPU the first calls of a size fault in fresh pages
        # for their temporaries (seen here: 3.4 s, 2.2 s, then 0.6 s for ours at 8,192).
        per_round = None
        with OthersLoad() as load:
            if device.type == "cuda":
                secs = timed(fns, rounds[label], device, reps=10, warmup=3)
            else:
                per_round = interleaved_rounds(fns, rounds[label], device, warmup=3)
                secs = {k: statistics.median(ts) for k, ts in per_round.items()}
        rec["load"][label] = {"others_cpu_share": load.share,
                              "loadavg_1min_after": round(os.getloadavg()[0], 2)}
        for fn_suffix, key in conditions(neighbour):
            hf_record(cfg, label, tokens, fn_suffix, key, secs, per_round, rec)


def hf_record(cfg: MoEConfig, label: str, tokens: int, fn_suffix: str, key: str,
              secs: dict[str, float], per_round: dict[str, list[float]] | None,
              rec: dict[str, dict]) -> None:
    """One condition's figures of `hf_section`: the functions named ``*{fn_suffix}``, the
    record's keys ending ``{label}{key}``."""
    res, refs, ratios, targets = rec["results"], rec["references"], rec["ratios"], rec["targets"]
    mine = (lambda k: k.endswith(BUSY)) if fn_suffix else (lambda k: not k.endswith(BUSY))
    rate = {k.removesuffix(fn_suffix): tokens / v for k, v in secs.items() if mine(k)}
    tag = f"{label}{key}"
    flops = expert_flops(cfg, tokens)
    for name, r in rate.items():
        book = res if name.startswith("ours") else refs
        book[f"gated_{name}_fwd_tokens_per_s_{tag}"] = round(r, 1)
        book[f"gated_{name}_fwd_tflops_{tag}"] = round(flops * r / tokens / 1e12, 4)
    hf_best = max((n for n in rate if n.startswith("hf_")), key=rate.__getitem__)
    refs[f"hf_fastest_impl_{tag}"] = hf_best
    best_ours = max(rate["ours"], rate.get("ours_cuda_graph", 0.0))
    ratios[f"ours_vs_hf_fastest_fwd_{tag}"] = best_ours / rate[hf_best]
    ratios[f"ours_vs_grouped_mm_moe_fwd_{tag}"] = best_ours / rate["grouped_mm_moe"]
    for impl in ("eager", "grouped_mm"):
        ratios[f"ours_vs_hf_{impl}_fwd_{tag}"] = best_ours / rate[f"hf_qwen3_{impl}"]
    targets[f"ours_vs_hf_fastest_fwd_{tag}"] = target(
        1.25, ratios[f"ours_vs_hf_fastest_fwd_{tag}"])
    if per_round is not None:  # each round's ratio, the two calls seconds apart
        rec["spread"][f"ours_vs_hf_fastest_fwd_{tag}"] = quantiles(
            [h / o for h, o in zip(per_round[hf_best + fn_suffix], per_round["ours" + fn_suffix],
                                   strict=True)])


# -- section 3 (CUDA): ours eager / compiled / CUDA graph, Triton kernels / torch path --------
def modes_section(cfg: MoEConfig, sizes: dict[str, int], rounds: int, device: torch.device,
                  dtype: torch.dtype, rec: dict[str, dict]) -> None:
    ours, torch_path = twins(cfg, device)
    compiled = torch.compile(ours)
    res, ratios, targets = rec["results"], rec["ratios"], rec["targets"]
    for label, tokens in sizes.items():
        x = torch.randn(tokens, cfg.input_dim, device=device, dtype=dtype)
        fns = {"triton_eager": no_grad(lambda t: ours(t)[0], x),
               "torch_eager": no_grad(lambda t: torch_path(t)[0], x),
               "triton_compiled": no_grad(lambda t: compiled(t)[0], x),
               "triton_cuda_graph": cuda_graph(lambda t: ours(t)[0], x),
               "torch_cuda_graph": cuda_graph(lambda t: torch_path(t)[0], x)}
        secs = timed(fns, rounds, device, reps=10)
        flops = expert_flops(cfg, tokens)
        for name, s in secs.items():
            res[f"ours_{name}_fwd_tokens_per_s_{label}"] = round(tokens / s, 1)
            res[f"ours_{name}_fwd_tflops_{label}"] = round(flops / s / 1e12, 2)
        best = min(secs, key=secs.__getitem__)
        res[f"ours_best_mode_{label}"] = best
        peak = rec["roofline"][label]
        ratios[f"ours_best_vs_roofline_fwd_{label}"] = flops / secs[best] / peak
        ratios[f"triton_vs_torch_path_fwd_{label}"] = secs["torch_eager"] / secs["triton_eager"]
        if label == "8192":
            targets[f"ours_best_vs_roofline_fwd_{label}"] = target(
                0.6, ratios[f"ours_best_vs_roofline_fwd_{label}"])
        if label == "8x128":
            seqs = tokens / secs[best] / 128
            res["ours_fwd_sequences_per_s_8x128"] = round(seqs, 1)
            targets["ours_fwd_sequences_per_s_8x128"] = target(50_000, seqs)


# -- section 4 (CUDA): the Qwen3-30B-A3B expert shape, routed, balanced and skewed ----------
def qwen3_section(tokens: int, rounds: int, device: torch.device, dtype: torch.dtype,
                  rec: dict[str, dict]) -> None:
    cfg = MoEConfig(**QWEN3, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    ours, torch_path = twins(cfg, device)
    block = moe_refs.hf_qwen3(ours, device, dtype)
    _, straight = moe_refs.grouped_mm_moe(ours, dtype)
    x = torch.randn(tokens, cfg.input_dim, device=device, dtype=dtype)
    flops = expert_flops(cfg, tokens)
    peak, kernel = roofline(flops, device, dtype, rounds)
    res, refs, ratios, targets = rec["results"], rec["references"], rec["ratios"], rec["targets"]
    refs["qwen3_roofline_tflops"], refs["qwen3_roofline_kernel"] = round(peak / 1e12, 1), kernel
    with torch.no_grad():
        routed = ours.gate(x)
    routings = {"routed": (routed.expert_ids, routed.weights)}
    for mode in ("balanced", "skewed"):
        routings[mode] = moe_refs.forced_routing(tokens, cfg.num_experts, cfg.top_k_experts,
                                                 mode, device)
    for mode, (ids, w) in routings.items():
        counts = expert_counts(ids, cfg.num_experts)
        res[f"qwen3_{mode}_max_over_mean_load"] = round(float(counts.max() / counts.mean()), 2)
        tc = TokenChoice(ids, w, None, None)
        fns = {
            "ours_triton": lambda x=x, ids=ids, w=w: kernels.dropless(x, ids, w, ours.experts),
            "ours_torch": lambda x=x, tc=tc, c=counts: dispatch.dropless(x, tc, ours.experts, c),
            "grouped_mm_moe": lambda x=x, ids=ids, w=w: straight(x, ids, w),
            "hf_qwen3_grouped_mm": lambda x=x, ids=ids, w=w: moe_refs.hf_experts(
                block, "grouped_mm")(x, ids, w),
        }
        if mode == "routed":
            fns["hf_qwen3_eager"] = lambda x=x, ids=ids, w=w: moe_refs.hf_experts(
                block, "eager")(x, ids, w)
        with torch.no_grad():
            secs = timed({k: no_grad(lambda _t, f=f: f(), x) for k, f in fns.items()},
                         rounds, device, reps=3)
        for name, s in secs.items():
            book = res if name.startswith("ours") else refs
            book[f"qwen3_{mode}_{name}_experts_tflops"] = round(flops / s / 1e12, 1)
            ratios[f"qwen3_{mode}_{name}_vs_roofline"] = flops / s / peak
        ratios[f"qwen3_{mode}_triton_vs_hf_grouped_mm"] = (secs["hf_qwen3_grouped_mm"]
                                                           / secs["ours_triton"])
    # The whole layer (router, prologue, aux statistics) on router routing.
    secs = timed({"layer_triton": no_grad(lambda t: ours(t)[0], x),
                  "layer_triton_cuda_graph": cuda_graph(lambda t: ours(t)[0], x),
                  "layer_torch": no_grad(lambda t: torch_path(t)[0], x)}, rounds, device, reps=3)
    for name, s in secs.items():
        res[f"qwen3_{name}_fwd_tflops"] = round(flops / s / 1e12, 1)
    best = max(res["qwen3_routed_ours_triton_experts_tflops"],
               res["qwen3_layer_triton_cuda_graph_fwd_tflops"])
    targets["qwen3_ours_fwd_tflops"] = target(400.0, best)


# -- section 5 (CUDA): decode under CUDA graphs against the HBM floor ------------------------
def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    secs = timed({"copy": lambda: b.copy_(a)}, 5, device, reps=5)["copy"]
    return 2 * a.numel() / secs


def decode_section(shapes: dict[str, dict], rounds: int, device: torch.device,
                   dtype: torch.dtype, rec: dict[str, dict]) -> None:
    bw = copy_bandwidth(device)
    res, refs, targets = rec["results"], rec["references"], rec["targets"]
    refs["hbm_copy_bandwidth_gb_s"] = round(bw / 1e9, 1)
    size = torch.finfo(dtype).bits // 8
    for shape, fields_ in shapes.items():
        cfg = MoEConfig(**fields_, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
        ours, torch_path = twins(cfg, device)
        mats = 3 if cfg.expert_type == "gated" else 2
        per_expert = mats * cfg.hidden_dim * cfg.input_dim * size
        for tokens in DECODE:
            x = torch.randn(tokens, cfg.input_dim, device=device, dtype=dtype)
            with torch.no_grad():
                hit = int(torch.unique(ours.gate(x).expert_ids).numel())  # outside the timing
            floor = (hit * per_expert + cfg.num_experts * cfg.input_dim * 4
                     + 2 * tokens * cfg.input_dim * size) / bw
            secs = timed({"triton": cuda_graph(lambda t, m=ours: m(t)[0], x),
                          "torch": cuda_graph(lambda t, m=torch_path: m(t)[0], x)},
                         rounds, device, reps=50)
            key = f"decode_{shape}_{tokens}"
            refs[f"{key}_hbm_floor_us"] = round(floor * 1e6, 2)
            for name, s in secs.items():
                res[f"{key}_{name}_cuda_graph_us"] = round(s * 1e6, 2)
            targets[f"{key}_floor_over_time"] = target(0.5, floor / secs["triton"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--expert-type", default="standard", choices=["standard", "gated"])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--busy-neighbour", action="store_true",
                   help="also time every comparison beside a process burning one core")
    p.add_argument("--sizes", default=None,
                   help="comma-separated token-count labels to run (default all: 8x128,8192; "
                        "with --quick small,large)")
    p.add_argument("--sections", default="loop,hf",
                   help="comma-separated: loop (ours against a loop over experts and a "
                        "masked block), hf (against transformers' blocks); CUDA sections run "
                        "on CUDA regardless")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    sections = set(args.sections.split(","))
    if sections - {"loop", "hf"}:
        p.error(f"--sections: unknown {', '.join(sorted(sections - {'loop', 'hf'}))}")
    torch.manual_seed(0)
    if args.quick:
        dims = dict(input_dim=64, hidden_dim=128, output_dim=64, num_experts=8, top_k_experts=2)
        sizes, rounds = {"small": 64, "large": 256}, args.rounds or 2
        hf_rounds = dict.fromkeys(sizes, rounds)
    else:
        dims = SEED
        sizes, rounds = {"8x128": 8 * 128, "8192": 8192}, args.rounds or (15 if cuda else 7)
        # More rounds on the CPU than one would think: other jobs on a shared 2-core machine
        # make single rounds swing 3x either way (see ``spread`` and ``load`` in the record).
        hf_rounds = {"8x128": args.rounds or (15 if cuda else 21),
                     "8192": args.rounds or 15}
    if args.sizes:
        wanted = args.sizes.split(",")
        if set(wanted) - set(sizes):
            p.error(f"--sizes: choose from {', '.join(sizes)}")
        sizes = {k: v for k, v in sizes.items() if k in wanted}
        hf_rounds = {k: v for k, v in hf_rounds.items() if k in wanted}
    cfg = MoEConfig(**dims, expert_type=args.expert_type, dtype=args.dtype)
    rec: dict[str, dict] = {k: {} for k in ("results", "references", "ratios", "targets",
                                            "notes", "roofline", "spread", "load")}
    rec["load"]["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    with contextlib.ExitStack() as stack:
        neighbour = stack.enter_context(BusyNeighbour()) if args.busy_neighbour else None
        if "loop" in sections or cuda:  # the CUDA sections read its roofline
            loop_section(cfg, sizes, rounds, device, dtype, rec, neighbour)
        if "hf" in sections:
            gated = MoEConfig(**dims, expert_type="gated", dtype=args.dtype)
            hf_section(gated, sizes, hf_rounds, device, dtype, rec, neighbour)
    rec["load"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    if cuda and not args.quick:
        modes_section(cfg, sizes, rounds, device, dtype, rec)
        qwen3_section(32 * 1024, rounds, device, dtype, rec)
        decode_section({"seed": dict(SEED, expert_type=args.expert_type), "qwen3": QWEN3},
                       rounds, device, dtype, rec)
    elif cuda:
        modes_section(cfg, sizes, rounds, device, dtype, rec)
    config = {**{k: v for k, v in cfg.to_dict().items() if k in (
        "input_dim", "hidden_dim", "output_dim", "num_experts", "top_k_experts", "expert_type",
        "activation", "gate_type", "dispatch", "kernels", "dtype")}, "tokens": sizes,
        "rounds": rounds, "hf_rounds": hf_rounds, "quick": args.quick,
        "busy_neighbour": args.busy_neighbour, "sections": sorted(sections),
        "kernels_active": kernels.applies(torch.empty(0, device=device))}
    if cuda and not args.quick:
        config["qwen3"] = {**QWEN3, "tokens": 32 * 1024}
        config["decode_tokens"] = list(DECODE)
    return emit("moe_layer", device, config, rec["results"], rec["references"], rec["ratios"],
                rec["targets"], notes=rec["notes"], spread=rec["spread"], load=rec["load"],
                flops_fwd={k: expert_flops(cfg, t) for k, t in sizes.items()},
                note="flops count routed expert matmuls only; ratios are medians of "
                     "interleaved rounds on the same weights and inputs; 'gated_*' entries "
                     "are SwiGLU experts at the same dims (transformers' blocks are gated); "
                     "'_busy' entries were timed beside a process burning one core, each "
                     "call right after its quiet twin; loadavg_* are os.getloadavg() at the "
                     "start and end (1, 5, 15 minutes)")


if __name__ == "__main__":
    main()
    sys.exit(0)
