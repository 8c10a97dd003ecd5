"""CUDA-graph serving of `FullyOptimizedMoESystem.infer`: its settings, its refusal of a batch
past the static buffer, and (``gpu``) replays that match the eager forward."""

from __future__ import annotations

import pytest
import torch

from pipeline import ConfigError, InputShapeError, MoEConfig
from pipeline.moe.optimized import FullyOptimizedMoESystem, graph_tokens


def config(**kw) -> MoEConfig:
    base = dict(input_dim=16, hidden_dim=32, output_dim=8, num_experts=8, top_k_experts=2,
                num_layers=2, use_compile=False, use_amp=False)
    return MoEConfig(**{**base, **kw})


@pytest.mark.parametrize("field, value", [("cuda_graph_max_tokens", 0),
                                          ("cuda_graph_max_tokens", 2.5),
                                          ("use_cuda_graphs", "yes"), ("kernels", "cutlass")])
def test_the_serving_settings_are_validated_by_name(field, value):
    with pytest.raises(ConfigError) as err:
        config(**{field: value})
    assert err.value.field == field and f"{field}=" in str(err.value)


def test_a_batch_past_the_static_buffer_is_refused_naming_the_setting():
    assert graph_tokens(torch.empty(4, 5, 16), 20) == 20
    assert graph_tokens(torch.empty(7, 16), 7) == 7  # (B, D): one token per input
    with pytest.raises(InputShapeError, match=r"cuda_graph_max_tokens=20 .* here 24"):
        graph_tokens(torch.empty(4, 6, 16), 20)


def test_cpu_inference_is_unchanged_and_never_refused():
    system = FullyOptimizedMoESystem(config(cuda_graph_max_tokens=1))
    x = torch.randn(3, 5, 16)
    out = system.infer(x, reports=True)  # 15 tokens, past the setting: graphs are CUDA only
    with torch.no_grad():
        want = system.run(x, reports=True)
    torch.testing.assert_close(out.output, want.output)
    assert system._graphs is None


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_cuda_inference_replays_graphs_that_match_the_eager_forward(kernels):
    torch.manual_seed(0)
    system = FullyOptimizedMoESystem(config(kernels=kernels, cuda_graph_max_tokens=64,
                                            use_amp=True)).cuda()
    eager = FullyOptimizedMoESystem(config(kernels=kernels, use_cuda_graphs=False,
                                           use_amp=True)).cuda()
    eager.load_state_dict(system.state_dict())
    for shape in [(4, 8, 16), (4, 8, 16), (2, 8, 16), (5, 16)]:
        x = torch.randn(*shape, device="cuda")  # new values each call: no stale replay
        got = system.infer(x, reports=True)
        want = eager.infer(x, reports=True)
        torch.testing.assert_close(got.output, want.output, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got.reports.embeddings, want.reports.embeddings,
                                   atol=2e-2, rtol=2e-2)
    assert len(system._graphs._graphs) == 3  # one graph per shape, the repeat replayed
    system._graphs.max_graphs = 2  # a new shape evicts the least recently replayed graph
    x = torch.randn(3, 8, 16, device="cuda")
    torch.testing.assert_close(system.infer(x).output, eager.infer(x).output,
                               atol=2e-2, rtol=2e-2)
    assert [k[0] for k in system._graphs._graphs] == [(5, 16), (3, 8, 16)]
    with pytest.raises(InputShapeError, match="cuda_graph_max_tokens=64"):
        system.infer(torch.randn(5, 16, 16, device="cuda"))


@pytest.mark.gpu
def test_moving_the_system_drops_its_graphs():
    system = FullyOptimizedMoESystem(config()).cuda()
    system.infer(torch.randn(2, 4, 16, device="cuda"))
    assert system._graphs is not None
    system.to(torch.float64).to(torch.float32)
    assert system._graphs is None
