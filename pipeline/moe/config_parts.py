"""The model's hyperparameters in four frozen parts, each read by its own consumers.

`LayerConfig` is one MoE layer (dimensions, experts, routing, balance, dispatch, dtypes);
`SystemConfig` the stack of layers behind a supervisor (it holds its layer); `KnowledgeConfig`
what the librarian reads; `OptimizationConfig` how `FullyOptimizedMoESystem` runs the same
model faster. Each part checks its own fields in ``__post_init__``, so a check lives beside
the fields it reads; every invalid value raises `ConfigError` (a `ValueError`) naming the
field, the bad value and what is allowed. `pipeline.moe.config.MoEConfig` is the flat
constructor users type, which builds the four parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError

EXPERT_TYPES = ("standard", "gated", "cur")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
GATE_TYPES = ("topk", "switch", "noisy_topk", "expert_choice", "soft", "hash", "random")
# Gates that choose experts per token from learned router logits: the only ones a bias can steer.
ROUTER_GATES = ("topk", "switch", "noisy_topk")
# Gates that produce (token -> k experts) assignments and so go through token-choice dispatch.
TOKEN_CHOICE_GATES = ("topk", "switch", "noisy_topk", "hash", "random")
BALANCE_LOSSES = ("none", "switch", "group", "aux_free")
DISPATCH_MODES = ("dropless", "capacity")
KERNELS = ("triton", "torch")
DTYPES = ("float32", "bfloat16", "float16")
AMP_DTYPES = ("bfloat16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Gates that route by the token's vocabulary id (MoELayer's ``token_ids``).
TOKEN_ID_GATES = ("hash",)
# Gates that can be confined to the experts of an input's chosen constellations.
CONSTRAINABLE_GATES = ("topk", "switch", "noisy_topk", "random")
# Ceilings on single fields, far above any real model (Llama 3.1 405B: 126 layers, width
# 16384, MLP 53248; DeepSeek-V3: 256 experts) and far below what exhausts memory on their
# own; the parameter count as a whole is bounded where a model is built (`budget`).
MAX_DIM = 1 << 20
MAX_EXPERTS = 4096  # the hash gate draws a 65536 x E table: 1 GiB at this ceiling
MAX_LAYERS = 1024
MAX_SLOTS = 1024
MAX_GRAPH_TOKENS = 1 << 24


def _json_ready(spec: Any) -> Any:
    """A constellation's spec as JSON reads it back (lists, not tuples)."""
    if isinstance(spec, tuple):
        return list(spec)
    if isinstance(spec, dict):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}
    return spec


def _choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(field, value, "one of " + ", ".join(repr(a) for a in allowed))


