"""The layer against a plain reference: routing recomputed here, then a loop over experts.

Each reference routing is written from the paper's definition, independently of
`pipeline.moe.gating`; the reference experts apply each expert's own weights with
`F.linear`. Forward outputs and gradients (input, expert weights, router) must match.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import MoEConfig, MoELayer
from pipeline.moe.cpu import packable
from pipeline.moe.grouped_mm import activation_fn

D, H, O, E = 12, 20, 10, 6


def make(**kw) -> MoELayer:
    base = dict(input_dim=D, hidden_dim=H, output_dim=O, num_experts=E, top_k_experts=2,
                cur_rank=4)
    return MoELayer(MoEConfig(**{**base, **kw}))


def expert_fn(experts, e: int, h: torch.Tensor) -> torch.Tensor:
    """Expert e of a stack applied to rows h, written out with F.linear."""
    act = experts.activation
    if experts.expert_type == "standard":
        return F.linear(activation_fn(act, F.linear(h, experts.w1[e])), experts.w2[e])
    if experts.expert_type == "gated":
        inner = F.silu(F.linear(h, experts.w1[e])) * F.linear(h, experts.w3[e])
        return F.linear(inner, experts.w2[e])
    w1 = experts.w1_c[e] @ experts.w1_u[e] @ experts.w1_r[e]
    w2 = experts.w2_c[e] @ experts.w2_u[e] @ experts.w2_r[e]
    return F.linear(activation_fn(act, F.linear(h, w1)), w2)


def reference_topk(layer, x_TD, renormalize=True, k=None):
    logits = F.linear(x_TD, layer.gate.router.weight)
    probs = logits.softmax(-1)
    k = k or layer.config.top_k_experts
    w, ids = probs.topk(k, dim=-1)
    return ids, (w / w.sum(-1, keepdim=True) if renormalize else w)


def reference_token_choice(layer, x_TD, ids, w, capacity=None):
    """Loop over experts; with a capacity, keep assignments in (k, then token) order."""
    T, K = ids.shape
    y = torch.zeros(T, O)
    for e in range(E):
        taken = 0
        for k in range(K):
            for t in range(T):
                if ids[t, k] != e:
                    continue
                taken += 1
                if capacity is not None and taken > capacity:
                    continue
                y[t] += w[t, k] * expert_fn(layer.experts, e, x_TD[t : t + 1])[0]
    if layer.shared is not None:
        y = y + expert_fn(layer.shared, 0, x_TD)
    return y


def reference(layer, x, token_ids=None):
    cfg = layer.config
    x_TD = x.reshape(-1, D)
    gate = cfg.gate_type
    if gate in ("topk", "noisy_topk"):  # noisy top-k is top-k in eval
        y = reference_token_choice(layer, x_TD, *reference_topk(layer, x_TD))
    elif gate == "switch":
        y = reference_token_choice(layer, x_TD, *reference_topk(layer, x_TD, False, k=1))
    elif gate == "hash":
        keys = token_ids.reshape(-1)
        ids = layer.gate.table[keys % layer.gate.NUM_BUCKETS]
        y = reference_token_choice(layer, x_TD, ids, torch.full(ids.shape, 1 / ids.shape[1]))
    elif gate == "random":
        torch.manual_seed(123)
        ids = torch.rand(x_TD.shape[0], E).topk(cfg.top_k_experts, -1).indices
        y = reference_token_choice(layer, x_TD, ids, torch.full(ids.shape, 1 / ids.shape[1]))
    elif gate == "expert_choice":
        probs = F.linear(x_TD, layer.gate.router.weight).softmax(-1)
        C = min(x_TD.shape[0], math.ceil(cfg.capacity_factor * x_TD.shape[0]
                                         * cfg.top_k_experts / E))
        y = torch.zeros(x_TD.shape[0], O)
        for e in range(E):
            w, toks = probs[:, e].topk(C)
            for weight, t in zip(w, toks, strict=True):
                y[t] += weight * expert_fn(layer.experts, e, x_TD[t : t + 1])[0]
    elif gate == "soft":
        phi = F.normalize(layer.gate.phi, dim=-1) * layer.gate.scale
        outs = []
        for seq in x.reshape(-1, x.shape[-2], D):  # one sequence at a time
            logits = F.normalize(seq, dim=-1) @ phi.t()  # (N, S)
            dispatch, combine = logits.softmax(0), logits.softmax(1)
            slots = dispatch.t() @ seq  # (S, D)
            per = cfg.slots_per_expert
            slot_out = torch.stack([expert_fn(layer.experts, s // per, slots[s : s + 1])[0]
                                    for s in range(slots.shape[0])])
            outs.append(combine @ slot_out)
        y = torch.cat(outs)
    else:
        raise AssertionError(gate)
    return y.reshape(*x.shape[:-1], O)


CASES = [
    dict(gate_type="topk"),
    dict(gate_type="topk", expert_type="gated"),
    dict(gate_type="topk", expert_type="cur"),
    dict(gate_type="topk", activation="relu", top_k_experts=3),
    dict(gate_type="topk", num_shared_experts=2),
    dict(gate_type="topk", dispatch="capacity", capacity_factor=4.0),
    dict(gate_type="topk", dispatch="capacity", capacity_factor=4.0, expert_type="gated"),
    dict(gate_type="switch", top_k_experts=1),
    dict(gate_type="switch", top_k_experts=1, dispatch="capacity", capacity_factor=8.0),
    dict(gate_type="noisy_topk"),
    dict(gate_type="expert_choice"),
    dict(gate_type="expert_choice", capacity_factor=0.5, expert_type="gated"),
    dict(gate_type="soft"),
    dict(gate_type="soft", slots_per_expert=2, expert_type="cur"),
    dict(gate_type="hash"),
    dict(gate_type="hash", num_shared_experts=1, dispatch="capacity", capacity_factor=8.0),
    dict(gate_type="random"),
]


def _ids(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_layer_matches_reference_forward_and_gradients(case):
    layer = make(**case).eval()
    x = torch.randn(3, 7, D)
    token_ids = torch.randint(0, 50_000, (3, 7)) if case["gate_type"] == "hash" else None
    grad_out = torch.randn(3, 7, O)

    x1 = x.clone().requires_grad_()
    torch.manual_seed(123)
    y, aux = layer(x1, token_ids=token_ids)
    (y * grad_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()

    x2 = x.clone().requires_grad_()
    y_ref = reference(layer, x2, token_ids)
    (y_ref * grad_out).sum().backward()

    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x1.grad, x2.grad, atol=2e-5, rtol=1e-4)
    assert grads, "no parameter received a gradient"
    for name, p in layer.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, atol=5e-5, rtol=1e-4, msg=name)
    assert int(aux.dropped) == 0


DROPLESS_TOKEN_CHOICE = [c for c in CASES if c.get("dispatch", "dropless") == "dropless"
                         and c["gate_type"] not in ("expert_choice", "soft")]


@pytest.mark.parametrize("mkl", [True, False], ids=["mkl", "onednn"])
@pytest.mark.parametrize("case", DROPLESS_TOKEN_CHOICE, ids=_ids)
def test_cpu_inference_in_place_matches_reference(case, mkl, monkeypatch):
    """On either GEMM library the CPU's dropless path gives the reference's output and
    input gradient, and without autograd (when it overwrites its temporaries in place) the
    same output, pooled per input and expert as with autograd."""
    from pipeline.moe import cpu

    monkeypatch.setattr(cpu, "mkl_preferred", lambda: mkl)
    monkeypatch.setattr(cpu, "MKL_MIN_ROWS", 1)
    layer = make(**case).eval()
    x = torch.randn(3, 7, D)
    token_ids = torch.randint(0, 50_000, (3, 7)) if case["gate_type"] == "hash" else None
    grad_out = torch.randn(3, 7, O)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(123)
    y_grad, aux_grad = layer(x1, token_ids=token_ids, pool=True)
    (y_grad * grad_out).sum().backward()
    (reference(layer, x2, token_ids) * grad_out).sum().backward()
    with torch.no_grad():
        torch.manual_seed(123)
        y, aux = layer(x, token_ids=token_ids, pool=True)
        y_ref = reference(layer, x, token_ids)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x1.grad, x2.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(y_grad.detach(), y, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(aux.pooled, aux_grad.pooled.detach(), atol=2e-5, rtol=1e-4)


@pytest.fixture
def lanes_on(monkeypatch):
    """Lanes for fp32 too, from one row, on two threads: the bf16 rule needs AMX or
    AVX-512 BF16, which not every CPU here has, and the lanes' logic is the same."""
    from pipeline.moe import cpu

    monkeypatch.setattr(cpu, "LANE_DTYPES", (torch.float32,))
    monkeypatch.setattr(cpu, "onednn_dtypes", lambda: (torch.float32,))
    monkeypatch.setattr(cpu, "LANE_MIN_ROWS", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield cpu
    torch.set_num_threads(threads)


def _lanes_and_not(cpu, monkeypatch, layer, x, mode):
    with mode():
        y_lanes, aux_lanes = layer(x, pool=True)
        monkeypatch.setattr(cpu, "LANE_DTYPES", ())
        y_one, aux_one = layer(x, pool=True)
        monkeypatch.setattr(cpu, "LANE_DTYPES", (torch.float32,))
    return y_lanes, aux_lanes, y_one, aux_one


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode],
                         ids=["no_grad", "inference"])
