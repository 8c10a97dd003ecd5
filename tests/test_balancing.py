"""Balance losses against values worked out by hand, and aux-free balancing at work."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import MoEConfig, MoELayer
from pipeline.moe.balancing import (
    aux_free_bias_update,
    expert_counts,
    group_balance_loss,
    router_z_loss,
    routing_entropy,
    switch_balance_loss,
)


def test_switch_loss_is_one_when_balanced_and_grows_with_skew():
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    assert switch_balance_loss(probs, torch.tensor([1.0, 1.0])).item() == pytest.approx(1.0)
    # Both tokens on expert 0: f = (1, 0), P = (0.85, 0.15) -> 2 * 0.85.
    skewed = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    assert switch_balance_loss(skewed, torch.tensor([2.0, 0.0])).item() == pytest.approx(1.7)


def test_group_loss_by_hand():
    # E=4 in G=2 groups, T=2, K=2: f = counts * E / (T K), groups {0,1} and {2,3}.
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]])
    counts = torch.tensor([2.0, 2.0, 0.0, 0.0])
    # f = (2, 2, 0, 0) -> f_G = (2, 0); P = (.6, .2, .1, .1) -> P_G = (.8, .2): 1.6
    assert group_balance_loss(probs, counts, 2).item() == pytest.approx(1.6)
    balanced = torch.full((2, 4), 0.25)
    assert group_balance_loss(balanced, torch.tensor([2.0, 1, 0, 1]), 2).item() == pytest.approx(1)
    # One expert per group is the switch loss.
    assert group_balance_loss(probs, counts, 4).item() == pytest.approx(
        switch_balance_loss(probs, counts).item())


def test_z_loss_and_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: ln 2 and ln 4.
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)
    assert routing_entropy(torch.full((3, 8), 1 / 8)).item() == pytest.approx(math.log(8))
    assert routing_entropy(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-9)


def test_counts_and_bias_update_by_hand():
    counts = expert_counts(torch.tensor([[0, 1], [0, 2], [0, 1]]), 4)
    assert counts.tolist() == [3.0, 2.0, 1.0, 0.0]
    bias = torch.zeros(4)
    aux_free_bias_update(bias, counts, 0.1)  # mean 1.5: over, over, under, under
    assert bias.tolist() == pytest.approx([-0.1, -0.1, 0.1, 0.1])


def test_layer_reports_weighted_loss():
    cfg = MoEConfig(input_dim=8, hidden_dim=8, output_dim=8, num_experts=4, top_k_experts=2,
                    balance_loss="group", num_expert_groups=2, load_balance_weight=0.5,
                    z_loss_weight=0.25)
    _, aux = MoELayer(cfg)(torch.randn(10, 8))
    assert aux.loss.item() == pytest.approx(0.5 * aux.balance_loss.item()
                                            + 0.25 * aux.z_loss.item())
    assert aux.counts.sum().item() == 20
    assert aux.load.sum().item() == pytest.approx(1.0)


def test_balance_loss_gradient_pushes_away_from_the_crowded_expert():
    cfg = MoEConfig(input_dim=8, hidden_dim=8, output_dim=8, num_experts=4, top_k_experts=1)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.gate.router.weight[0, 0] = 5.0
    x = torch.randn(64, 8)
    x[:, 0] = 2.0
    _, aux = layer(x)
    aux.balance_loss.backward()
    # Gradient descent lowers the crowded expert's affinity for the shared feature.
    assert layer.gate.router.weight.grad[0, 0] > 0


def test_aux_free_bias_drives_a_skewed_router_to_balance():
    torch.manual_seed(0)
    cfg = MoEConfig(input_dim=16, hidden_dim=16, output_dim=16, num_experts=8,
                    top_k_experts=2, balance_loss="aux_free", aux_free_update_rate=0.001)
    layer = MoELayer(cfg).eval()
    with torch.no_grad():  # every token strongly prefers experts 0 and 1
        layer.gate.router.weight[0, 0] = 3.0
        layer.gate.router.weight[1, 0] = 2.5
    x = torch.randn(512, 16)
    x[:, 0] = 1.5
    with torch.no_grad():
        start = layer(x)[1].load.clone()
        loads = []
        for _ in range(600):
            aux = layer(x)[1]
            layer.update_balance_bias(aux.counts)
            loads.append(aux.load)
    end = torch.stack(loads[-100:]).mean(0)  # the sign update hovers around balance
    assert start.max() > 0.4  # collapsed onto two experts
    assert end.max() < 1.25 / 8 and end.min() > 0.75 / 8  # every expert within 25% of fair
    assert aux.balance_loss.item() == 0.0  # no auxiliary loss is added
    # The weights are still the router's own probabilities, not biased ones.
    routing = layer.gate(x, bias_E=layer.balance_bias)
    probs = routing.probs.gather(1, routing.expert_ids)
    torch.testing.assert_close(routing.weights, probs / probs.sum(-1, keepdim=True))
