"""The system: supervisor gating, constellation invariants, reports, training, persistence."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pipeline import ConfigError, InputShapeError, MoEConfig
from pipeline.moe.checkpoint import CheckpointError
from pipeline.moe.optimized import FullyOptimizedMoESystem
from pipeline.moe.system import MixtureOfExpertsSystem

GROUPS = {"mathematics": [0, 1, 2], "language": [2, 3, 4], "vision": [4, 5, 0],
          "memory": [6, 7, 1]}


def config(**kw) -> MoEConfig:
    base = dict(input_dim=16, hidden_dim=32, output_dim=8, num_experts=8, top_k_experts=2,
                num_layers=2, use_compile=False, use_amp=False)
    return MoEConfig(**{**base, **kw})


def _capture_routing(system):
    seen = []
    hooks = [b.moe.gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
             for b in system.blocks]
    return seen, hooks


@pytest.mark.parametrize("top", [1, 2])
def test_tokens_only_reach_experts_of_their_inputs_chosen_constellations(top):
    system = MixtureOfExpertsSystem(config(constellations=GROUPS, top_k_constellations=top))
    x = torch.randn(5, 6, 16)
    seen, hooks = _capture_routing(system)
    out = system.draft_reports(x)
    for h in hooks:
        h.remove()
    members = system.constellation.membership
    allowed_BE = members[out.decision.chosen].any(1)
    assert len(seen) == 2
    for routing in seen:
        ids_BNK = routing.expert_ids.view(5, 6, -1)
        for b in range(5):
            assert allowed_BE[b, ids_BNK[b]].all(), f"input {b} left its constellations"
    # Report weights are zero outside each report's constellation.
    weights = out.reports.expert_weights
    outside = ~members[out.reports.constellation_ids]
    assert (weights[outside] == 0).all() and (weights > 0).any()


def test_shapes_reports_and_gradients():
    system = MixtureOfExpertsSystem(config(constellations=GROUPS))
    x = torch.randn(3, 7, 16, requires_grad=True)
    out = system.draft_reports(x)
    assert out.output.shape == (3, 7, 8)
    r = out.reports
    assert r.constellation_ids.shape == (3, 1) and r.scores.shape == (3, 1)
    assert r.embeddings.shape == (3, 1, 16) and r.expert_weights.shape == (3, 1, 8)
    torch.testing.assert_close(r.embeddings.norm(dim=-1), torch.ones(3, 1))
    assert ((r.scores > 0) & (r.scores <= 1)).all()
    (out.output.pow(2).mean() + out.loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # The supervisor learns from the task: its score scales the chosen experts' weights.
    assert system.supervisor.score.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in system.blocks[0].moe.experts.parameters())


def test_flat_mode_routes_over_all_experts_and_the_supervisor_learns_alignment():
    system = MixtureOfExpertsSystem(config())  # no constellations: one per expert
    assert len(system.constellation) == 8
    out = system.draft_reports(torch.randn(4, 5, 16))
    assert out.reports.constellation_ids.shape == (4, 2)  # defaults to top_k_experts
    system.train()
    out = system.run(torch.randn(4, 5, 16))
    out.loss.backward()
    assert system.supervisor.score.weight.grad.abs().sum() > 0
    # A 2-D input is one token per input.
    assert system(torch.randn(4, 16)).shape == (4, 8)


def test_specializations_name_experts_and_default_constellations():
    names = ["mathematics", "language", "vision", "logic", "memory", "reasoning", "planning",
             "execution"]
    system = MixtureOfExpertsSystem(config(expert_specializations=names))
    info = system.model_info()
    assert list(info["constellations"]) == names
    assert info["constellations"]["vision"] == ["vision"]
    grouped = MixtureOfExpertsSystem(config(expert_specializations=names,
                                            constellations=GROUPS)).model_info()
    assert grouped["constellations"]["memory"] == ["language", "planning", "execution"]


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [({"constellations": {"a": [0, 1]}}, "constellations", "expert 2 is in none"),
     ({"constellations": {"a": [0, 9]}}, "constellations['a']", "[0, 8)"),
     ({"constellations": {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}, "top_k_experts": 5},
      "top_k_experts", "smallest constellation's size, 4"),
     ({"constellations": GROUPS, "gate_type": "hash"}, "gate_type", "when constellations"),
     ({"constellations": GROUPS, "top_k_constellations": 5}, "top_k_constellations",
      "at most the number of constellations, 4"),
     ({"expert_specializations": ["a", "b"]}, "expert_specializations", "8 non-empty"),
     ({"supervisor_heads": 3}, "supervisor_heads", "divisor of input_dim=16"),
     ({"amp_dtype": "float32"}, "amp_dtype", "'bfloat16', 'float16'")],
)
def test_bad_system_config(kwargs, field, hint):
    with pytest.raises(ConfigError) as info:
        config(**kwargs)
    assert info.value.field == field and hint in str(info.value)


def test_system_refuses_gates_that_cannot_report_and_bad_inputs():
    with pytest.raises(ConfigError, match="token-choice gate"):
        MixtureOfExpertsSystem(config(gate_type="soft"))
    system = MixtureOfExpertsSystem(config())
    with pytest.raises(InputShapeError, match="x has shape \\(2, 3, 5\\)"):
        system(torch.randn(2, 3, 5))
    with pytest.raises(InputShapeError, match="batch"):
        system.training_step({"a": 1}, torch.optim.SGD(system.parameters(), 0.1), F.mse_loss)


def _regression_problem(gen):
    centres = torch.randn(4, 16, generator=gen) * 3
    maps = torch.randn(4, 16, 8, generator=gen) / 4
    task = torch.randint(0, 4, (64,), generator=gen)
    x = centres[task].unsqueeze(1) + torch.randn(64, 4, 16, generator=gen)
    return x, torch.einsum("bnd,bdo->bno", x, maps[task])


@pytest.mark.parametrize("cls", [MixtureOfExpertsSystem, FullyOptimizedMoESystem])
def test_training_step_reduces_the_loss(cls):
    torch.manual_seed(0)
    system = cls(config(constellations=GROUPS, use_gradient_checkpointing=True))
    batch = _regression_problem(torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(system.parameters(), lr=3e-3)
    losses = [system.training_step(batch, opt, F.mse_loss) for _ in range(60)]
    assert isinstance(losses[0], float)
    assert losses[-1] < 0.3 * losses[0]


def test_optimized_matches_base_within_amp_tolerance():
    torch.manual_seed(0)
    base = MixtureOfExpertsSystem(config(constellations=GROUPS)).eval()
    fast = FullyOptimizedMoESystem(config(constellations=GROUPS, use_amp=True)).eval()
    fast.load_state_dict(base.state_dict())
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        y, y_amp = base(x), fast(x)
    assert y_amp.dtype in (torch.float32, torch.bfloat16)
    assert F.cosine_similarity(y.flatten(1), y_amp.float().flatten(1)).min() > 0.98
    torch.testing.assert_close(y_amp.float(), y, atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_compiled_system_matches_base():
    torch._dynamo.reset()
    base = MixtureOfExpertsSystem(config(dispatch="capacity", capacity_factor=4.0)).eval()
    fast = FullyOptimizedMoESystem(config(dispatch="capacity", capacity_factor=4.0,
                                          use_compile=True)).eval()
    fast.load_state_dict(base.state_dict())
    x = torch.randn(2, 5, 16)
    out = fast.infer(x, reports=True)
    torch.testing.assert_close(out.output, base(x).detach(), atol=1e-4, rtol=1e-4)
    assert out.reports.embeddings.shape == (2, 2, 16)


def test_save_load_round_trip_and_refuses_a_different_config(tmp_path):
    system = MixtureOfExpertsSystem(config(constellations=GROUPS))
    x = torch.randn(2, 3, 16)
    path = system.save(tmp_path / "ckpt")
    assert (path / "model.safetensors").exists()
    assert json.loads((path / "config.json").read_text())["config"]["constellations"] == GROUPS
    again = MixtureOfExpertsSystem.from_pretrained(path).eval()
    torch.testing.assert_close(again(x), system.eval()(x))
    other = MixtureOfExpertsSystem(config(constellations=GROUPS, num_experts=8, top_k_experts=1))
    with pytest.raises(CheckpointError) as info:
        other.load(path)
    assert info.value.fields == ("top_k_experts",)
    assert "top_k_experts: saved 2 vs model 1" in str(info.value)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        again.load(path)
    with pytest.raises(CheckpointError, match="no config.json"):
        again.load(tmp_path / "missing")


def test_model_info_counts_active_parameters():
    info = MixtureOfExpertsSystem(config()).model_info()
    p = info["parameters"]
    assert p["active"] < p["total"] and p["routed_experts"] > 0
    assert info["class"] == "MixtureOfExpertsSystem" and info["dtype"] == "float32"
