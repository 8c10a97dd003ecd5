"""Balance losses and the auxiliary-loss-free bias.

Legend: T tokens, E experts, K experts per token, G expert groups.

Notation shared by the losses: ``f_i = counts_i * E / (T * K)`` is expert i's share of the
routed assignments relative to a perfectly even split (1 when balanced), and
``P_i = mean_t probs[t, i]`` the mean router probability it receives. Counts come from a
discrete top-k and carry no gradient; the gradient flows through ``P``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_counts(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert as float32 ``(E,)``; static shape (no ``bincount``)."""
    ones = torch.ones(expert_ids_TK.numel(), device=expert_ids_TK.device)
    return torch.zeros(num_experts, device=expert_ids_TK.device).index_add_(
        0, expert_ids_TK.reshape(-1), ones)


def switch_balance_loss(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """Switch Transformer auxiliary loss (Fedus et al., arXiv:2101.03961, eq. 4).

    ``E * sum_i (counts_i / sum counts) * P_i``; equals 1 at perfect balance, E at collapse
    onto one expert.
    """
    num_experts = probs_TE.shape[-1]
    frac_E = counts_E / counts_E.sum().clamp_min(1.0)
    return num_experts * torch.dot(frac_E, probs_TE.mean(0))


def group_balance_loss(probs_TE: Tensor, counts_E: Tensor, num_groups: int) -> Tensor:
    """Device-level balance loss of DeepSeek-V2 (arXiv:2405.04434, eq. 14-16).

    Experts are split into ``num_groups`` contiguous groups (devices). With group means of
    ``f`` and group sums of ``P``: ``sum_g mean_{i in g}(f_i) * sum_{i in g}(P_i)``; equals 1
    at balance. With one expert per group it is the switch loss.
    """
    num_experts = probs_TE.shape[-1]
    f_E = counts_E * num_experts / counts_E.sum().clamp_min(1.0)
    f_G = f_E.view(num_groups, -1).mean(-1)
    p_G = probs_TE.mean(0).view(num_groups, -1).sum(-1)
    return torch.dot(f_G, p_G)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss (Zoph et al., ST-MoE, arXiv:2202.08906, eq. 5): mean logsumexp²."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def routing_entropy(probs_TE: Tensor) -> Tensor:
    """Mean per-token entropy of the routing distribution, in nats."""
    return -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1).mean()


@torch.no_grad()
def aux_free_bias_update(bias_E: Tensor, counts_E: Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3, arXiv:2412.19437, section 2.1.2).

    In place: raise the bias of under-loaded experts and lower that of over-loaded ones by
    ``rate``. The bias only shifts which experts are selected, never the combine weights.
    Called between steps, outside the forward.
    """
    bias_E.add_(rate * torch.sign(counts_E.mean() - counts_E))