def test_cpu_lanes_give_the_one_thread_answer(lanes_on, monkeypatch, mode):
    """Experts run on two one-thread lanes give the sequential output and pool, under
    no_grad and inference mode (both per thread), and leave the caller's thread count."""
    layer = make(gate_type="topk", expert_type="gated").eval()
    x = torch.randn(4, 9, D)
    sizes = [5, 0, 9, 1, 3, 3]
    assert lanes_on.cpu_lanes(torch.float32, sizes) == 2
    assert lanes_on.largest_first(sizes) == [2, 0, 4, 5, 3]
    y_lanes, aux_lanes, y_one, aux_one = _lanes_and_not(lanes_on, monkeypatch, layer, x, mode)
    torch.testing.assert_close(y_lanes, y_one, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux_lanes.pooled, aux_one.pooled, atol=1e-6, rtol=1e-5)
    assert not y_lanes.requires_grad
    assert torch.get_num_threads() == 2
    # With autograd the lanes stay off: the backward needs one graph on one thread.
    y, _ = layer(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None


def test_cpu_lanes_leave_the_router_its_gradient_and_new_threads_their_count(lanes_on):
    """Frozen experts with a trained router: the lanes (which run without autograd) stay off,
    so the router's gradient arrives; and making the lanes leaves the thread count a thread
    started later begins with."""
    import threading

    layer = make(gate_type="topk", expert_type="gated")
    layer.experts.requires_grad_(False)
    x = torch.randn(2, 8, D)
    (layer(x)[0] ** 2).sum().backward()
    want = layer.gate.router.weight.grad.clone()
    layer.zero_grad()
    lanes_on.lane_pool(2)
    with torch.no_grad():
        layer(x)  # lanes on: nothing wants a gradient
    (layer(x)[0] ** 2).sum().backward()
    torch.testing.assert_close(layer.gate.router.weight.grad, want)
    seen = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert seen == [2]


def test_lanes_run_every_item_once_and_raise_a_lane_s_error(lanes_on):
    """The shared queue: each item runs once whichever lane takes it; a failure reaches the
    caller; the caller's own ops are on one thread inside `one_thread_caller`, the lanes
    still count its two, and both counts come back after."""
    ran = []

    def work(item):
        ran.append(item)
        return torch.full((2,), float(item))

    items = list(range(40))
    with torch.no_grad(), lanes_on.one_thread_caller():
        assert torch.get_num_threads() == 1 and lanes_on.lane_threads() == 2
        assert lanes_on.cpu_lanes(torch.float32, [64, 64]) == 2
        done = lanes_on.run_in_lanes(items, work, 2)
    assert torch.get_num_threads() == 2 and lanes_on.lane_threads() == 2
    assert sorted(ran) == items and sorted(done) == items
    assert all(done[i][0].item() == i for i in items)

    def fails(item):
        if item == 7:
            raise RuntimeError("expert 7")
        return torch.zeros(1)

    with pytest.raises(RuntimeError, match="expert 7"):
        lanes_on.run_in_lanes(items, fails, 2)
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(not packable(torch.bfloat16),
                    reason="oneDNN has no bf16 products on this CPU (no AVX-512 BF16/AMX)")
def test_packed_bf16_experts_give_the_plain_answer_and_follow_weight_updates(monkeypatch):
    """In eval without autograd bf16 experts multiply by oneDNN-packed copies of their
    weights: the same output as the plain products, and an in-place weight update (an
    optimizer step, a load_state_dict) is seen by the next forward."""
    from pipeline.moe import cpu

    layer = make(gate_type="topk", expert_type="gated").to(torch.bfloat16).eval()
    x = torch.randn(4, 16, D, dtype=torch.bfloat16)
    with torch.no_grad():
        packed = layer(x)[0]
        assert id(layer.experts.w1) in cpu._PACKED
        monkeypatch.setattr(cpu, "PACK_DTYPES", ())
        plain = layer(x)[0]
        torch.testing.assert_close(packed, plain)
        layer.experts.w2.mul_(2)
        plain2 = layer(x)[0]
        monkeypatch.setattr(cpu, "PACK_DTYPES", (torch.bfloat16,))
        torch.testing.assert_close(layer(x)[0], plain2)
    torch.testing.assert_close(plain2.float(), 2 * plain.float(), atol=2e-2, rtol=2e-2)
    with torch.no_grad():  # an edit no version counter sees, then eval() again
        layer.experts.w2.data.mul_(0.5)
        layer.eval()
        monkeypatch.setattr(cpu, "PACK_DTYPES", ())
        plain3 = layer(x)[0]
        monkeypatch.setattr(cpu, "PACK_DTYPES", (torch.bfloat16,))
        torch.testing.assert_close(layer(x)[0], plain3)
    w1 = id(layer.experts.w1)
    del layer
    assert w1 not in cpu._PACKED  # the packs went with the parameter


def test_routers_learn_through_combine_weights():
    """Top-k and switch weights carry the router's gradient (the router is trained)."""
    for case in (dict(gate_type="topk"), dict(gate_type="switch", top_k_experts=1)):
        layer = make(**case)
        y, _ = layer(torch.randn(16, D))
        y.sum().backward()
        assert layer.gate.router.weight.grad.abs().sum() > 0


def test_capacity_drops_the_least_preferred_assignments_and_counts_them():
    layer = make(gate_type="topk", dispatch="capacity", capacity_factor=0.5).eval()
    x = torch.randn(20, D)
    with torch.no_grad():
        y, aux = layer(x)
        ids, w = reference_topk(layer, x)
        C = math.ceil(0.5 * 20 * 2 / E)
        y_ref = reference_token_choice(layer, x, ids, w, capacity=C)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    assert int(aux.dropped) == int((counts - C).clamp_min(0).sum()) > 0
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)


