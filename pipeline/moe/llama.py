"""Dense → MoE conversion of Llama models ("sparse upcycling") and generation with stats.

`convert_to_moe` replaces the MLP of chosen decoder layers of a Hugging Face
``LlamaForCausalLM`` (read from local files by `llama_files.load_llama`, or made by
`tiny_llama.tiny_llama`) with `MoEMLP` layers whose experts start from the dense MLP
(Komatsuzaki et al., Sparse Upcycling, arXiv:2212.05055):

* ``copy``: every expert is the dense MLP. With gated experts and any gate whose weights sum
  to one per token (top-k, noisy top-k in eval, hash, random, expert choice at full capacity)
  the converted model computes exactly what the dense one did.
* ``perturb``: copy, plus Gaussian noise of ``expert_init_noise`` times each matrix's std, so
  that experts can drift apart under training.
* ``split``: the MLP's hidden units are partitioned among the experts (each gets
  ``intermediate_size / E`` of them): the routed parameter count equals the dense MLP's.
* ``random``: fresh experts of the MLP's shape.

`generate` samples text and reports, per MoE layer, expert usage and routing entropy.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError, InputShapeError
from pipeline.moe.analysis import expert_usage, parameter_counts
from pipeline.moe.config import TOKEN_ID_GATES, MoEConfig
from pipeline.moe.layer import MoEAux, MoELayer

INIT_STRATEGIES = ("copy", "perturb", "split", "random")


class MoEMLP(nn.Module):
    """A decoder layer's MLP as a MoE layer: tensor in, tensor out, routing kept aside.

    ``last_aux`` holds the latest forward's `MoEAux` (its ``loss`` is what a training loop
    adds for this layer); ``record`` accumulates counts and entropy while it is a list.
    Hash routing reads ``token_ids``, which `convert_to_moe` keeps set to the model's
    ``input_ids`` on every forward (so cached decoding hashes the new token, not position 0).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.moe = MoELayer(config)
        self.last_aux: MoEAux | None = None
        self.record: list[MoEAux] | None = None
        self.token_ids: Tensor | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        ids = None
        if self.moe.config.gate_type in TOKEN_ID_GATES:
            ids = self.token_ids
            if ids is None or tuple(ids.shape) != tuple(hidden_states.shape[:-1]):
                raise InputShapeError("input_ids", () if ids is None else tuple(ids.shape),
                                      "the token ids of this forward: hash routing needs "
                                      "input_ids, not inputs_embeds")
        y, aux = self.moe(hidden_states, token_ids=ids)
        self.last_aux = aux
        if self.record is not None:
            self.record.append(aux)
        return y


class _GatedMLP(Protocol):
    """What the conversion reads of a decoder layer's dense MLP (transformers' LlamaMLP)."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


def _layers(model: nn.Module) -> Any:
    """The decoder layers: transformers' modules, whose attributes are read by name."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConfigError("model", type(model).__name__,
                          "a Llama-style model with .model.layers (LlamaForCausalLM)")
    return layers


def _init_experts(layer: MoELayer, mlp: _GatedMLP, strategy: str, noise: float,
                  gen: torch.Generator) -> None:
    ex, E = layer.experts, layer.config.num_experts
    gate, up, down = (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                      mlp.down_proj.weight.detach())
    with torch.no_grad():
        if strategy in ("copy", "perturb"):
            targets = {"w1": gate, "w2": down}
            if ex.expert_type == "gated":
                targets["w3"] = up
            for name, w in targets.items():
                stacked = w.to(ex.dtype).unsqueeze(0).expand(E, *w.shape).clone()
                if strategy == "perturb":
                    stacked += noise * w.float().std() * torch.randn(
                        stacked.shape, generator=gen).to(stacked)
                getattr(ex, name).copy_(stacked)
        elif strategy == "split":
            h = gate.shape[0] // E
            ex.w1.copy_(gate[: E * h].reshape(E, h, -1))
            ex.w2.copy_(down[:, : E * h].reshape(down.shape[0], E, h).permute(1, 0, 2))
            if ex.expert_type == "gated":
                ex.w3.copy_(up[: E * h].reshape(E, h, -1))


