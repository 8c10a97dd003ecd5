"""The Triton kernels of `pipeline.moe.kernels` against the readable torch path.

Each test runs on the CPU under Triton's interpreter and natively on CUDA (``gpu``). Triton
interprets only if ``TRITON_INTERPRET=1`` is set before triton is first imported, and in a
full pytest run other modules import it first (torch._dynamo does); so
`tests/test_moe_kernels_interpreted.py` runs this file in a subprocess with the variable set,
and in a process without it the CPU cases skip. The references are the gate's and the
experts' maths written out here, and the layer's torch path (``kernels="torch"``).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the gpu/dev extras install triton")

from pipeline import MoEConfig, MoELayer
from pipeline.moe import kernels
from pipeline.moe.experts import Experts
from pipeline.moe.kernels import fused_experts, grouped_gemm
from pipeline.moe.layer import RoutingConstraint

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not kernels.interpreted(), reason="needs TRITON_INTERPRET=1 before triton is imported; "
        "tests/test_moe_kernels_interpreted.py runs these cases so")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        INTERPRET, reason="Triton is interpreting: native kernels are off in this process")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def _topk_reference(logits, k, bias=None, allowed=None, renormalize=True):
    """`TopKGate`'s maths: softmax over the allowed experts, top-k of probs + bias."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1)
    score = probs if bias is None else probs + bias
    if allowed is not None:
        score = score.masked_fill(~allowed, float("-inf"))
    ids = score.topk(k, -1).indices
    w = probs.gather(1, ids)
    return probs, ids, w / w.sum(-1, keepdim=True) if renormalize else w


def _check_plan(plan, ids, num_experts):
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
    assert torch.equal(plan.counts_E.long().cpu(), counts.cpu())
    assert torch.equal(plan.offsets_E.long().cpu(), counts.cumsum(0).cpu())
    rows, slots = plan.row_slot_N.long(), plan.slot_row_A.long()
    flat = ids.reshape(-1)
    assert torch.equal(slots[rows], torch.arange(flat.numel(), device=flat.device))
    assert torch.equal(flat[rows], flat[rows].sort().values)  # sorted by expert


ROUTES = {  # T, E, K, block_tokens (16 forces the two-kernel path past 2 blocks), extras
    "one-block": (10, 8, 2, None, {}),
    "one-kernel-two-blocks": (20, 6, 3, 16, {}),
    "two-kernels": (70, 6, 3, 16, {}),
    "qwen3-experts": (5, 128, 8, None, {}),
    "bias-and-allowed": (40, 8, 2, 16, {"bias": True, "allowed": True}),
    "switch": (33, 8, 1, 16, {"renormalize": False}),
}


@pytest.mark.parametrize("case", ROUTES, ids=list(ROUTES))
def test_routing_prologue_matches_the_top_k_gate(device, case):
    T, E, K, block, extra = ROUTES[case]
    logits = torch.randn(T, E, device=device)
    bias = torch.randn(E, device=device) * 0.1 if extra.get("bias") else None
    allowed = None
    if extra.get("allowed"):
        allowed = torch.rand(T, E, device=device) > 0.3
        allowed[:, :K] = True  # every token keeps at least K experts
    renorm = extra.get("renormalize", True)
    probs, ids, w, plan = fused_experts.route(logits, K, bias_E=bias, allowed_TE=allowed,
                                              renormalize=renorm, block_tokens=block,
                                              interpreted=kernels.interpreted())
    want_p, want_ids, want_w = _topk_reference(logits, K, bias, allowed, renorm)
    torch.testing.assert_close(probs, want_p, atol=1e-6, rtol=1e-5)
    assert torch.equal(ids, want_ids)  # descending order, as torch.topk's sorted output
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)
    _check_plan(plan, ids, E)


@pytest.mark.parametrize("block", [None, 16], ids=["one-kernel", "two-kernels"])
def test_a_nan_router_row_still_gets_a_whole_plan(device, block):
    """NaN logits give that token NaN weights (as the torch path does), distinct real
    experts and a plan that places every assignment; other tokens route as before."""
    T, E, K = 40, 8, 3
    logits = torch.randn(T, E, device=device)
    logits[3] = float("nan")
    logits[5, 2] = float("nan")
    probs, ids, w, plan = fused_experts.route(logits, K, block_tokens=block,
                                              interpreted=kernels.interpreted())
    assert int(ids.min()) >= 0 and int(ids.max()) < E
    assert all(len(set(row)) == K for row in ids.tolist())
    _check_plan(plan, ids, E)
    assert torch.isnan(w[3]).all() and torch.isnan(w[5]).all()
    clean = [t for t in range(T) if t not in (3, 5)]
    _, want_ids, want_w = _topk_reference(logits[clean], K)
    assert torch.equal(ids[clean], want_ids)
    torch.testing.assert_close(w[clean], want_w, atol=1e-6, rtol=1e-5)


