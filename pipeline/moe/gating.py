"""Gates: router logits in, routing decisions out.

Legend: T tokens, D model dim, E experts, K experts per token, C tokens per expert (expert
choice), B sequences, N tokens per sequence (T = B * N), S slots (soft MoE: E *
slots_per_expert).

Three shapes of decision, one NamedTuple each (NamedTuples trace cleanly under torch.compile):

* `TokenChoice` — each token picks K experts (top-k, switch, noisy top-k, hash, random).
* `ExpertChoice` — each expert picks C tokens (Zhou et al. 2022, arXiv:2202.09368).
* `SoftRouting` — each slot is a weighted average of a sequence's tokens and each token a
  weighted average of slot outputs (Puigcerver et al. 2023, arXiv:2308.00951).

Every gate is called the same way, so that the layer needs no branch per gate::

    gate(x_TD, *, token_ids_T=None, bias_E=None, allowed_TE=None, batch=1) -> Routing

* ``x_TD`` (T, D) float: the tokens, flattened over sequences, as the router should see them.
* ``token_ids_T`` (T,) int: vocabulary ids; only hash routing reads them.
* ``bias_E`` (E,) float32: the aux-free balancing bias; only learned routers (top-k, switch,
  noisy top-k) can be steered by it.
* ``allowed_TE`` (T, E) bool: the experts each token may reach (its input's constellations);
  honoured by the learned routers and random routing.
* ``batch``: B, the number of equal-length sequences ``x_TD`` is made of. Soft MoE mixes
  tokens within a sequence and hash routing falls back to a token's position in it; the
  other gates route each token (or, for expert choice, the whole batch) alike and need no
  sequence grouping, so they do not read it.

A tensor argument a gate cannot honour is refused with `InputShapeError` rather than
silently ignored: an expert-choice, soft or hash gate handed ``allowed_TE`` would otherwise
route outside the constellations it was asked to respect. (`MoEConfig` already refuses those
constellations, and the aux-free bias for gates without a learned router, so the layer never
trips this; a direct caller does.) ``batch`` is a description of ``x_TD``'s layout, not a
request, and is read only where the grouping matters. Tensors stay keyword-only so that a
call written for another gate cannot bind a bias to an allowed mask by position.

The router runs in float32 whatever the model's dtype (softmax over low-precision logits
loses the small differences routing depends on; torchtitan and DeepSeek-V3 do the same).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import InputShapeError
from pipeline.moe.config import LayerConfig


class TokenChoice(NamedTuple):
    expert_ids: Tensor  # (T, K) int64, distinct per token
    weights: Tensor  # (T, K) combine weights, float32
    probs: Tensor  # (T, E) float32 router probabilities (balance losses, entropy)
    logits: Tensor | None  # (T, E) float32 raw logits (z-loss); None without a router


class ExpertChoice(NamedTuple):
    token_ids: Tensor  # (E, C) int64, distinct per expert
    weights: Tensor  # (E, C) float32
    probs: Tensor  # (T, E) float32
    logits: Tensor  # (T, E) float32


class SoftRouting(NamedTuple):
    dispatch: Tensor  # (B, N, S) float32, softmax over N: slot = sum_n dispatch * x
    combine: Tensor  # (B, N, S) float32, softmax over S: y = sum_s combine * slot_out
    logits: Tensor  # (B, N, S) float32


Routing = TokenChoice | ExpertChoice | SoftRouting


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens per expert at ``capacity_factor`` times the even share: ``ceil(f T k / E)``, <= T."""
    return min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _refuse(gate: str, **unusable: Tensor | None) -> None:
    """Raise for each given tensor this gate cannot honour (see the module docstring)."""
    for name, value in unusable.items():
        if value is not None:
            raise InputShapeError(name, tuple(value.shape), f"None: gate {gate!r} cannot "
                                  "use it")


def _sequence_length(x_TD: Tensor, batch: int) -> int:
    """N, the length of each of the ``batch`` sequences whose tokens make up ``x_TD``."""
    T = x_TD.shape[0]
    if batch < 1 or T % batch:
        raise InputShapeError("x_TD", tuple(x_TD.shape),
                              f"batch={batch} equal-length sequences (T a multiple of it)")
    return T // batch