def convert_to_moe(model: nn.Module, layers: list[int], num_experts: int = 8, top_k: int = 2,
                   expert_init_strategy: str = "perturb", expert_init_noise: float = 0.01,
                   gate_type: str = "topk", balance_loss: str = "switch",
                   expert_type: str = "gated", seed: int = 0, **config: Any) -> nn.Module:
    """A copy of ``model`` whose listed decoder layers (0-based) have MoE MLPs.

    Extra keyword arguments go to each layer's `MoEConfig` (``capacity_factor``,
    ``load_balance_weight``, ``num_shared_experts``...). The original model is untouched.
    ``seed`` fixes everything random in the conversion (routers, perturbation noise): the
    same arguments give the same MoE model.
    """
    if expert_init_strategy not in INIT_STRATEGIES:
        raise ConfigError("expert_init_strategy", expert_init_strategy,
                          "one of " + ", ".join(repr(s) for s in INIT_STRATEGIES))
    if expert_type == "cur" and expert_init_strategy != "random":
        raise ConfigError("expert_type", expert_type, "'gated' or 'standard' to initialise "
                          f"from the dense MLP with {expert_init_strategy!r}")
    decoder = _layers(model)
    bad = [i for i in layers if not 0 <= i < len(decoder)]
    if bad or not layers or len(set(layers)) != len(layers):
        raise ConfigError("layers", layers, f"distinct indices in [0, {len(decoder)})")
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    # The routers' initialisation draws from the global RNG: a forked one seeded with
    # ``seed`` makes the conversion reproducible without disturbing the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in layers:
            mlp = _layers(out)[i].mlp
            d, hidden = mlp.gate_proj.weight.shape[1], mlp.gate_proj.weight.shape[0]
            if expert_init_strategy == "split":
                if hidden % num_experts:
                    raise ConfigError("num_experts", num_experts,
                                      f"a divisor of the MLP's hidden size {hidden} for 'split'")
                hidden //= num_experts
            cfg = MoEConfig(input_dim=d, hidden_dim=hidden, output_dim=d, num_experts=num_experts,
                            top_k_experts=top_k, expert_type=expert_type, activation="silu",
                            gate_type=gate_type, balance_loss=balance_loss,
                            dtype=dtype, **config)
            moe = MoEMLP(cfg).to(next(mlp.parameters()).device)
            _init_experts(moe.moe, mlp, expert_init_strategy, expert_init_noise, gen)
            _layers(out)[i].mlp = moe
    if gate_type in TOKEN_ID_GATES:
        out.register_forward_pre_hook(_share_token_ids, with_kwargs=True)
    return out


def converted_parameters(model: nn.Module, layers: list[int], num_experts: int,
                         expert_init_strategy: str = "perturb") -> int:
    """Parameters `convert_to_moe` would give ``model``, by arithmetic on its MLPs' shapes
    (so that ``--experts 100000`` is refused before it is allocated): each converted MLP
    becomes E experts of its size (``split``: of 1/E of it) and a router (E, D)."""
    decoder = _layers(model)
    total = count_parameters(model)
    for i in layers:
        if not 0 <= i < len(decoder):
            continue  # convert_to_moe refuses it, naming the layers
        mlp = decoder[i].mlp
        size = sum(p.numel() for p in mlp.parameters())
        d = mlp.gate_proj.weight.shape[1]
        experts = size if expert_init_strategy == "split" else num_experts * size
        total += experts - size + num_experts * d
    return total


def _share_token_ids(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Hand each forward's input_ids to the hash-routed MoE MLPs."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    for mlp in moe_mlps(model).values():
        mlp.token_ids = ids


def moe_mlps(model: nn.Module) -> dict[int, MoEMLP]:
    """The MoE MLPs of a converted model by decoder-layer index."""
    return {i: layer.mlp for i, layer in enumerate(_layers(model))
            if isinstance(layer.mlp, MoEMLP)}


def count_parameters(model: nn.Module) -> int:
    return parameter_counts(model)["total"]


def count_active_parameters(model: nn.Module) -> int:
    """Parameters one token passes through: routed experts count by their k/E share."""
    return parameter_counts(model)["active"]


class GenerationResult(NamedTuple):
    text: str
    token_ids: list[int]
    expert_usage: dict[int, list[float]]  # decoder layer -> percent of assignments per expert
    routing_entropy: dict[int, float]  # decoder layer -> mean per-token entropy, nats


def kv_cache(model: nn.Module) -> dict[str, Any]:
    """A fresh ``DynamicCache`` keyed by the name this transformers' forward takes it under.

    transformers 5 renamed the argument ``past_key_values`` to ``cache`` (the old name, and
    reading ``output.past_key_values``, raise a FutureWarning until its removal in 5.40);
    4.x knows only ``past_key_values``. Every forward fills the cache in place, so a decoding
    loop passes the same ``**kv_cache(model)`` each step and never reads it back.
    """
    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: DynamicCache()}


