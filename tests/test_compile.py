"""The static-shape paths compile with fullgraph=True: no graph breaks in gate or dispatch."""

from __future__ import annotations

import pytest
import torch

from pipeline import MoEConfig, MoELayer


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [dict(gate_type="topk", dispatch="capacity", expert_type="gated", num_shared_experts=1),
     dict(gate_type="expert_choice", expert_type="standard")],
    ids=["topk-capacity", "expert-choice"],
)
def test_fullgraph_compile_matches_eager(case):
    torch._dynamo.reset()
    cfg = MoEConfig(input_dim=16, hidden_dim=32, output_dim=16, num_experts=4, top_k_experts=2,
                    **case)
    layer = MoELayer(cfg).eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        y, aux = layer(x)
        y_c, aux_c = compiled(x)
    torch.testing.assert_close(y_c, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux_c.counts, aux.counts)
    assert aux_c.dropped.dtype == torch.int64 and aux_c.dropped.dim() == 0


@pytest.mark.slow
def test_fullgraph_compile_trains():
    torch._dynamo.reset()
    cfg = MoEConfig(input_dim=16, hidden_dim=32, output_dim=16, num_experts=4, top_k_experts=2,
                    dispatch="capacity")
    layer = MoELayer(cfg)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    x = torch.randn(32, 16)
    y, aux = compiled(x)
    (y.pow(2).mean() + aux.loss).backward()
    assert layer.experts.w1.grad is not None and layer.gate.router.weight.grad.abs().sum() > 0
