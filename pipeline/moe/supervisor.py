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
from pipeline.moe.config import MoEConfig


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

    def __init__(self, cfg: MoEConfig, num_constellations: int) -> None:
        super().__init__()
        D, H = cfg.input_dim, cfg.supervisor_heads
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

    @staticmethod
    def alignment_loss(decision: SupervisorDecision, target_BG: Tensor) -> Tensor:
        """Cross-entropy from the routed mass per constellation (detached) to the scores.

        Where constellations do not confine routing, this is what teaches the supervisor
        to name the constellations an input's tokens actually use.
        """
        return -(target_BG.detach() * F.log_softmax(decision.logits, dim=-1)).sum(-1).mean()