def test_fewer_allowed_experts_than_k_still_picks_distinct_ones(device):
    allowed = torch.zeros(20, 8, dtype=torch.bool, device=device)
    allowed[:, 5] = True
    _, ids, w, plan = fused_experts.route(torch.randn(20, 8, device=device), 3,
                                          allowed_TE=allowed, interpreted=kernels.interpreted())
    assert all(len(set(row)) == 3 and row[0] == 5 for row in ids.tolist())
    _check_plan(plan, ids, 8)
    torch.testing.assert_close(w[:, 0], torch.ones(20, device=device))


def test_routing_backward_matches_autograd_through_the_gate_maths(device):
    logits = torch.randn(24, 8, device=device, requires_grad=True)
    c_p, c_w = torch.randn(24, 8, device=device), torch.randn(24, 3, device=device)
    probs, ids, w, _ = fused_experts.route(logits, 3, block_tokens=16,
                                           interpreted=kernels.interpreted())
    ((probs * c_p).sum() + (w * c_w).sum()).backward()
    ref = logits.detach().clone().requires_grad_()
    p = torch.softmax(ref, -1)
    q = p.gather(1, ids)
    ((p * c_p).sum() + (q / q.sum(-1, keepdim=True) * c_w).sum()).backward()
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-6, rtol=1e-5)


def test_plan_from_given_ids_sorts_every_assignment(device):
    ids = torch.stack([torch.randperm(7, device=device)[:3] for _ in range(37)])
    plan = fused_experts.plan_for(ids, 7, kernels.interpreted(), block_tokens=16)
    _check_plan(plan, ids, 7)


def _loop_reference(x, ids, w, ex):
    """Each assignment through its expert, written from the block's definition, fp32."""
    out = torch.zeros(x.shape[0], ex.output_dim, device=x.device)
    xf = x.float()
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            a = ex.w1[e].float() @ xf[t]
            if ex.expert_type == "gated":
                h = F.silu(a) * (ex.w3[e].float() @ xf[t])
            else:
                h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu,
                     "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[ex.activation](a)
            out[t] += w[t, j] * (ex.w2[e].float() @ h)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", [("standard", "gelu"), ("standard", "gelu_tanh"),
                                  ("standard", "relu"), ("gated", "silu")],
                         ids=lambda k: "-".join(k))
def test_grouped_gemms_with_fused_epilogues_match_a_loop(device, kind, dtype):
    T, D, H, O, E, K = 20, 24, 40, 24, 5, 2  # not multiples of the blocks: masks tested
    ex = Experts(E, D, H, O, expert_type=kind[0], activation=kind[1], dtype=dtype).to(device)
    x = torch.randn(T, D, device=device, dtype=dtype)
    _, ids, w, plan = fused_experts.route(torch.randn(T, E, device=device), K,
                                          interpreted=kernels.interpreted())
    with torch.no_grad():
        y, _ = kernels.dropless(x, ids, w, ex, plan)
    want = _loop_reference(x, ids, w, ex)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), want, atol=tol, rtol=tol)


