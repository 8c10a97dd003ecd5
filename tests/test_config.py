"""MoEConfig refuses bad values with an error that names the field and what is allowed."""

from __future__ import annotations

import pytest
import torch

from pipeline import ConfigError, InputShapeError, MoEConfig, MoELayer


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"top_k_experts": 9, "num_experts": 8}, "top_k_experts", "at most num_experts=8"),
        ({"input_dim": 0}, "input_dim", "positive integer"),
        ({"hidden_dim": -4}, "hidden_dim", "positive integer"),
        ({"output_dim": 2.5}, "output_dim", "positive integer"),
        ({"num_experts": True}, "num_experts", "positive integer"),
        ({"expert_type": "moe"}, "expert_type", "'standard', 'gated', 'cur'"),
        ({"gate_type": "top2"}, "gate_type", "'topk', 'switch'"),
        ({"balance_loss": "deepseek"}, "balance_loss", "'none', 'switch', 'group', 'aux_free'"),
        ({"activation": "tanh"}, "activation", "'gelu'"),
        ({"dispatch": "auto"}, "dispatch", "'dropless', 'capacity'"),
        ({"dtype": "float64"}, "dtype", "'float32', 'bfloat16', 'float16'"),
        ({"dropout": 1.0}, "dropout", "[0, 1)"),
        ({"capacity_factor": 0}, "capacity_factor", "> 0"),
        ({"load_balance_weight": -0.1}, "load_balance_weight", ">= 0"),
        ({"z_loss_weight": float("nan")}, "z_loss_weight", ">= 0"),
        ({"gate_type": "switch"}, "top_k_experts", "1 with gate_type='switch'"),
        ({"jitter_noise": 0.1}, "jitter_noise", "unless gate_type='switch'"),
        ({"balance_loss": "group", "num_expert_groups": 5}, "num_expert_groups", "divisor"),
        ({"num_expert_groups": 4}, "num_expert_groups", "unless balance_loss='group'"),
        ({"gate_type": "hash", "balance_loss": "aux_free"}, "balance_loss", "steers only"),
        ({"gate_type": "soft", "num_shared_experts": 1}, "num_shared_experts", "token-choice"),
        ({"expert_type": "cur", "cur_rank": 1024}, "cur_rank", "at most"),
        ({"num_shared_experts": -1}, "num_shared_experts", ">= 0"),
    ],
)
def test_bad_config_names_field_and_allowed_values(kwargs, field, hint):
    with pytest.raises(ValueError) as info:
        MoEConfig(**kwargs)
    assert isinstance(info.value, ConfigError)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}=")
    assert hint in str(info.value)


def test_config_round_trips_through_dict_and_rejects_unknown_fields():
    cfg = MoEConfig(num_experts=8, top_k_experts=2, gate_type="noisy_topk")
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="num_expert="):
        MoEConfig.from_dict({"num_expert": 8})


def _small(**kw) -> MoELayer:
    base = dict(input_dim=8, hidden_dim=16, output_dim=8, num_experts=4, top_k_experts=2)
    return MoELayer(MoEConfig(**{**base, **kw}))


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((4, 7), torch.float32), ((2, 3, 4, 8), torch.float32), ((8,), torch.float32),
     ((3, 8), torch.int64)],
)
def test_wrong_input_shape_is_a_clear_error(shape, dtype):
    layer = _small()
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(InputShapeError) as info:
        layer(x)
    assert info.value.name == "x"
    assert str(info.value).startswith(f"x has shape {tuple(shape)}")


def test_token_ids_must_match_and_only_serve_hash_routing():
    x = torch.randn(2, 5, 8)
    with pytest.raises(InputShapeError, match="token_ids has shape \\(10,\\)"):
        _small(gate_type="hash")(x, token_ids=torch.arange(10))
    with pytest.raises(InputShapeError, match="unless gate_type='hash'"):
        _small()(x, token_ids=torch.zeros(2, 5, dtype=torch.long))
