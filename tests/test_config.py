"""MoEConfig refuses bad values with an error that names the field and what is allowed; its
parts (layer, system, knowledge, optimisation) check their own fields with the same words,
and agree with the flat fields they are built from."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import ConfigError, InputShapeError, MoEConfig, MoELayer
from pipeline.moe.config_parts import (
    KnowledgeConfig,
    LayerConfig,
    OptimizationConfig,
    SystemConfig,
)


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


def _message(build) -> str:
    with pytest.raises(ConfigError) as info:
        build()
    return str(info.value)


KNOWLEDGE = dict(dim=8, dedup_threshold=0.85, related_threshold=0.5, max_kg_nodes=10,
                 kg_checkpoint_dir=None, kg_save_interval=5)
GROUPS = {"a": [0, 1], "b": [2, 3]}


@pytest.mark.parametrize(
    ("part", "kwargs", "flat"),
    [
        (LayerConfig, {"top_k_experts": 9, "num_experts": 8}, {}),
        (LayerConfig, {"dtype": "float64"}, {}),
        (LayerConfig, {"gate_type": "hash", "balance_loss": "aux_free"}, {}),
        (LayerConfig, {"expert_type": "cur", "cur_rank": 1024}, {}),
        (KnowledgeConfig, {**KNOWLEDGE, "related_threshold": 0.9}, {}),
        (KnowledgeConfig, {**KNOWLEDGE, "dedup_threshold": 1.5}, {}),
        (KnowledgeConfig, {**KNOWLEDGE, "lexical_threshold": 0.0}, {}),
        (KnowledgeConfig, {**KNOWLEDGE, "lexical_floor": 0.9}, {}),
        (KnowledgeConfig, {**KNOWLEDGE, "max_kg_nodes": 0}, {}),
        (KnowledgeConfig, {**KNOWLEDGE, "kg_save_interval": -1}, {}),
        (SystemConfig, {"num_layers": 0}, {}),
        (SystemConfig, {"supervisor_heads": 3}, {}),
        (SystemConfig, {"report_expert_weight": -1}, {}),
        (SystemConfig, {"constellations": {"a": [0, 1]}}, {"num_experts": 4}),
        (SystemConfig, {"constellations": GROUPS, "top_k_constellations": 3},
         {"num_experts": 4, "top_k_experts": 2}),
        (SystemConfig, {"expert_specializations": ["x", "x"]}, {"num_experts": 2,
                                                                 "top_k_experts": 1}),
        (OptimizationConfig, {"compile_mode": "fast"}, {}),
        (OptimizationConfig, {"amp_dtype": "float32"}, {}),
        (OptimizationConfig, {"use_amp": 1}, {}),
        (OptimizationConfig, {"cuda_graph_max_tokens": 0}, {}),
    ],
)
def test_each_part_refuses_its_bad_values_as_the_flat_config_does(part, kwargs, flat):
    """The check lives in the part; the flat constructor reports it in the same words."""
    if part is SystemConfig:
        on_part = _message(lambda: SystemConfig(layer=LayerConfig(**flat), **kwargs))
    else:
        on_part = _message(lambda: part(**kwargs))
    if part is KnowledgeConfig:
        kwargs = {("input_dim" if k == "dim" else k): v for k, v in kwargs.items()}
        kwargs = {**{"hidden_dim": 8, "output_dim": 8, "num_experts": 4, "top_k_experts": 2,
                     "supervisor_heads": 4}, **kwargs}
    assert _message(lambda: MoEConfig(**flat, **kwargs)) == on_part


def test_the_parts_cover_every_flat_field_once_and_agree_with_it():
    cfg = MoEConfig(input_dim=16, hidden_dim=32, output_dim=8, num_experts=4, top_k_experts=2,
                    constellations={"a": (0, 1), "b": {"experts": (2, 3), "description": "d"}},
                    dedup_threshold=0.9, use_amp=False, cuda_graph_max_tokens=64)
    owners: dict[str, list[str]] = {}
    for part in (cfg.layer, cfg.system, cfg.knowledge, cfg.optimization):
        for f in dataclasses.fields(part):
            if f.name == "layer":
                assert part.layer is cfg.layer  # the system holds the very layer part
                continue
            flat = "input_dim" if f.name == "dim" else f.name
            assert getattr(part, f.name) == getattr(cfg, flat), f.name
            owners.setdefault(flat, []).append(type(part).__name__)
    owners["input_dim"].remove("KnowledgeConfig")  # the report width is the input width
    assert {f.name for f in dataclasses.fields(MoEConfig)} == set(owners)
    assert all(len(o) == 1 for o in owners.values()), owners
    # what the system part answers, the flat config answers alike
    assert cfg.constellation_members() == [("a", [0, 1]), ("b", [2, 3])]
    assert cfg.system.constellation_map() == {"a": ["expert_0", "expert_1"],
                                              "b": ["expert_2", "expert_3"]}
    assert cfg.chosen_per_input == cfg.system.chosen_per_input == 1
    assert cfg.is_token_choice and cfg.layer.is_token_choice


def test_the_config_is_frozen_so_its_parts_stay_true():
    cfg = MoEConfig(num_experts=8, top_k_experts=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k_experts = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layer.top_k_experts = 3  # type: ignore[misc]
    changed = dataclasses.replace(cfg, top_k_experts=3)
    assert changed.layer.top_k_experts == 3 and cfg.layer.top_k_experts == 2


def test_a_round_trip_through_json_keeps_the_fields_and_the_parts():
    import json

    cfg = MoEConfig(num_experts=4, top_k_experts=2, constellations={"a": (0, 1), "b": (2, 3)},
                    expert_specializations=("w", "x", "y", "z"), lexical_threshold=None,
                    kg_checkpoint_dir="/tmp/kg", use_compile=False)
    back = MoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert (back.layer, back.system, back.knowledge, back.optimization) == (
        cfg.layer, cfg.system, cfg.knowledge, cfg.optimization)
    assert cfg.to_dict()["constellations"] == {"a": [0, 1], "b": [2, 3]}  # as JSON reads it


def test_the_layer_takes_its_part_or_the_whole_config():
    cfg = MoEConfig(input_dim=8, hidden_dim=16, output_dim=8, num_experts=4, top_k_experts=2)
    torch.manual_seed(0)
    whole = MoELayer(cfg)
    torch.manual_seed(0)
    part = MoELayer(cfg.layer)
    assert whole.config == part.config == cfg.layer
    x = torch.randn(5, 8)
    torch.testing.assert_close(whole(x)[0], part(x)[0])


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


@pytest.mark.parametrize("part", [LayerConfig, KnowledgeConfig, SystemConfig,
                                  OptimizationConfig])
def test_a_part_defaults_each_field_as_the_flat_config_does(part):
    """The defaults are written twice (the flat constructor and its part): they must agree."""
    flat = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    # On purpose: a run recorded before the lexical signal existed reads back with it off.
    own = {("KnowledgeConfig", "lexical_threshold")}
    for field in dataclasses.fields(part):
        if field.default is not dataclasses.MISSING and field.name in flat and (
                (part.__name__, field.name) not in own):
            assert field.default == flat[field.name], (part.__name__, field.name)