def test_dropless_and_capacity_agree_when_nothing_is_dropped():
    torch.manual_seed(1)
    a = make(gate_type="topk", expert_type="gated")
    b = make(gate_type="topk", expert_type="gated", dispatch="capacity", capacity_factor=E / 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(a(x)[0], b(x)[0], atol=1e-5, rtol=1e-5)


def test_hash_routing_is_deterministic_by_token_id_and_position():
    layer = make(gate_type="hash").eval()
    ids = torch.tensor([[5, 9, 5, 70_000]])
    x_TD = torch.randn(4, D)
    a = layer.gate(x_TD, token_ids_T=ids.reshape(-1)).expert_ids
    assert torch.equal(a[0], a[2])  # same token id -> same experts
    assert torch.equal(a, make(gate_type="hash").gate(x_TD, token_ids_T=ids.reshape(-1))
                       .expert_ids)
    assert all(len(set(row.tolist())) == 2 for row in a)  # k distinct experts
    x = torch.randn(2, 4, D)
    y1, _ = layer(x)
    y2, _ = layer(x.flip(0))  # without ids, routing depends on position only
    torch.testing.assert_close(y1.flip(0), y2)


def test_every_gate_takes_the_one_call_signature():
    """Each gate in GATES, called the way the layer calls it, on 2 sequences of 3 tokens."""
    from pipeline.errors import InputShapeError
    from pipeline.moe.config import CONSTRAINABLE_GATES, GATE_TYPES, TOKEN_CHOICE_GATES
    from pipeline.moe.gating import GATES, ExpertChoice, SoftRouting, TokenChoice, capacity

    assert tuple(GATES) == GATE_TYPES
    B, N, T = 2, 3, 6
    x_TD = torch.randn(T, D)
    allowed_TE = torch.ones(T, E, dtype=torch.bool)
    allowed_TE[:, 0] = False
    for name, gate_cls in GATES.items():
        cfg = MoEConfig(input_dim=D, hidden_dim=H, output_dim=O, num_experts=E,
                        top_k_experts=1 if name == "switch" else 2, gate_type=name,
                        slots_per_expert=2)
        gate = gate_cls(cfg).eval()
        routing = gate(x_TD, token_ids_T=None, bias_E=None, allowed_TE=None, batch=B)
        if name in TOKEN_CHOICE_GATES:
            assert isinstance(routing, TokenChoice), name
            K = cfg.top_k_experts
            assert routing.expert_ids.shape == routing.weights.shape == (T, K), name
            assert routing.expert_ids.dtype == torch.int64, name
            assert routing.probs.shape == (T, E), name
        elif name == "expert_choice":
            assert isinstance(routing, ExpertChoice)
            C = capacity(T, cfg.top_k_experts, E, cfg.capacity_factor)
            assert routing.token_ids.shape == routing.weights.shape == (E, C)
            assert routing.probs.shape == routing.logits.shape == (T, E)
        else:
            assert isinstance(routing, SoftRouting), name
            assert routing.dispatch.shape == routing.combine.shape == (B, N, E * 2)
        if name in CONSTRAINABLE_GATES:
            confined = gate(x_TD, allowed_TE=allowed_TE, batch=B)
            assert not (confined.expert_ids == 0).any(), name
        else:  # a gate that cannot honour the mask refuses it
            with pytest.raises(InputShapeError, match="allowed_TE"):
                gate(x_TD, allowed_TE=allowed_TE, batch=B)
        if name == "hash":  # without ids, by position within each sequence
            assert torch.equal(routing.expert_ids[:N], routing.expert_ids[N:])


def test_switch_jitter_only_in_training():
    layer = make(gate_type="switch", top_k_experts=1, jitter_noise=0.5)
    x = torch.randn(64, D)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    w1 = layer.gate(x).weights
    w2 = layer.gate(x).weights
    assert not torch.equal(w1, w2)


def test_noisy_topk_is_noisy_in_training_only():
    layer = make(gate_type="noisy_topk")
    x = torch.randn(64, D)
    layer.train()
    assert not torch.equal(layer.gate(x).expert_ids, layer.gate(x).expert_ids)
    layer.eval()
    assert torch.equal(layer.gate(x).expert_ids, layer.gate(x).expert_ids)


def test_bfloat16_layer_is_close_to_float32():
    a = make(gate_type="topk", expert_type="gated")
    b = make(gate_type="topk", expert_type="gated", dtype="bfloat16")
    b.load_state_dict({k: v.to(b.state_dict()[k].dtype) for k, v in a.state_dict().items()})
    x = torch.randn(32, D)
    ya, yb = a(x)[0], b(x)[0]
    assert yb.dtype == torch.float32
    assert F.cosine_similarity(ya, yb, dim=-1).min() > 0.99


def test_blocked_grouped_products_match_per_expert_products():
    """The CUDA fallback layout (groups padded to blocks), checked on the CPU."""
    from pipeline.moe import dispatch
    from pipeline.moe.balancing import expert_counts

    layer = make(gate_type="topk", expert_type="gated")
    x = torch.randn(37, D, requires_grad=True)
    routing = layer.gate(x)
    ids_A, _ = dispatch._flatten(routing)
    order = torch.argsort(ids_A, stable=True)
    x_sorted, ids_sorted = x[order % 37], ids_A[order]
    counts = expert_counts(routing.expert_ids, E).long()
    y = dispatch._blocked(x_sorted, ids_sorted, counts, layer.experts, block=4)
    ref = torch.cat([expert_fn(layer.experts, e, x_sorted[ids_sorted == e]) for e in range(E)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), x, retain_graph=True)
    (gx_ref,) = torch.autograd.grad((ref * g).sum(), x)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)


