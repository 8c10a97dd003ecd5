"""Supervisor gating: one routing decision per input, over constellations.

Legend: B inputs, N tokens per input, D model dim, H heads, Dh = D / H, G constellations,
C constellations chosen per input.

Attention pooling with learned queries (one per head, as in Set Transformer's pooling by
multi-head attention, arXiv:1810.00825) summarises each input's sequence into one vector; a
linear map scores every constellation; the top C are chosen. All of it is tensors in,
tensors out, with no host synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.moe.balancing import switch_balance_loss
from pipeline.moe.config import SystemConfig


class SupervisorDecision(NamedTuple):
    chosen: Tensor  # (B, C) int64 constellation ids, best first
    scores: Tensor  # (B, C) float32 supervisor probability of each chosen constellation
    probs: Tensor  # (B, G) float32
    logits: Tensor  # (B, G) float32
    counts: Tensor  # (G,) float32 how many inputs chose each constellation

    def balance_loss(self) -> Tensor:
        """Switch-style balance over constellations: 1 when inputs spread evenly."""
        return switch_balance_loss(self.probs, self.counts)


class SupervisorGating(nn.Module):
    """Scores constellations per input by multi-head attention pooling over its tokens."""

    def __init__(self, cfg: SystemConfig, num_constellations: int) -> None:
        super().__init__()
        D, H = cfg.layer.input_dim, cfg.supervisor_heads
        self.heads, self.head_dim = H, D // H
        self.choose = min(cfg.chosen_per_input, num_constellations)
        self.norm = nn.LayerNorm(D)
        self.key = nn.Linear(D, D, bias=False)
        self.value = nn.Linear(D, D, bias=False)
        self.queries_HDh = nn.Parameter(torch.randn(H, self.head_dim) * self.head_dim**-0.5)
        self.score = nn.Linear(D, num_constellations)

    def pool(self, x_BND: Tensor) -> Tensor:
        """Attention-pooled summary of each input: ``(B, N, D) -> (B, D)``."""
        B, N, _ = x_BND.shape
        h = self.norm(x_BND)
        k_BNHDh = self.key(h).view(B, N, self.heads, self.head_dim)
        v_BNHDh = self.value(h).view(B, N, self.heads, self.head_dim)
        attn_BNH = torch.einsum("bnhd,hd->bnh", k_BNHDh, self.queries_HDh)
        attn_BNH = torch.softmax(attn_BNH * self.head_dim**-0.5, dim=1)
        return torch.einsum("bnh,bnhd->bhd", attn_BNH, v_BNHDh).reshape(B, -1)

    def forward(self, x_BND: Tensor) -> SupervisorDecision:
        pooled_BD = self.pool(x_BND)
        with torch.autocast(x_BND.device.type, enabled=False):  # decisions in fp32
            logits_BG = self.score(pooled_BD.float())
        probs_BG = torch.softmax(logits_BG, dim=-1)
        scores_BC, chosen_BC = torch.topk(probs_BG, self.choose, dim=-1)
        counts_G = torch.zeros(probs_BG.shape[-1], device=x_BND.device).index_add_(
            0, chosen_BC.reshape(-1), torch.ones(chosen_BC.numel(), device=x_BND.device))
        return SupervisorDecision(chosen_BC, scores_BC, probs_BG, logits_BG, counts_G)

    @torch.no_grad()
    def init_from_prototypes(self, protos_GD: Tensor, temperature: float = 0.05) -> None:
        """Start routing by meaning: constellation g's logit becomes the cosine between the
        input's summary and prototype g, divided by ``temperature``.

        ``protos_GD`` is one point per constellation in the input space (e.g. its encoded
        description). With the value map the identity and the norm's affine part at rest,
        an input of one token is summarised as ``LN(x)``, whose norm is exactly sqrt(D); a
        score row ``LN(p_g) / (|LN(p_g)| T sqrt(D))`` then gives ``cos(LN(x), LN(p_g)) / T``
        (the centred cosine: a Pearson correlation of the two vectors). A sequence is
        summarised by the attention-weighted mean of its tokens' ``LN(x)``.
        """
        G, D = self.score.out_features, self.score.in_features
        if tuple(protos_GD.shape) != (G, D):
            raise ValueError(f"prototypes have shape {tuple(protos_GD.shape)}, expected "
                             f"({G}, {D}): one per constellation, in the input width")
        self.norm.reset_parameters()
        self.value.weight.copy_(torch.eye(D, dtype=self.value.weight.dtype))
        rows_GD = F.normalize(F.layer_norm(protos_GD.float(), (D,)), dim=-1)
        self.score.weight.copy_((rows_GD / (temperature * D**0.5)).to(self.score.weight.dtype))
        self.score.bias.zero_()

    @staticmethod
    def alignment_loss(decision: SupervisorDecision, target_BG: Tensor) -> Tensor:
        """Cross-entropy from the routed mass per constellation (detached) to the scores.

        Where constellations do not confine routing, this is what teaches the supervisor
        to name the constellations an input's tokens actually use.
        """
        return -(target_BG.detach() * F.log_softmax(decision.logits, dim=-1)).sum(-1).mean()