def test_segment_products_match_per_expert_matmuls(device):
    T, K, E, M, P = 18, 2, 4, 24, 40
    ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)])
    interp = kernels.interpreted()
    plan = fused_experts.plan_for(ids, E, interp)
    N = T * K
    a, b, x = (torch.randn(N, M, device=device), torch.randn(N, P, device=device),
               torch.randn(T, P, device=device))
    w = torch.randn(E, P, M, device=device)
    tok = plan.row_slot_N.long() // K
    rows_by_e = plan.offsets_E.long().cpu().tolist()
    got_mm = grouped_gemm.segment_mm(a, w, plan, interp)
    got_w = grouped_gemm.segment_wgrad(a, b, plan, E, None, interp)
    got_wx = grouped_gemm.segment_wgrad(a, x, plan, E, K, interp)
    start = 0
    for e, stop in enumerate(rows_by_e):
        seg = slice(start, stop)
        torch.testing.assert_close(got_mm[seg], a[seg] @ w[e].t(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_w[e], a[seg].t() @ b[seg], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_wx[e], a[seg].t() @ x[tok[seg]], atol=1e-4, rtol=1e-4)
        start = stop


LAYERS = {
    "topk-standard": dict(),
    "topk-gated": dict(expert_type="gated"),
    "switch": dict(gate_type="switch", top_k_experts=1),
    "noisy-topk-eval": dict(gate_type="noisy_topk"),
    "hash-ids-given": dict(gate_type="hash"),
    "aux-free-bias": dict(balance_loss="aux_free"),
}


def _twins(case, dtype="float32"):
    cfg = MoEConfig(input_dim=16, hidden_dim=32, output_dim=24, num_experts=6,
                    **{"top_k_experts": 2, "dtype": dtype, **LAYERS[case]})
    ours = MoELayer(cfg)
    ref = MoELayer(dataclasses.replace(cfg, kernels="torch"))
    ref.load_state_dict(ours.state_dict())
    if ours.balance_bias is not None:
        ours.balance_bias.normal_()
        ref.balance_bias.copy_(ours.balance_bias)
    return ours, ref


@pytest.mark.parametrize("case", LAYERS, ids=list(LAYERS))
def test_the_layer_on_kernels_matches_its_torch_path_forward_and_backward(device, case):
    ours, ref = (m.to(device) for m in _twins(case))
    train = case != "noisy-topk-eval"
    ours.train(train)
    ref.train(train)
    x = torch.randn(2, 9, 16, device=device)
    grads = []
    for layer in (ours, ref):
        xg = x.clone().requires_grad_()
        y, aux = layer(xg, pool=True)
        (y.pow(2).sum() + aux.loss + aux.pooled.pow(2).sum()).backward()
        grads.append((y, aux, xg.grad, [p.grad for p in layer.parameters()]))
    (y1, aux1, gx1, gp1), (y2, aux2, gx2, gp2) = grads
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux1.pooled, aux2.pooled, atol=1e-5, rtol=1e-5)
    assert torch.equal(aux1.counts, aux2.counts)
    torch.testing.assert_close(aux1.loss, aux2.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-4)
    for (name, _), g1, g2 in zip(ours.named_parameters(), gp1, gp2, strict=True):
        if g2 is None:
            assert g1 is None or not g1.any(), name
            continue
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4, msg=name)


def test_constraints_confine_and_scale_on_the_kernels(device):
    ours, ref = (m.to(device).eval() for m in _twins("topk-standard"))
    allowed = torch.zeros(2, 6, dtype=torch.bool, device=device)
    allowed[0, :3] = True
    allowed[1, 2:] = True
    scale = torch.rand(2, 6, device=device)
    x = torch.randn(2, 9, 16, device=device)
    with torch.no_grad():
        y1, a1 = ours(x, constraint=RoutingConstraint(allowed, scale))
        y2, a2 = ref(x, constraint=RoutingConstraint(allowed, scale))
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    assert torch.equal(a1.counts, a2.counts)


def test_bf16_layer_on_kernels_matches_its_torch_path(device):
    ours, ref = (m.to(device).eval() for m in _twins("topk-gated", "bfloat16"))
    x = torch.randn(24, 16, device=device, dtype=torch.bfloat16)
    xg = [x.clone().requires_grad_() for _ in range(2)]
    ys = []
    for layer, xi in zip((ours, ref), xg, strict=True):
        y = layer(xi)[0]
        y.float().pow(2).sum().backward()
        ys.append(y.float())
    torch.testing.assert_close(ys[0], ys[1], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(xg[0].grad.float(), xg[1].grad.float(), atol=5e-2, rtol=5e-2)


def test_backward_through_torch_grouped_mm_matches_too(device, monkeypatch):
    """The native-backward branch (``torch._grouped_mm``, taken on Hopper bf16), forced."""
    if device == "cuda" and not torch.cuda.get_device_capability() >= (9, 0):
        pytest.skip("torch._grouped_mm's native kernels need Hopper")
    monkeypatch.setattr(fused_experts, "native_backward", lambda x, dims: True)
    ours, ref = (m.to(device).train() for m in _twins("topk-gated"))
    x = torch.randn(20, 16, device=device)
    for layer in (ours, ref):
        layer(x)[0].pow(2).sum().backward()
    for (name, p1), p2 in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="Triton is interpreting")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_forward_and_backward_never_sync_on_cuda(dtype):
    ours, _ = _twins("topk-gated", dtype)
    ours = ours.cuda().train()
    x = torch.randn(64, 16, device="cuda", dtype=getattr(torch, dtype))

    def step():
        y, aux = ours(x.requires_grad_())
        (y.float().pow(2).mean() + aux.loss).backward()

    step()  # warm-up: autotuning and first allocations synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(INTERPRET, reason="checks the uninterpreted CPU")
def test_the_kernels_stay_off_on_a_plain_cpu():
    assert not kernels.applies(torch.zeros(2, 2))
    layer = MoELayer(MoEConfig(input_dim=16, hidden_dim=32, output_dim=16, num_experts=4,
                               top_k_experts=2))
    assert not layer._use_kernels(torch.zeros(3, 16))
