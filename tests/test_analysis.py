"""Parameter counts, usage, entropy and model comparison on small layers."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import MoEConfig, MoELayer
from pipeline.moe.analysis import compare, entropy, expert_usage, parameter_counts
from pipeline.moe.experts import cur_decompose


def _layer(**kw) -> MoELayer:
    base = dict(input_dim=8, hidden_dim=16, output_dim=8, num_experts=4, top_k_experts=2)
    return MoELayer(MoEConfig(**{**base, **kw}))


def test_parameter_counts_by_hand():
    layer = _layer(num_shared_experts=1)
    router = 4 * 8
    routed = 4 * (16 * 8 + 8 * 16)
    shared = 16 * 8 + 8 * 16
    counts = parameter_counts(layer)
    assert counts["total"] == router + routed + shared
    assert counts["routed_experts"] == routed
    assert counts["active"] == router + shared + routed // 2  # k / E = 2 / 4
    soft = parameter_counts(_layer(gate_type="soft"))
    assert soft["active"] == soft["total"]


def test_expert_usage_and_entropy():
    usage = expert_usage(torch.tensor([6.0, 2.0, 0.0, 0.0]))
    assert usage["percent"] == pytest.approx([75.0, 25.0, 0.0, 0.0])
    assert usage["unused_experts"] == 2
    assert sum(usage["histogram"]["experts"]) == 4
    h = entropy(torch.full((5, 4), 0.25))
    assert h["entropy"] == pytest.approx(math.log(4)) and h["normalized"] == pytest.approx(1.0)


def test_compare_identical_and_different_layers():
    a, b = _layer(), _layer()
    x = torch.randn(3, 5, 8)
    same = compare(a, a, x)
    assert same["max_abs_diff"] == 0.0 and same["mean_cosine"] == pytest.approx(1.0)
    diff = compare(a, b, x)
    assert diff["max_abs_diff"] > 0 and diff["relative_l2"] > 0
    assert len(diff["expert_usage"]["a"]) == 1
    assert sum(diff["expert_usage"]["b"][0]) == pytest.approx(100.0)
    assert a.training  # mode restored


def test_cur_decompose_is_exact_at_full_rank_and_close_on_low_rank():
    torch.manual_seed(0)
    low_rank = torch.randn(30, 5) @ torch.randn(5, 20)
    c, u, r = cur_decompose(low_rank, 5)
    assert c.shape == (30, 5) and u.shape == (5, 5) and r.shape == (5, 20)
    torch.testing.assert_close(c @ u @ r, low_rank, atol=1e-4, rtol=1e-4)
    # C and R are real columns and rows of W.
    assert any(torch.equal(c[:, 0], low_rank[:, j]) for j in range(20))
    assert any(torch.equal(r[0], low_rank[i]) for i in range(30))


def test_run_stats_say_what_routing_can_reach_and_who_is_starved():
    from pipeline.stats import RunStats

    st = RunStats("r", 1, 1, 100, 100, 50, 50, 0.5, 0.6, 1.0,
                  {"a0": 0.49, "a1": 0.01, "b0": 0.25, "b1": 0.25},
                  {"alpha": 0.5, "beta": 0.5}, {"alpha": ["a0", "a1"], "beta": ["b0", "b1"]})
    assert abs(st.reachable_entropy - 0.6931) < 1e-3  # ln 2, not ln 4
    assert st.constellations_of("a1") == ["alpha"]
    notes = st.starved()
    assert len(notes) == 1 and notes[0].startswith("expert a1 (alpha) is starved: 1.0%")
    lopsided = RunStats("r", 1, 1, 100, 100, 50, 50, 0.5, 0.6, 1.0, {"a0": 0.5, "b0": 0.5},
                        {"alpha": 0.95, "beta": 0.05}, {"alpha": ["a0"], "beta": ["b0"]})
    assert any(n.startswith("constellation beta is starved: 5.0%") for n in lopsided.starved())