class Router(nn.Module):
    """A bias-free linear map from tokens to one logit per expert: ``(T, D) -> (T, E)``."""

    def __init__(self, dim: int, num_experts: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.compute_dtype = dtype
        self.weight = nn.Parameter(torch.empty(num_experts, dim, dtype=torch.float32))
        nn.init.normal_(self.weight, std=dim ** -0.5)

    def forward(self, x_TD: Tensor) -> Tensor:
        with torch.autocast(x_TD.device.type, enabled=False):  # the router stays in its dtype
            return F.linear(x_TD.to(self.compute_dtype),
                            self.weight.to(self.compute_dtype)).float()


def _confine(logits_TE: Tensor, allowed_TE: Tensor | None) -> Tensor:
    """Logits of experts outside a token's allowed set become -inf (probability 0)."""
    if allowed_TE is None:
        return logits_TE
    return logits_TE.masked_fill(~allowed_TE, float("-inf"))


def _select(scores_TE: Tensor, k: int, bias_E: Tensor | None,
            allowed_TE: Tensor | None) -> Tensor:
    """Top-k expert ids; the aux-free bias shifts the choice, never the weights.

    The allowed mask is applied after the bias, so no bias can reach a forbidden expert.
    """
    if bias_E is not None:
        scores_TE = scores_TE + bias_E
    return torch.topk(_confine(scores_TE, allowed_TE), k, dim=-1, sorted=False).indices


class TopKGate(nn.Module):
    """Softmax over all experts, keep the top k, renormalise their weights to sum to 1.

    Honours ``bias_E`` and ``allowed_TE``; refuses ``token_ids_T``; ``batch`` is not read.
    """

    def __init__(self, cfg: LayerConfig) -> None:
        super().__init__()
        self.k = cfg.top_k_experts
        self.router = Router(cfg.input_dim, cfg.num_experts, _dtype(cfg.router_dtype))

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor | None = None,
                bias_E: Tensor | None = None, allowed_TE: Tensor | None = None,
                batch: int = 1) -> TokenChoice:
        _refuse("topk", token_ids_T=token_ids_T)
        logits_TE = self.router(x_TD)
        probs_TE = torch.softmax(_confine(logits_TE, allowed_TE), dim=-1)
        ids_TK = _select(probs_TE, self.k, bias_E, allowed_TE)
        w_TK = probs_TE.gather(1, ids_TK)
        return TokenChoice(ids_TK, w_TK / w_TK.sum(-1, keepdim=True), probs_TE, logits_TE)


