"""CUDA checks beyond the layer's own: every gate and shared experts without a host sync,
the whole system's report forward, CUDA-graph capture of the compiled layer, and the hot
cache on the GPU against the CPU. All skip without a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import MoEConfig, MoELayer
from pipeline.cache import EmbeddingCache
from pipeline.moe.system import MixtureOfExpertsSystem

pytestmark = pytest.mark.gpu


def _no_sync(fn):
    fn()  # warm-up: first calls allocate, and may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("case", [
    dict(gate_type="switch", top_k_experts=1), dict(gate_type="noisy_topk"),
    dict(gate_type="hash"), dict(gate_type="random"),
    dict(gate_type="topk", num_shared_experts=1), dict(gate_type="topk", balance_loss="group"),
    dict(gate_type="topk", balance_loss="aux_free"),
], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_every_gate_runs_on_cuda_without_a_host_sync(case):
    cfg = MoEConfig(input_dim=64, hidden_dim=128, output_dim=64, num_experts=8,
                    **{"top_k_experts": 2, **case})
    layer = MoELayer(cfg).cuda().train()  # training mode: losses and noise included
    x = torch.randn(4, 32, 64, device="cuda")
    y, aux = _no_sync(lambda: layer(x))
    assert y.shape == (4, 32, 64) and torch.isfinite(y).all()
    assert torch.isfinite(aux.loss)


def test_the_system_drafts_reports_on_cuda_without_a_host_sync():
    cfg = MoEConfig(input_dim=64, hidden_dim=128, output_dim=64, num_experts=8,
                    top_k_experts=2, num_layers=2,
                    constellations={"a": [0, 1], "b": [2, 3], "c": [4, 5], "d": [6, 7]})
    torch.manual_seed(0)
    system = MixtureOfExpertsSystem(cfg).eval()
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = system.draft_reports(x).reports
        gpu, xg = system.cuda(), x.cuda()  # the copy in syncs; the forward must not
        out = _no_sync(lambda: gpu.draft_reports(xg))
    assert torch.equal(out.reports.constellation_ids.cpu(), ref.constellation_ids)
    torch.testing.assert_close(out.reports.embeddings.cpu(), ref.embeddings, atol=1e-4,
                               rtol=1e-4)


def test_the_compiled_layer_replays_as_a_cuda_graph():
    torch._dynamo.reset()
    cfg = MoEConfig(input_dim=64, hidden_dim=128, output_dim=64, num_experts=8,
                    top_k_experts=2, dispatch="capacity", expert_type="gated")
    layer = MoELayer(cfg).cuda().eval()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=False)
    x = torch.randn(4, 32, 64, device="cuda")
    with torch.no_grad():
        want = layer(x)[0]
        for _ in range(3):  # record, then replay
            got = compiled(x)[0].clone()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_cache_searches_on_cuda_as_on_cpu():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((5000, 96)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    queries = rng.standard_normal((64, 96)).astype(np.float32)
    found = {}
    for device in ("cpu", "cuda"):
        cache = EmbeddingCache(96, device)
        cache.add([f"i{n}" for n in range(len(emb))], emb, list(range(len(emb))))
        scores, rows = cache.search(queries, 10)
        found[device] = (scores.cpu(), rows.cpu())
    torch.testing.assert_close(found["cuda"][0], found["cpu"][0], atol=1e-3, rtol=1e-3)
    # The same neighbours; near-equal scores may swap places between the two devices.
    same = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in
                    zip(found["cuda"][1], found["cpu"][1], strict=True)])
    assert same > 0.99
