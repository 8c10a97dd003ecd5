"""`MoEConfig`: the model's hyperparameters as one flat constructor, and its four parts.

The fields stay flat (the original framework's names are what users type, and what a
checkpoint's config.json holds); the config builds its parts once, and that is its
validation (each part checks its own fields, `pipeline.moe.config_parts`): ``layer``,
``system``, ``knowledge`` and ``optimization`` hand each consumer only its part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any

from pipeline.errors import ConfigError
from pipeline.moe.config_parts import (  # noqa: F401 - the constants are named from here too
    ACTIVATIONS,
    AMP_DTYPES,
    BALANCE_LOSSES,
    COMPILE_MODES,
    CONSTRAINABLE_GATES,
    DISPATCH_MODES,
    DTYPES,
    EXPERT_TYPES,
    GATE_TYPES,
    KERNELS,
    MAX_DIM,
    MAX_EXPERTS,
    MAX_GRAPH_TOKENS,
    MAX_LAYERS,
    MAX_SLOTS,
    ROUTER_GATES,
    TOKEN_CHOICE_GATES,
    TOKEN_ID_GATES,
    KnowledgeConfig,
    LayerConfig,
    OptimizationConfig,
    SystemConfig,
)


@dataclass(frozen=True)
class MoEConfig:
    """Hyperparameters of a mixture-of-experts layer and the system around it, flat.

    Dimensions: experts map ``input_dim -> hidden_dim -> output_dim``.

    Routing: ``gate_type`` picks the scheme; ``top_k_experts`` is the number of experts per
    token for token-choice gates and the average number per token for expert choice (its
    capacity is ``capacity_factor * tokens * top_k / num_experts``). Soft MoE uses
    ``slots_per_expert`` instead of k. ``num_shared_experts`` adds DeepSeek-style experts that
    every token passes through, beside any token-choice gate.

    Balance: ``balance_loss`` with weight ``load_balance_weight`` (the name the original
    framework used), plus the router z-loss with ``z_loss_weight``. ``"aux_free"`` adds no
    loss; it steers selection with a per-expert bias that `MoELayer.update_balance_bias`
    moves by ``aux_free_update_rate`` against the observed load.

    Dispatch: ``"dropless"`` runs every assignment (grouped GEMM on CUDA); ``"capacity"`` keeps
    static shapes (for ``torch.compile(fullgraph=True)`` and CUDA graphs) and drops what exceeds
    ``capacity_factor`` times the balanced load. ``kernels="triton"`` runs dropless dispatch of
    standard and gated experts on the Triton kernels of `pipeline.moe.kernels` where they can
    run (CUDA with triton installed), the router's top-k fused into them for the learned
    gates; ``"torch"`` keeps the readable torch path everywhere. The CPU takes the torch path.
    ``dtype`` is the experts' weights' dtype, ``router_dtype`` the router's. These fields form
    ``.layer`` (`LayerConfig`).

    System (``.system``, `SystemConfig`): ``num_layers`` MoE blocks behind a supervisor.
    ``constellations`` names groups of experts (``{"mathematics": [0, 3, 7], ...}``, overlaps
    allowed, every expert in one at least); the supervisor (``supervisor_heads`` attention
    heads) picks ``top_k_constellations`` of them per input (default 1) and that input's
    tokens route among their members only; ``constellation_balance_weight`` weighs its
    balance loss. With none given, each expert is its own constellation, named by
    ``expert_specializations`` when given, tokens route over all experts (a flat top-k MoE)
    and ``top_k_constellations`` defaults to ``top_k_experts``.

    A constellation may carry a ``description`` beside its experts (``{"mathematics":
    {"experts": [0, 1], "description": "numbers, proofs, equations"}}``): the pipeline starts
    the supervisor from the encoded descriptions, so a new model routes by meaning before any
    training. A draft report's embedding is the item's own (pooled, unit) input plus
    ``report_expert_weight`` times its constellation's (unit) expert output, renormalised:
    report space stays the encoder's space, shaded by what the experts made of it (0 gives the
    encoder's space exactly; a large weight, the experts' output alone).

    Knowledge graph (``.knowledge``, `KnowledgeConfig`, the librarian): reports at cosine >=
    ``dedup_threshold`` are one insight, and so are reports whose texts share at least
    ``lexical_threshold`` of their character 3-grams (Jaccard) at cosine >= ``lexical_floor``
    (None: cosine alone); new insights link to neighbours with ``related_threshold <= cosine <
    dedup_threshold`` (SIMILAR_TO). ``max_kg_nodes`` bounds each shard's hot cache (the
    least-supported, oldest insights leave it first and stay in the graph); with
    ``kg_checkpoint_dir`` the caches are snapshotted every ``kg_save_interval`` added insights.

    Optimizations (``.optimization``, `OptimizationConfig`), read by `FullyOptimizedMoESystem`
    only: the plain system, which `moe-pipeline run`, the workers and `train` serve, runs
    without them (a checkpoint keeps them, and they are part of its fingerprint, but they do
    not change its weights). ``use_compile`` with ``compile_mode``, ``use_amp`` with
    ``amp_dtype`` (float16 brings a gradient scaler), ``use_gradient_checkpointing``; on CUDA,
    ``use_cuda_graphs`` serves `FullyOptimizedMoESystem.infer` from CUDA graphs over a static
    input buffer of ``cuda_graph_max_tokens`` tokens (a larger batch is refused, naming the
    setting).

    Frozen, like its parts: the parts are built once, here, and stay true to the fields.
    """

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

    num_layers: int = 2
    # name -> expert indices, or name -> {"experts": [...], "description": "..."}
    constellations: dict[str, Any] | None = None
    expert_specializations: list[str] | None = None
    top_k_constellations: int | None = None
    supervisor_heads: int = 4
    constellation_balance_weight: float = 0.01
    report_expert_weight: float = 0.25

    dedup_threshold: float = 0.85
    related_threshold: float = 0.5
    lexical_threshold: float | None = 0.36
    lexical_floor: float = 0.45
    max_kg_nodes: int = 100_000
    kg_checkpoint_dir: str | None = None
    kg_save_interval: int = 1000

    use_compile: bool = True
    compile_mode: str = "default"
    use_amp: bool = True
    amp_dtype: str = "bfloat16"
    use_gradient_checkpointing: bool = False
    use_cuda_graphs: bool = True
    cuda_graph_max_tokens: int = 8192

    def __post_init__(self) -> None:
        # Building the parts is the validation, in this order: a config with faults in
        # several parts reports its layer's first.
        _ = (self.layer, self.knowledge, self.system, self.optimization)
        # The system part keeps its collections as JSON reads them back (lists, not tuples);
        # so do the flat fields, so that a checkpoint's config.json reads back identical.
        object.__setattr__(self, "constellations", self.system.constellations)
        object.__setattr__(self, "expert_specializations", self.system.expert_specializations)

    def _flat(self, part: type) -> dict[str, Any]:
        """The flat fields a part holds (`KnowledgeConfig`'s ``dim`` is ``input_dim``)."""
        return {f.name: getattr(self, f.name) for f in fields(part)
                if f.name not in ("layer", "dim")}

    # -- the parts: built on first use (in __post_init__), then kept; frozen, so always true
    # to the flat fields (cached_property writes the instance dict, which freezing allows)
    @cached_property
    def layer(self) -> LayerConfig:
        """The layer's fields, for `MoELayer`, its gate and its experts."""
        return LayerConfig(**self._flat(LayerConfig))

    @cached_property
    def system(self) -> SystemConfig:
        """The system's fields (its layer included), for the supervisor and constellations."""
        return SystemConfig(layer=self.layer, **self._flat(SystemConfig))

    @cached_property
    def knowledge(self) -> KnowledgeConfig:
        """The knowledge-graph fields only, for the librarian."""
        return KnowledgeConfig(dim=self.input_dim, **self._flat(KnowledgeConfig))

    @cached_property
    def optimization(self) -> OptimizationConfig:
        """The switches of `FullyOptimizedMoESystem`."""
        return OptimizationConfig(**self._flat(OptimizationConfig))

    # -- what the system part answers, kept on the flat config for its callers -------------
    def constellation_members(self) -> list[tuple[str, list[int]]]:
        """(name, expert indices) of every constellation, configured or derived."""
        return self.system.constellation_members()

    def constellation_descriptions(self) -> dict[str, str]:
        """Name -> the description a constellation was given ("" where none was)."""
        return self.system.constellation_descriptions()

    def expert_names(self) -> list[str]:
        """A name per expert: its specialization, or ``expert_<i>``."""
        return self.system.expert_names()

    @property
    def constellations_constrain_routing(self) -> bool:
        """Whether tokens route only among their input's chosen constellations' members."""
        # Read from the flat field, not the part: the system's forward asks this under
        # torch.compile, which traces a plain attribute without a cached_property lookup.
        return self.constellations is not None

    @property
    def chosen_per_input(self) -> int:
        """How many constellations the supervisor picks per input."""
        return self.system.chosen_per_input

    @property
    def is_token_choice(self) -> bool:
        return self.layer.is_token_choice

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], "a known MoEConfig field")
        return cls(**data)


def as_layer(config: MoEConfig | LayerConfig) -> LayerConfig:
    """The layer part of a config given either way (`MoELayer` takes both)."""
    return config.layer if isinstance(config, MoEConfig) else config
