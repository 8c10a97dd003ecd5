"""`MoELayer`: gate + experts + dispatch, returning the output and its routing statistics.

Legend: T tokens, D input dim, O output dim, E experts, B batch, N sequence length.

``MoELayer(config)(x)`` takes ``(T, D)`` or ``(B, N, D)`` and returns ``(y, aux)`` with ``y``
of the same leading shape and width O, and ``aux`` a `MoEAux` of tensors only: nothing in
the forward reads a value back to the host (except the CPU's dropless split).

On CUDA, dropless token choice runs on the Triton kernels of `pipeline.moe.kernels` unless
``config.kernels == "torch"``; for the learned routers (top-k, switch, noisy top-k in eval)
the router's softmax and top-k run inside their routing prologue. The torch path beside it
stays the readable reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError, InputShapeError
from pipeline.moe import cpu, dispatch, kernels
from pipeline.moe.balancing import (
    aux_free_bias_update,
    expert_counts,
    group_balance_loss,
    router_z_loss,
    routing_entropy,
    switch_balance_loss,
)
from pipeline.moe.config import (
    CONSTRAINABLE_GATES,
    ROUTER_GATES,
    TOKEN_ID_GATES,
    LayerConfig,
    MoEConfig,
    as_layer,
)
from pipeline.moe.experts import Experts
from pipeline.moe.gating import ExpertChoice, Router, SoftRouting, TokenChoice, build_gate


class MoEAux(NamedTuple):
    """What a forward learned about its routing, all tensors on the layer's device."""

    loss: Tensor  # () weighted sum to add to the task loss: balance * w_b + z * w_z
    balance_loss: Tensor  # () unweighted balance loss (0 where balance holds by construction)
    z_loss: Tensor  # () unweighted router z-loss (0 without router logits)
    counts: Tensor  # (E,) float32 work routed to each expert (assignments, or soft mass)
    load: Tensor  # (E,) float32 counts / counts.sum()
    router_entropy: Tensor  # () mean per-token routing entropy, nats
    dropped: Tensor  # () int64 assignments dropped for lack of capacity
    # With pool=True (token-choice gates): per input b and expert e,
    pooled: Tensor | None = None  # (B, E, O) sum over b's tokens of w[t, e] * expert_e(x_t)
    input_weights: Tensor | None = None  # (B, E) mean routing weight per token of b


class _Dispatched(NamedTuple):
    """What dispatch hands to `MoELayer._aux`, the same for every kind of routing."""

    y_TO: Tensor  # (T, O) in the experts' working dtype, shared experts not yet added
    probs_TE: Tensor  # (T, E) float32 per-token distribution over experts
    counts_E: Tensor  # (E,) float32 work routed to each expert
    logits: Tensor | None  # router logits for the z-loss, any leading shape; None if none
    dropped: Tensor  # () int64


def _no_drops(x_TD: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=x_TD.device)


class RoutingConstraint(NamedTuple):
    """Confines each input's tokens to some experts (its chosen constellations' members).

    ``allowed`` (B, E) bool; ``scale`` (B, E) or None multiplies the combine weight of each
    (input, expert), which is how the supervisor's score reaches the output and its gradient.
    """

    allowed: Tensor
    scale: Tensor | None = None


def _experts(cfg: LayerConfig, num_experts: int, hidden_dim: int) -> Experts:
    return Experts(num_experts, cfg.input_dim, hidden_dim, cfg.output_dim,
                   expert_type=cfg.expert_type, activation=cfg.activation,
                   dropout=cfg.dropout, cur_rank=cfg.cur_rank, dtype=getattr(torch, cfg.dtype))


