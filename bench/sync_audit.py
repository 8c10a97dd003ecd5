"""Audit: no host-device sync in the MoE layer's or the system's forward (and backward).

Each case builds a layer or system, calls it twice to warm up, synchronises, then calls it
once under ``torch.cuda.set_sync_debug_mode("error")``, where a sync raises; the message and
the innermost ``pipeline/`` frames are recorded. Forward in eval (no grad) and train mode,
backward separately: every gate, shared experts, capacity dispatch, expert types, balance
losses, pooling and constraints, bf16, the base and the compiled system. Torch warns that
the debug mode does not catch every sync, so a clean audit is strong evidence, not proof.

Usage: ``python bench/sync_audit.py OUT.json`` on a CUDA machine (``DEV=cpu`` only runs the
cases, checking nothing: a smoke test).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: F401  (takes bench/ off sys.path: bench/pipeline.py would shadow the package)

from pipeline import MoEConfig, MoELayer
from pipeline.moe.layer import RoutingConstraint

DEV = os.environ.get("DEV", "cuda")
CUDA = DEV == "cuda"


def where(exc: BaseException) -> list[str]:
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f"{f.filename.split('.gpusnap/')[-1]}:{f.lineno} {f.name}: {f.line}" for f in frames
            if "pipeline/" in f.filename]
    return mine[-4:]


def under_error(fn):
    if not CUDA:
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as e:
        return e
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check(name: str, make, call, backward: bool = True) -> dict:
    rec: dict = {"case": name}
    try:
        obj = make()
        for _ in range(2):
            call(obj)
        if CUDA:
            torch.cuda.synchronize()
    except Exception as e:
        rec["setup_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return rec
    err = under_error(lambda: call(obj))
    rec["fwd_sync"] = err is not None
    if err is not None:
        rec["fwd_error"] = str(err).splitlines()[0][:300]
        rec["fwd_where"] = where(err)
    if backward and isinstance(obj, torch.nn.Module) and obj.training:
        out = {}

        def fwd_keep():
            y, aux = call(obj)
            out["l"] = y.float().pow(2).mean() + aux.loss

        try:
            fwd_keep()  # outside error mode
            if CUDA:
                torch.cuda.synchronize()
            err = under_error(lambda: out["l"].backward())
            rec["bwd_sync"] = err is not None
            if err is not None:
                rec["bwd_error"] = str(err).splitlines()[0][:300]
                rec["bwd_where"] = where(err)
        except Exception as e:
            rec["bwd_setup_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return rec


def layer_case(cfg_kw: dict, train: bool, dtype: torch.dtype, extra: str = "") -> tuple:
    base = dict(input_dim=64, hidden_dim=128, output_dim=64, num_experts=8, top_k_experts=2,
                cur_rank=8)
    kw = {**base, **cfg_kw}
    if dtype == torch.bfloat16:
        kw["dtype"] = "bfloat16"  # the layer's own parameter dtype (router stays float32)
    name = ",".join(f"{k}={v}" for k, v in cfg_kw.items()) + f"|{'train' if train else 'eval'}" \
        + f"|{str(dtype).split('.')[-1]}" + (f"|{extra}" if extra else "")

    def make():
        m = MoELayer(MoEConfig(**kw)).to(DEV)
        return m.train(train)

    x = torch.randn(4, 32, 64, device=DEV, dtype=dtype)
    allowed = torch.zeros(4, 8, dtype=torch.bool, device=DEV)
    allowed[:, :4] = True
    allowed[2:, 4:] = True

    def call(m):
        kwargs = {}
        if extra == "pool":
            kwargs["pool"] = True
        if extra == "constraint":
            kwargs["constraint"] = RoutingConstraint(allowed)
        if extra == "token_ids":
            kwargs["token_ids"] = torch.randint(0, 1000, (4, 32), device=DEV)
        if train:
            return m(x, **kwargs)
        with torch.no_grad():
            return m(x, **kwargs)

    return name, make, call


def main() -> None:
    t0 = time.time()
    results = []
    cases: list[tuple[dict, str]] = []
    for gate in ("topk", "noisy_topk", "expert_choice", "soft", "hash", "random"):
        cases.append(({"gate_type": gate}, ""))
    cases.append(({"gate_type": "switch", "top_k_experts": 1}, ""))
    cases.append(({"gate_type": "switch", "top_k_experts": 1, "jitter_noise": 0.01}, ""))
    cases.append(({"gate_type": "hash"}, "token_ids"))
    for gate in ("topk", "switch", "hash", "random", "noisy_topk"):
        kw = {"gate_type": gate, "num_shared_experts": 1}
        if gate == "switch":
            kw["top_k_experts"] = 1
        cases.append((kw, ""))
    for disp in ("capacity",):
        for gate in ("topk", "switch", "hash", "random"):
            kw = {"gate_type": gate, "dispatch": disp}
            if gate == "switch":
                kw["top_k_experts"] = 1
            cases.append((kw, ""))
    for et in ("gated", "cur"):
        cases.append(({"gate_type": "topk", "expert_type": et}, ""))
    for bl in ("none", "group", "aux_free"):
        kw = {"gate_type": "topk", "balance_loss": bl}
        if bl == "group":
            kw["num_expert_groups"] = 2
        cases.append((kw, ""))
    cases.append(({"gate_type": "topk"}, "pool"))
    cases.append(({"gate_type": "topk"}, "constraint"))
    cases.append(({"gate_type": "topk", "dispatch": "capacity"}, "constraint"))
    for (kw, extra), train in itertools.product(cases, (False, True)):
        results.append(check(*layer_case(kw, train, torch.float32, extra)))
    # bf16 for the main gates
    for gate in ("topk", "expert_choice", "soft", "hash"):
        for train in (False, True):
            results.append(check(*layer_case({"gate_type": gate}, train, torch.bfloat16)))

    # the whole system
    from pipeline.moe.optimized import FullyOptimizedMoESystem
    from pipeline.moe.system import MixtureOfExpertsSystem
    cons = {"a": [0, 1], "b": [2, 3], "c": [4, 5], "d": [6, 7]}
    sys_kw = dict(input_dim=64, hidden_dim=128, output_dim=64, num_experts=8, top_k_experts=2,
                  num_layers=2)
    xs = torch.randn(16, 64, device=DEV)
    for label, kw in (("system", dict(constellations=cons)), ("system_noconst", {})):
        def mk(kw=kw):
            return MixtureOfExpertsSystem(MoEConfig(**sys_kw, **kw, use_compile=False,
                                                    use_amp=False)).to(DEV).eval()

        def fwd(s):
            with torch.no_grad():
                return s(xs)

        def draft(s):
            with torch.no_grad():
                return s.draft_reports(xs)
        results.append(check(f"{label}.forward|eval", mk, fwd, backward=False))
        results.append(check(f"{label}.draft_reports|eval", mk, draft, backward=False))
    for mode in (("default", "reduce-overhead") if CUDA else ()):
        def mkf(mode=mode):
            return FullyOptimizedMoESystem(MoEConfig(**sys_kw, constellations=cons,
                                                     use_compile=True, compile_mode=mode,
                                                     use_amp=True)).to(DEV).eval()

        def fwdf(s):
            with torch.no_grad():
                return s(xs)
        results.append(check(f"FullyOptimizedMoESystem[{mode}].forward|eval", mkf, fwdf,
                             backward=False))

    # compiled layer
    for mode in (("default",) if CUDA else ()):
        def mkc(mode=mode):
            torch._dynamo.reset()
            m = MoELayer(MoEConfig(input_dim=64, hidden_dim=128, output_dim=64, num_experts=8,
                                   top_k_experts=2)).to(DEV).eval()
            return torch.compile(m, mode=mode)

        def callc(m):
            with torch.no_grad():
                return m(torch.randn(4, 32, 64, device=DEV))
        results.append(check(f"compiled MoELayer[{mode}] topk|eval", mkc, callc, backward=False))

    summary = {
        "device": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__,
        "n_cases": len(results),
        "fwd_syncing": [r["case"] for r in results if r.get("fwd_sync")],
        "bwd_syncing": [r["case"] for r in results if r.get("bwd_sync")],
        "setup_errors": [r["case"] for r in results if "setup_error" in r],
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(summary, indent=1))
    with open(sys.argv[1], "w") as f:
        json.dump({"summary": summary, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