def _positive_int(field: str, value: object, limit: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(field, value, "a positive integer")
    if limit is not None and value > limit:
        raise ConfigError(field, value, f"a positive integer of at most {limit:,}")


def _non_negative(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(field, value, "a finite number >= 0")
    if math.isinf(value):
        raise ConfigError(field, value, "a finite number >= 0")


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


@dataclass(frozen=True)
class LayerConfig:
    """One MoE layer, read by `MoELayer`, its gate and its experts (see `MoEConfig` for what
    each field means)."""

    input_dim: int = 512
    hidden_dim: int = 2048
    output_dim: int = 512
    num_experts: int = 32
    top_k_experts: int = 3

    expert_type: str = "standard"
    activation: str = "gelu"
    cur_rank: int = 64
    dropout: float = 0.0

    gate_type: str = "topk"
    num_shared_experts: int = 0
    jitter_noise: float = 0.0
    capacity_factor: float = 1.25
    slots_per_expert: int = 1

    balance_loss: str = "switch"
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.001
    num_expert_groups: int = 1
    aux_free_update_rate: float = 0.001

    dispatch: str = "dropless"
    kernels: str = "triton"
    dtype: str = "float32"
    router_dtype: str = "float32"

    def __post_init__(self) -> None:
        self._check_values()
        self._check_combinations()

    def _check_values(self) -> None:
        """Each field alone."""
        limits = {"input_dim": MAX_DIM, "hidden_dim": MAX_DIM, "output_dim": MAX_DIM,
                  "num_experts": MAX_EXPERTS, "top_k_experts": MAX_EXPERTS,
                  "cur_rank": MAX_DIM, "slots_per_expert": MAX_SLOTS,
                  "num_expert_groups": MAX_EXPERTS}
        for name, limit in limits.items():
            _positive_int(name, getattr(self, name), limit)
        if isinstance(self.num_shared_experts, bool) or not isinstance(
            self.num_shared_experts, int
        ) or not 0 <= self.num_shared_experts <= MAX_EXPERTS:
            raise ConfigError("num_shared_experts", self.num_shared_experts,
                              f"an integer >= 0, at most {MAX_EXPERTS:,}")
        _choice("expert_type", self.expert_type, EXPERT_TYPES)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("gate_type", self.gate_type, GATE_TYPES)
        _choice("balance_loss", self.balance_loss, BALANCE_LOSSES)
        _choice("dispatch", self.dispatch, DISPATCH_MODES)
        _choice("kernels", self.kernels, KERNELS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("router_dtype", self.router_dtype, DTYPES)
        for name in ("jitter_noise", "load_balance_weight", "z_loss_weight",
                     "aux_free_update_rate", "dropout"):
            _non_negative(name, getattr(self, name))
        if self.dropout >= 1:
            raise ConfigError("dropout", self.dropout, "a probability in [0, 1)")
        if self.jitter_noise >= 1:
            raise ConfigError("jitter_noise", self.jitter_noise, "a value in [0, 1)")
        _non_negative("capacity_factor", self.capacity_factor)
        if self.capacity_factor <= 0:
            raise ConfigError("capacity_factor", self.capacity_factor, "a number > 0")

    def _check_combinations(self) -> None:
        """Fields that constrain one another."""
        if self.top_k_experts > self.num_experts:
            raise ConfigError("top_k_experts", self.top_k_experts,
                              f"at most num_experts={self.num_experts}")
        if self.gate_type == "switch" and self.top_k_experts != 1:
            raise ConfigError("top_k_experts", self.top_k_experts,
                              "1 with gate_type='switch' (switch routing is top-1)")
        if self.jitter_noise > 0 and self.gate_type != "switch":
            raise ConfigError("jitter_noise", self.jitter_noise,
                              "0 unless gate_type='switch' (jitter is switch routing's noise)")
        if self.cur_rank > min(self.input_dim, self.hidden_dim, self.output_dim) and (
            self.expert_type == "cur"
        ):
            raise ConfigError("cur_rank", self.cur_rank,
                              "at most min(input_dim, hidden_dim, output_dim) for 'cur' experts")
        if self.num_experts % self.num_expert_groups:
            raise ConfigError("num_expert_groups", self.num_expert_groups,
                              f"a divisor of num_experts={self.num_experts}")
        if self.num_expert_groups > 1 and self.balance_loss != "group":
            raise ConfigError("num_expert_groups", self.num_expert_groups,
                              "1 unless balance_loss='group'")
        if self.balance_loss == "aux_free" and self.gate_type not in ROUTER_GATES:
            raise ConfigError("balance_loss", self.balance_loss,
                              "a loss other than 'aux_free' with gate_type="
                              f"{self.gate_type!r}: the bias steers only "
                              + ", ".join(ROUTER_GATES))
        if self.num_shared_experts and self.gate_type not in TOKEN_CHOICE_GATES:
            raise ConfigError("num_shared_experts", self.num_shared_experts,
                              "0 with gate_type=" + repr(self.gate_type)
                              + "; shared experts sit beside a token-choice gate")

    @property
    def is_token_choice(self) -> bool:
        return self.gate_type in TOKEN_CHOICE_GATES


@dataclass(frozen=True)
class KnowledgeConfig:
    """The part the librarian reads: how reports become insights."""

    dim: int  # report embedding width (the model's input_dim)
    dedup_threshold: float
    related_threshold: float
    max_kg_nodes: int
    kg_checkpoint_dir: str | None
    kg_save_interval: int
    # None, not MoEConfig's 0.36: a run recorded before the lexical signal existed reads
    # back with it off, as it ran.
    lexical_threshold: float | None = None
    lexical_floor: float = 0.45

    def __post_init__(self) -> None:
        _positive_int("dim", self.dim, MAX_DIM)
        for name in ("dedup_threshold", "related_threshold"):
            value = getattr(self, name)
            if not _is_number(value) or not -1.0 <= value <= 1.0:
                raise ConfigError(name, value, "a cosine similarity in [-1, 1]")
        if self.related_threshold > self.dedup_threshold:
            raise ConfigError("related_threshold", self.related_threshold,
                              f"at most dedup_threshold={self.dedup_threshold}")
        lex = self.lexical_threshold
        if lex is not None and (not _is_number(lex) or not 0 < lex <= 1):
            raise ConfigError("lexical_threshold", lex,
                              "a character 3-gram Jaccard in (0, 1], or None to turn the "
                              "lexical signal off")
        floor = self.lexical_floor
        if not _is_number(floor) or not -1.0 <= floor <= self.dedup_threshold:
            raise ConfigError("lexical_floor", floor,
                              f"a cosine in [-1, dedup_threshold={self.dedup_threshold}]")
        _positive_int("max_kg_nodes", self.max_kg_nodes)
        _positive_int("kg_save_interval", self.kg_save_interval)


@dataclass(frozen=True)
class SystemConfig:
    """The system: ``num_layers`` blocks of ``layer`` behind a supervisor that picks
    constellations of experts; read by `MixtureOfExpertsSystem`, `SupervisorGating` and
    `ExpertConstellation` (see `MoEConfig` for what each field means)."""

    layer: LayerConfig = field(default_factory=LayerConfig)
    num_layers: int = 2
    # name -> expert indices, or name -> {"experts": [...], "description": "..."}
    constellations: dict[str, Any] | None = None
    expert_specializations: list[str] | None = None
    top_k_constellations: int | None = None
    supervisor_heads: int = 4
    constellation_balance_weight: float = 0.01
    report_expert_weight: float = 0.25

    def __post_init__(self) -> None:
        # JSON has no tuples: keep what a checkpoint's config.json reads back identical.
        if isinstance(self.constellations, dict):
            object.__setattr__(self, "constellations",
                               {k: _json_ready(v) for k, v in self.constellations.items()})
        if isinstance(self.expert_specializations, tuple):
            object.__setattr__(self, "expert_specializations", list(self.expert_specializations))
        w = self.report_expert_weight
        if not _is_number(w) or not 0 <= w <= 1e6:
            raise ConfigError("report_expert_weight", w, "a finite number >= 0")
        _positive_int("num_layers", self.num_layers, MAX_LAYERS)
        _positive_int("supervisor_heads", self.supervisor_heads)
        if self.layer.input_dim % self.supervisor_heads:
            raise ConfigError("supervisor_heads", self.supervisor_heads,
                              f"a divisor of input_dim={self.layer.input_dim}")
        _non_negative("constellation_balance_weight", self.constellation_balance_weight)
        self._check_specializations()
        self._check_constellations()
        groups = len(self.constellation_members())
        if self.top_k_constellations is not None:
            _positive_int("top_k_constellations", self.top_k_constellations)
            if self.top_k_constellations > groups:
                raise ConfigError("top_k_constellations", self.top_k_constellations,
                                  f"at most the number of constellations, {groups}")

    def _check_specializations(self) -> None:
        names, experts = self.expert_specializations, self.layer.num_experts
        if names is None:
            return
        if (not isinstance(names, list | tuple) or len(names) != experts
                or not all(isinstance(n, str) and n for n in names)):
            raise ConfigError("expert_specializations", names,
                              f"a list of {experts} non-empty names, one per expert")
        if len(set(names)) != len(names):
            raise ConfigError("expert_specializations", names, "distinct names")

    def _check_constellations(self) -> None:
        if self.constellations is None:
            return
        field, layer = "constellations", self.layer
        if not isinstance(self.constellations, dict) or not self.constellations:
            raise ConfigError(field, self.constellations,
                              "a non-empty mapping of name to expert indices")
        for name, spec in self.constellations.items():
            if isinstance(spec, dict):
                unknown = sorted(set(spec) - {"experts", "description"})
                if unknown or "experts" not in spec:
                    raise ConfigError(f"{field}[{name!r}]", spec, "a list of expert indices, "
                                      "or {'experts': [...], 'description': '...'}")
                if not isinstance(spec.get("description", ""), str):
                    raise ConfigError(f"{field}[{name!r}].description",
                                      spec["description"], "a string")
        groups = dict(self.constellation_members())
        for name, members in groups.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(field, name, "non-empty string names")
            ok = (isinstance(members, list | tuple) and members and len(set(members)) ==
                  len(members) and all(isinstance(m, int) and not isinstance(m, bool)
                                       and 0 <= m < layer.num_experts for m in members))
            if not ok:
                raise ConfigError(f"{field}[{name!r}]", members,
                                  f"distinct expert indices in [0, {layer.num_experts})")
        covered = {m for members in groups.values() for m in members}
        missing = sorted(set(range(layer.num_experts)) - covered)
        if missing:
            raise ConfigError(field, groups, f"every expert in a constellation; expert "
                              f"{missing[0]} is in none")
        smallest = min(len(m) for m in groups.values())
        if layer.top_k_experts > smallest:
            raise ConfigError("top_k_experts", layer.top_k_experts,
                              f"at most the smallest constellation's size, {smallest}")
        if layer.gate_type not in CONSTRAINABLE_GATES:
            raise ConfigError("gate_type", layer.gate_type, "one of "
                              + ", ".join(repr(g) for g in CONSTRAINABLE_GATES)
                              + " when constellations are given")

    def constellation_members(self) -> list[tuple[str, list[int]]]:
        """(name, expert indices) of every constellation, configured or derived."""
        if self.constellations is not None:
            return [(name, list(spec["experts"] if isinstance(spec, dict) else spec))
                    for name, spec in self.constellations.items()]
        return [(name, [e]) for e, name in enumerate(self.expert_names())]

    def constellation_descriptions(self) -> dict[str, str]:
        """Name -> the description a constellation was given ("" where none was)."""
        return {name: (spec.get("description", "") if isinstance(spec, dict) else "")
                for name, spec in (self.constellations or {}).items()} or {
            name: "" for name, _ in self.constellation_members()}

    def constellation_map(self) -> dict[str, list[str]]:
        """Constellation name -> its experts' names (what the graph's model nodes hold)."""
        names = self.expert_names()
        return {name: [names[e] for e in members]
                for name, members in self.constellation_members()}

    def expert_names(self) -> list[str]:
        """A name per expert: its specialization, or ``expert_<i>``."""
        if self.expert_specializations is not None:
            return list(self.expert_specializations)
        return [f"expert_{e}" for e in range(self.layer.num_experts)]

    @property
    def constellations_constrain_routing(self) -> bool:
        """Whether tokens route only among their input's chosen constellations' members."""
        return self.constellations is not None

    @property
    def chosen_per_input(self) -> int:
        """How many constellations the supervisor picks per input."""
        if self.top_k_constellations is not None:
            return self.top_k_constellations
        return 1 if self.constellations is not None else self.layer.top_k_experts


@dataclass(frozen=True)
class OptimizationConfig:
    """How `FullyOptimizedMoESystem` runs the model: nothing here changes what it computes
    beyond rounding, and the plain `MixtureOfExpertsSystem` (what `moe-pipeline run`, the
    workers and `train` use) reads none of it."""

    use_compile: bool = True
    compile_mode: str = "default"
    use_amp: bool = True
    amp_dtype: str = "bfloat16"
    use_gradient_checkpointing: bool = False
    use_cuda_graphs: bool = True
    cuda_graph_max_tokens: int = 8192

    def __post_init__(self) -> None:
        _choice("compile_mode", self.compile_mode, COMPILE_MODES)
        _choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        _positive_int("cuda_graph_max_tokens", self.cuda_graph_max_tokens, MAX_GRAPH_TOKENS)
        for name in ("use_compile", "use_amp", "use_gradient_checkpointing", "use_cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "True or False")