class MoELayer(nn.Module):
    """A mixture-of-experts feed-forward layer for every routing scheme in `gating`."""

    balance_bias: Tensor | None  # (E,) float32, a buffer; None unless aux-free balancing

    def __init__(self, config: MoEConfig | LayerConfig) -> None:
        """``config``: the layer part, or a whole `MoEConfig` (its ``.layer`` is kept)."""
        super().__init__()
        config = as_layer(config)
        self.config = config
        self.gate = build_gate(config)
        self.experts = _experts(config, config.num_experts, config.hidden_dim)
        # DeepSeekMoE's shared experts (arXiv:2401.06066): n of them are one FFN of n times
        # the width, run densely on every token.
        self.shared = (_experts(config, 1, config.hidden_dim * config.num_shared_experts)
                       if config.num_shared_experts else None)
        bias = torch.zeros(config.num_experts) if config.balance_loss == "aux_free" else None
        self.register_buffer("balance_bias", bias)
        # A balance loss pushes a learned per-token router's probabilities; the other gates
        # balance by construction (expert choice, soft) or learn nothing (hash, random).
        self._balance_loss = config.balance_loss if config.gate_type in ROUTER_GATES else "none"

    def forward(self, x: Tensor, token_ids: Tensor | None = None,
                constraint: RoutingConstraint | None = None,
                pool: bool = False) -> tuple[Tensor, MoEAux]:
        """``x`` (T, D) or (B, N, D); ``token_ids`` (T,) or (B, N) int, for hash routing.

        ``constraint`` confines each input's tokens to some experts; ``pool`` also returns
        per-(input, expert) pooled outputs in ``aux.pooled`` (token-choice gates only; a 2-D
        ``x`` is one input).

        Returns ``y`` (T, O) or (B, N, O) in ``x``'s dtype, and a `MoEAux`.
        """
        if self._on_lanes(x):
            with cpu.one_thread_caller():
                return self._forward(x, token_ids, constraint, pool)
        return self._forward(x, token_ids, constraint, pool)

    def _on_lanes(self, x: Tensor) -> bool:
        """Whether this forward runs the CPU's way for a shared machine: the experts side by
        side in one-thread lanes, everything else on one thread (`cpu.one_thread_caller`).

        Only where the lanes can run: dropless token choice, no autograd, no training
        dropout. Not with shared experts, a dense product over every token that a thread
        less would slow on a quiet machine.
        """
        cfg = self.config
        return (x.device.type == "cpu" and not torch.compiler.is_compiling()
                and cfg.dispatch == "dropless" and cfg.is_token_choice
                and self.shared is None and cpu.lanes_apply(self.compute_dtype(x))
                and not (self.training and cfg.dropout > 0)
                and not (torch.is_grad_enabled() and (
                    x.requires_grad or any(p.requires_grad for p in self.parameters()))))

    def _forward(self, x: Tensor, token_ids: Tensor | None,
                 constraint: RoutingConstraint | None, pool: bool) -> tuple[Tensor, MoEAux]:
        cfg = self.config
        self._check(x, token_ids, constraint, pool)
        lead = x.shape[:-1]
        B = x.shape[0] if x.dim() == 3 else 1
        x_in = x.reshape(-1, cfg.input_dim)  # what the router sees: never rounded by AMP
        x_TD = x_in.to(self.compute_dtype(x))
        input_T = None
        if constraint is not None or pool:  # which input each token belongs to
            input_T = torch.arange(x_TD.shape[0], device=x.device) // (x_TD.shape[0] // B)
        # One call for every gate: each reads what it needs (see `gating`). The bias is None
        # unless aux-free balancing is on, which LayerConfig allows only for learned routers.
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        allowed_TE = None if constraint is None else constraint.allowed[input_T]
        use_kernels = self._use_kernels(x_TD)
        plan = None
        if use_kernels and self._kernel_routes():
            # `_kernel_routes` holds only for the gates that route with a `Router`.
            logits_TE = cast(Router, self.gate.router)(x_in)
            probs_TE, ids_TK, w_TK, plan = kernels.route(
                logits_TE, cfg.top_k_experts, bias_E=self.balance_bias, allowed_TE=allowed_TE,
                renormalize=cfg.gate_type != "switch")
            routing = TokenChoice(ids_TK, w_TK, probs_TE, logits_TE)
        else:
            routing = self.gate(x_in, token_ids_T=ids_T, bias_E=self.balance_bias,
                                allowed_TE=allowed_TE, batch=B)
        if constraint is not None and constraint.scale is not None:
            scale_TK = constraint.scale[input_T].gather(1, routing.expert_ids)
            routing = routing._replace(weights=routing.weights * scale_TK)
        sink = None
        if pool and input_T is not None:  # input_T is set whenever pool is
            sink = dispatch.Pool(input_T, x_TD.new_zeros(
                cfg.num_experts, B, cfg.output_dim, dtype=self.experts.dtype))
        if use_kernels:
            out = self._dispatch_kernels(x_TD, routing, plan, sink)
        else:
            out = _DISPATCH[type(routing)](self, x_TD, routing, sink)
        y_TO = out.y_TO
        if self.shared is not None:
            y_TO = y_TO + self.shared.forward_padded(x_TD.unsqueeze(0))[0]
        aux = self._aux(out)
        if sink is not None:
            # A new record, not aux._replace(...): Dynamo in torch 2.11 cannot hand a
            # _replace'd NamedTuple out of a compiled region (an AssertionError in its
            # side-effect replay); a record built by its constructor it can.
            aux = MoEAux(*aux[:-2], pooled=sink.out_EBO.transpose(0, 1),
                         input_weights=self._input_weights(routing, sink.input_T, B))
        return y_TO.to(x.dtype).reshape(*lead, cfg.output_dim), aux

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The experts' working dtype: autocast's when it is on, else the weights' own."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.experts.dtype

    def _use_kernels(self, x_TD: Tensor) -> bool:
        """Whether this forward's dispatch runs on the Triton kernels (module docstring)."""
        cfg = self.config
        return (cfg.kernels == "triton" and cfg.dispatch == "dropless" and cfg.is_token_choice
                and cfg.expert_type in kernels.KERNEL_EXPERT_TYPES
                and not (self.training and cfg.dropout > 0)  # dropout sits between the GEMMs
                and x_TD.shape[0] > 0 and kernels.applies(x_TD))

    def _kernel_routes(self) -> bool:
        """Whether the gate's maths is the routing prologue's: softmax, top-k, weights."""
        gate = self.config.gate_type
        if gate == "switch":
            return not (self.training and self.config.jitter_noise > 0)
        return gate == "topk" or (gate == "noisy_topk" and not self.training)

    def _dispatch_kernels(self, x_TD: Tensor, routing: TokenChoice,
                          plan: kernels.Plan | None, sink: dispatch.Pool | None) -> _Dispatched:
        y_TO, plan = kernels.dropless(x_TD, routing.expert_ids, routing.weights, self.experts,
                                      plan, sink)
        return _Dispatched(y_TO, routing.probs, plan.counts_E.float(), routing.logits,
                           _no_drops(x_TD))

    # -- dispatch, one method per kind of routing (the table `_DISPATCH` below) -------------
    # ``sink`` is None except for token choice: `_check` refuses ``pool`` for the others.
    def _dispatch_tokens(self, x_TD: Tensor, routing: TokenChoice,
                         sink: dispatch.Pool | None) -> _Dispatched:
        cfg = self.config
        counts_E = expert_counts(routing.expert_ids, cfg.num_experts)
        if cfg.dispatch == "capacity":
            y_TO, dropped = dispatch.fixed_capacity(x_TD, routing, self.experts,
                                                    cfg.capacity_factor, sink)
        else:
            y_TO = dispatch.dropless(x_TD, routing, self.experts, counts_E, sink)
            dropped = _no_drops(x_TD)
        return _Dispatched(y_TO, routing.probs, counts_E, routing.logits, dropped)

    def _dispatch_expert_choice(self, x_TD: Tensor, routing: ExpertChoice,
                                sink: dispatch.Pool | None) -> _Dispatched:
        y_TO = dispatch.expert_choice(x_TD, routing, self.experts)
        counts_E = torch.full((self.config.num_experts,), float(routing.token_ids.shape[1]),
                              device=x_TD.device)
        return _Dispatched(y_TO, routing.probs, counts_E, routing.logits, _no_drops(x_TD))

    def _dispatch_soft(self, x_TD: Tensor, routing: SoftRouting,
                       sink: dispatch.Pool | None) -> _Dispatched:
        cfg = self.config
        B, N, S = routing.combine.shape
        x_BND = x_TD.view(B, N, x_TD.shape[-1])
        y_TO = dispatch.soft(x_BND, routing, self.experts).reshape(-1, cfg.output_dim)
        # Per-token distribution and per-expert mass from the combine weights, slots summed
        # into their experts (expert e owns slots e*s .. e*s+s-1).
        combine_TS = routing.combine.reshape(B * N, S)
        per_expert = S // cfg.num_experts
        probs_TE = combine_TS.view(B * N, cfg.num_experts, per_expert).sum(-1)
        counts_E = combine_TS.sum(0).view(cfg.num_experts, per_expert).sum(-1)
        return _Dispatched(y_TO, probs_TE, counts_E, routing.logits, _no_drops(x_TD))

    def _input_weights(self, routing: TokenChoice, input_T: Tensor, B: int) -> Tensor:
        """Mean routing weight per token of each (input, expert): ``(B, E)``."""
        E = self.config.num_experts
        flat = (input_T.unsqueeze(1) * E + routing.expert_ids).reshape(-1)
        sums = routing.weights.new_zeros(B * E).index_add_(0, flat, routing.weights.reshape(-1))
        return sums.view(B, E) / (input_T.numel() // B)

    def _aux(self, out: _Dispatched) -> MoEAux:
        cfg = self.config
        probs_TE, counts_E = out.probs_TE, out.counts_E
        zero = counts_E.new_zeros(())
        if self._balance_loss in ("none", "aux_free"):
            balance = zero
        elif self._balance_loss == "group":
            balance = group_balance_loss(probs_TE, counts_E, cfg.num_expert_groups)
        else:
            balance = switch_balance_loss(probs_TE, counts_E)
        logits = out.logits
        z = router_z_loss(logits.reshape(-1, logits.shape[-1])) if logits is not None else zero
        loss = cfg.load_balance_weight * balance + cfg.z_loss_weight * z
        return MoEAux(loss=loss, balance_loss=balance, z_loss=z, counts=counts_E,
                      load=counts_E / counts_E.sum().clamp_min(1e-12),
                      router_entropy=routing_entropy(probs_TE), dropped=out.dropped)

    def update_balance_bias(self, counts_E: Tensor) -> None:
        """Auxiliary-loss-free balancing step from the counts of one (or several) batches.

        Call between optimizer steps; a no-op unless ``balance_loss == "aux_free"``.
        """
        if self.balance_bias is not None:
            aux_free_bias_update(self.balance_bias, counts_E.to(self.balance_bias.device),
                                 self.config.aux_free_update_rate)

    def _check(self, x: Tensor, token_ids: Tensor | None,
               constraint: RoutingConstraint | None, pool: bool) -> None:
        cfg = self.config
        if constraint is not None and cfg.gate_type not in CONSTRAINABLE_GATES:
            raise ConfigError("gate_type", cfg.gate_type, "one of " + ", ".join(
                repr(g) for g in CONSTRAINABLE_GATES) + " to route under constellations")
        if pool and not cfg.is_token_choice:
            raise ConfigError("gate_type", cfg.gate_type, "a token-choice gate to pool "
                              "outputs per input and expert")
        if constraint is not None:
            B = x.shape[0] if x.dim() == 3 else 1
            if tuple(constraint.allowed.shape) != (B, cfg.num_experts):
                raise InputShapeError("constraint.allowed", tuple(constraint.allowed.shape),
                                      f"(inputs, num_experts) = ({B}, {cfg.num_experts})")
        if x.dim() not in (2, 3) or x.shape[-1] != cfg.input_dim:
            raise InputShapeError("x", tuple(x.shape),
                                  f"(tokens, {cfg.input_dim}) or (batch, seq, {cfg.input_dim})")
        if not x.is_floating_point():
            raise InputShapeError("x", tuple(x.shape), f"a floating-point tensor, not {x.dtype}")
        if token_ids is not None:
            if tuple(token_ids.shape) != tuple(x.shape[:-1]):
                raise InputShapeError("token_ids", tuple(token_ids.shape),
                                      f"x's leading shape {tuple(x.shape[:-1])}")
            if token_ids.is_floating_point():
                raise InputShapeError("token_ids", tuple(token_ids.shape),
                                      "an integer tensor")
            if cfg.gate_type not in TOKEN_ID_GATES:
                raise InputShapeError("token_ids", tuple(token_ids.shape), "None unless "
                                      "gate_type=" + " or ".join(map(repr, TOKEN_ID_GATES)))


# Dispatch is chosen by the routing's type, the one thing that decides it.
# Each method takes its own kind of routing record.
_DISPATCH: dict[type, Callable[..., _Dispatched]] = {
    TokenChoice: MoELayer._dispatch_tokens,
    ExpertChoice: MoELayer._dispatch_expert_choice,
    SoftRouting: MoELayer._dispatch_soft,
}