class SwitchGate(nn.Module):
    """Top-1 routing weighted by the chosen probability (Fedus et al., arXiv:2101.03961).

    Training multiplies the router's input by ``U(1 - eps, 1 + eps)`` noise when
    ``jitter_noise = eps > 0``, as the Switch Transformer does. Honours ``bias_E`` and
    ``allowed_TE``; refuses ``token_ids_T``; ``batch`` is not read.
    """

    def __init__(self, cfg: LayerConfig) -> None:
        super().__init__()
        self.jitter = cfg.jitter_noise
        self.router = Router(cfg.input_dim, cfg.num_experts, _dtype(cfg.router_dtype))

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor | None = None,
                bias_E: Tensor | None = None, allowed_TE: Tensor | None = None,
                batch: int = 1) -> TokenChoice:
        _refuse("switch", token_ids_T=token_ids_T)
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        logits_TE = self.router(x_TD)
        probs_TE = torch.softmax(_confine(logits_TE, allowed_TE), dim=-1)
        ids_T1 = _select(probs_TE, 1, bias_E, allowed_TE)
        return TokenChoice(ids_T1, probs_TE.gather(1, ids_T1), probs_TE, logits_TE)


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017, arXiv:1701.06538).

    Training adds ``N(0, 1) * softplus(x W_noise)`` to the logits; the weights are a softmax
    over the k kept (noisy) logits. In eval it is plain top-k. Honours ``bias_E`` and
    ``allowed_TE``; refuses ``token_ids_T``; ``batch`` is not read.
    """

    def __init__(self, cfg: LayerConfig) -> None:
        super().__init__()
        self.k = cfg.top_k_experts
        self.router = Router(cfg.input_dim, cfg.num_experts, _dtype(cfg.router_dtype))
        self.noise = Router(cfg.input_dim, cfg.num_experts, _dtype(cfg.router_dtype))
        nn.init.zeros_(self.noise.weight)  # starts at softplus(0) = 0.69 noise everywhere

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor | None = None,
                bias_E: Tensor | None = None, allowed_TE: Tensor | None = None,
                batch: int = 1) -> TokenChoice:
        _refuse("noisy_topk", token_ids_T=token_ids_T)
        logits_TE = self.router(x_TD)
        if self.training:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * F.softplus(self.noise(x_TD))
        confined_TE = _confine(logits_TE, allowed_TE)
        probs_TE = torch.softmax(confined_TE, dim=-1)
        ids_TK = _select(probs_TE, self.k, bias_E, allowed_TE)
        w_TK = torch.softmax(confined_TE.gather(1, ids_TK), dim=-1)
        return TokenChoice(ids_TK, w_TK, probs_TE, logits_TE)


class ExpertChoiceGate(nn.Module):
    """Experts pick tokens: each expert takes the C tokens that score it highest.

    ``C = ceil(capacity_factor * T * k / E)`` (at most T), so on average a token is processed
    by ``capacity_factor * k`` experts; load is balanced by construction. Experts choose
    among all T tokens of the batch, so ``batch`` is not read. Refuses ``token_ids_T``,
    ``bias_E`` (balance needs no bias here) and ``allowed_TE`` (an expert's top C cannot be
    confined per token without breaking its fixed capacity).
    """

    def __init__(self, cfg: LayerConfig) -> None:
        super().__init__()
        self.k, self.capacity_factor = cfg.top_k_experts, cfg.capacity_factor
        self.num_experts = cfg.num_experts
        self.router = Router(cfg.input_dim, cfg.num_experts, _dtype(cfg.router_dtype))

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor | None = None,
                bias_E: Tensor | None = None, allowed_TE: Tensor | None = None,
                batch: int = 1) -> ExpertChoice:
        _refuse("expert_choice", token_ids_T=token_ids_T, bias_E=bias_E, allowed_TE=allowed_TE)
        logits_TE = self.router(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        C = capacity(x_TD.shape[0], self.k, self.num_experts, self.capacity_factor)
        w_EC, tok_EC = torch.topk(probs_TE.t(), C, dim=-1)
        return ExpertChoice(tok_EC, w_EC, probs_TE, logits_TE)


class SoftMoEGate(nn.Module):
    """Soft MoE slots: per-slot softmax over a sequence's tokens, per-token softmax over slots.

    Inputs and slot parameters are L2-normalised with a learned scale, as the paper
    recommends for stable logits at large widths. Reads ``batch`` to split ``x_TD`` into its
    sequences (slots never mix tokens of different sequences). Refuses ``token_ids_T``,
    ``bias_E`` and ``allowed_TE``: every token reaches every slot, so there is no choice for
    a bias or a mask to act on.
    """

    def __init__(self, cfg: LayerConfig) -> None:
        super().__init__()
        self.num_slots = cfg.num_experts * cfg.slots_per_expert
        self.phi = nn.Parameter(torch.randn(self.num_slots, cfg.input_dim) * cfg.input_dim ** -0.5)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor | None = None,
                bias_E: Tensor | None = None, allowed_TE: Tensor | None = None,
                batch: int = 1) -> SoftRouting:
        _refuse("soft", token_ids_T=token_ids_T, bias_E=bias_E, allowed_TE=allowed_TE)
        x_BND = x_TD.view(batch, _sequence_length(x_TD, batch), x_TD.shape[-1])
        with torch.autocast(x_BND.device.type, enabled=False):
            x = F.normalize(x_BND.float(), dim=-1)
            phi = F.normalize(self.phi, dim=-1) * self.scale
            logits_BNS = torch.einsum("bnd,sd->bns", x, phi)
        return SoftRouting(torch.softmax(logits_BNS, dim=1), torch.softmax(logits_BNS, dim=2),
                           logits_BNS)


def _uniform_weights(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    k = ids_TK.shape[1]
    w_TK = torch.full(ids_TK.shape, 1.0 / k, device=ids_TK.device)
    probs_TE = torch.zeros(ids_TK.shape[0], num_experts, device=ids_TK.device)
    return w_TK, probs_TE.scatter_(1, ids_TK, 1.0 / k)


class HashGate(nn.Module):
    """Hash routing (Roller et al. 2021, arXiv:2106.04426): experts fixed by the token's id.

    A table, drawn once from a fixed seed and saved with the model, gives each of 65,536
    buckets k distinct experts; a token goes to its id's bucket (``token_ids_T``), or, when
    no ids are given, to its position within its sequence (read from ``batch``). ``x_TD``
    gives only the count and the device. No parameters are learned, so it has no balance
    loss; weights are 1/k. Refuses ``bias_E`` and ``allowed_TE``: the experts are fixed by
    the id, so neither a bias nor a mask can move them.
    """

    NUM_BUCKETS = 65536
    table: Tensor  # (NUM_BUCKETS, K) int64 expert ids, a buffer

    def __init__(self, cfg: LayerConfig, seed: int = 0) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        gen = torch.Generator().manual_seed(seed)
        table = torch.rand(self.NUM_BUCKETS, cfg.num_experts, generator=gen)
        self.register_buffer("table", table.topk(cfg.top_k_experts, dim=-1).indices)

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor | None = None,
                bias_E: Tensor | None = None, allowed_TE: Tensor | None = None,
                batch: int = 1) -> TokenChoice:
        _refuse("hash", bias_E=bias_E, allowed_TE=allowed_TE)
        if token_ids_T is None:
            N = _sequence_length(x_TD, batch)
            token_ids_T = torch.arange(N, device=x_TD.device).repeat(batch)
        ids_TK = self.table[token_ids_T.remainder(self.NUM_BUCKETS)]
        w_TK, probs_TE = _uniform_weights(ids_TK, self.num_experts)
        return TokenChoice(ids_TK, w_TK, probs_TE, None)


class RandomGate(nn.Module):
    """k distinct experts drawn uniformly per token, weights 1/k: a baseline for ablations.

    Draws among the ``allowed_TE`` experts when given; refuses ``token_ids_T`` and ``bias_E``
    (nothing learned for a bias to steer); ``batch`` is not read.
    """

    def __init__(self, cfg: LayerConfig) -> None:
        super().__init__()
        self.num_experts, self.k = cfg.num_experts, cfg.top_k_experts

    def forward(self, x_TD: Tensor, *, token_ids_T: Tensor | None = None,
                bias_E: Tensor | None = None, allowed_TE: Tensor | None = None,
                batch: int = 1) -> TokenChoice:
        _refuse("random", token_ids_T=token_ids_T, bias_E=bias_E)
        scores = torch.rand(x_TD.shape[0], self.num_experts, device=x_TD.device)
        if allowed_TE is not None:
            scores = scores.masked_fill(~allowed_TE, -1.0)
        ids_TK = scores.topk(self.k, dim=-1).indices
        w_TK, probs_TE = _uniform_weights(ids_TK, self.num_experts)
        return TokenChoice(ids_TK, w_TK, probs_TE, None)


# Keyed by `pipeline.moe.config.GATE_TYPES`, in its order (tests/test_moe_layer.py checks).
GATES: dict[str, type[nn.Module]] = {
    "topk": TopKGate,
    "switch": SwitchGate,
    "noisy_topk": NoisyTopKGate,
    "expert_choice": ExpertChoiceGate,
    "soft": SoftMoEGate,
    "hash": HashGate,
    "random": RandomGate,
}


def build_gate(cfg: LayerConfig) -> nn.Module:
    return GATES[cfg.gate_type](cfg)