def _sample(logits: Tensor, temperature: float, gen: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)


@torch.no_grad()
def generate(moe_model: nn.Module, tokenizer: Any, prompt: str, temperature: float = 0.9,
             max_new_tokens: int = 64, show_expert_stats: bool = False,
             show_routing_entropy: bool = False, expert_usage_threshold: float = 0.01,
             seed: int | None = None) -> GenerationResult:
    """Sample a continuation of ``prompt``; temperature 0 is greedy.

    ``tokenizer`` needs ``encode(text) -> ids`` (with BOS) and ``decode(ids) -> text``: a
    Hugging Face tokenizer or `Llama2cTokenizer`. Expert usage and routing entropy per MoE
    layer are always returned; ``show_*`` also prints them (experts under
    ``expert_usage_threshold`` of the assignments are left out of the printout).
    """
    moe_model.eval()
    device = next(moe_model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    mlps = moe_mlps(moe_model)
    records: dict[int, list[MoEAux]] = {}
    for i, m in mlps.items():
        m.record = records[i] = []
    try:
        ids = list(tokenizer.encode(prompt))
        eos = getattr(tokenizer, "eos_token_id", None)
        limit = getattr(moe_model.config, "max_position_embeddings", None) or math.inf
        cache = kv_cache(moe_model)
        out = moe_model(torch.tensor([ids], device=device), use_cache=True, **cache)
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = _sample(out.logits[:, -1], temperature, gen)
            token = int(nxt)  # the host must know the token to stop or decode
            if token == eos or len(ids) + len(new) >= limit:
                break
            new.append(token)
            out = moe_model(nxt.view(1, 1), use_cache=True, **cache)
        stats = {i: _layer_stats(records[i]) for i in mlps}
    finally:
        for m in mlps.values():
            m.record = None
    # Decode with the prompt in front: tokenizers drop a word's leading space at the start.
    prefix = tokenizer.decode(ids, skip_special_tokens=True)
    text = tokenizer.decode(ids + new, skip_special_tokens=True)[len(prefix):]
    result = GenerationResult(text, new,
                              {i: s[0] for i, s in stats.items()},
                              {i: s[1] for i, s in stats.items()})
    if show_expert_stats or show_routing_entropy:
        print(format_stats(result, show_expert_stats, show_routing_entropy,
                           expert_usage_threshold))
    return result


def _layer_stats(record: list[MoEAux]) -> tuple[list[float], float]:
    counts = torch.stack([a.counts.float().cpu() for a in record]).sum(0)
    tokens = torch.tensor([float(a.counts.sum()) for a in record])
    entropies = torch.stack([a.router_entropy.float().cpu() for a in record])
    mean_entropy = float((entropies * tokens).sum() / tokens.sum().clamp_min(1))
    return expert_usage(counts)["percent"], mean_entropy


def format_stats(result: GenerationResult, experts: bool = True, entropy: bool = True,
                 threshold: float = 0.01) -> str:
    lines = []
    for layer, percent in result.expert_usage.items():
        parts = [f"layer {layer}:"]
        if experts:
            parts.append(" ".join(f"e{e}={p:.0f}%" for e, p in enumerate(percent)
                                  if p >= 100 * threshold))
        if entropy:
            parts.append(f"entropy={result.routing_entropy[layer]:.3f}")
        lines.append("  ".join(parts))
    return "\n".join(lines)


def generate_batch(moe_model: nn.Module, tokenizer: Any, prompts: list[str],
                   show_progress: bool = True, **kwargs: Any) -> list[GenerationResult]:
    """`generate` for each prompt, with a progress bar."""
    from tqdm import tqdm

    return [generate(moe_model, tokenizer, p, **kwargs)
            for p in tqdm(prompts, desc="generating", disable=not show_progress)]