def test_noisy_topk_training_weights_are_a_softmax_over_the_kept_noisy_logits():
    layer = make(gate_type="noisy_topk").train()
    with torch.no_grad():
        layer.gate.noise.weight.normal_(0, 0.5)
    x = torch.randn(32, D)
    torch.manual_seed(5)
    routing = layer.gate(x)
    torch.manual_seed(5)
    clean = F.linear(x, layer.gate.router.weight)
    noisy = clean + torch.randn_like(clean) * F.softplus(F.linear(x, layer.gate.noise.weight))
    w, ids = noisy.topk(2, dim=-1)
    assert torch.equal(routing.expert_ids.sort(-1).values, ids.sort(-1).values)
    got = routing.weights.gather(1, routing.expert_ids.argsort(-1))
    want = torch.softmax(w, -1).gather(1, ids.argsort(-1))
    torch.testing.assert_close(got, want)


def test_aux_free_bias_never_reaches_a_forbidden_expert():
    from pipeline.moe.layer import RoutingConstraint

    for gate in ("topk", "switch", "noisy_topk"):
        k = 1 if gate == "switch" else 2
        layer = make(gate_type=gate, top_k_experts=k, balance_loss="aux_free").train()
        layer.balance_bias[0] = 10.0  # a huge pull towards expert 0
        allowed = torch.ones(3, E, dtype=torch.bool)
        allowed[:, 0] = False
        x = torch.randn(3, 7, D)
        seen = []
        hook = layer.gate.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out))
        y, _ = layer(x, constraint=RoutingConstraint(allowed))
        hook.remove()
        assert not (seen[0].expert_ids == 0).any(), gate
        assert (seen[0].weights > 0).all(), gate


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [dict(gate_type="topk"), dict(gate_type="topk",
                                  dispatch="capacity"), dict(gate_type="expert_choice"),
                                  dict(gate_type="soft")], ids=_ids)
def test_cuda_forward_matches_cpu_and_never_syncs(dtype, case):
    """fp32 takes the blocked fallback, bf16 the grouped GEMM (Hopper); neither syncs."""
    cfg = MoEConfig(input_dim=64, hidden_dim=128, output_dim=64, num_experts=8,
                    top_k_experts=2, expert_type="gated", **case)
    layer = MoELayer(cfg).eval()
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        y_cpu = layer(x)[0]
        gpu = layer.cuda().to(dtype)
        gpu.gate.float()  # the router stays fp32
        xg = x.cuda().to(dtype)
        gpu(xg)  # warm-up: first-call allocations may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y_gpu = gpu(xg)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y_gpu.float().cpu(), y_cpu, atol=tol, rtol=tol)
