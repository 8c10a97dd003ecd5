"""Expert constellations: named groups of experts that are activated together.

Legend: B inputs, C constellations chosen per input, G constellations, E experts,
O output dim.

Membership is a ``(G, E)`` boolean buffer; everything an input's choice implies (which
experts its tokens may use, how the supervisor's score weights them, which pooled outputs
make each draft report) is a gather from it, so none of it waits on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.moe.config import SystemConfig


class ExpertConstellation(nn.Module):
    """The constellations of a config, configured or derived (one per expert)."""

    membership: Tensor  # (G, E) bool, a buffer

    def __init__(self, cfg: SystemConfig) -> None:
        super().__init__()
        groups = cfg.constellation_members()
        self.names: list[str] = [name for name, _ in groups]
        self.expert_names: list[str] = cfg.expert_names()
        membership = torch.zeros(len(groups), cfg.layer.num_experts, dtype=torch.bool)
        for g, (_, members) in enumerate(groups):
            membership[g, members] = True
        self.register_buffer("membership", membership)

    def __len__(self) -> int:
        return len(self.names)

    def members(self, name: str) -> list[int]:
        """Expert indices of the constellation called ``name``."""
        return self.membership[self.names.index(name)].nonzero().flatten().tolist()

    def allowed(self, chosen_BC: Tensor) -> Tensor:
        """Experts an input may use: members of any of its chosen constellations, (B, E)."""
        return self.membership[chosen_BC].any(dim=1)

    def expert_scale(self, chosen_BC: Tensor, scores_BC: Tensor) -> Tensor:
        """Per (input, expert), the summed supervisor score of its chosen constellations."""
        return torch.einsum("bce,bc->be", self.membership[chosen_BC].to(scores_BC.dtype),
                            scores_BC)

    def mass(self, input_weights_BE: Tensor) -> Tensor:
        """Share of each input's routed weight that lands in each constellation, (B, G).

        An expert in several constellations counts towards each of them.
        """
        mass_BG = input_weights_BE.float() @ self.membership.t().float()
        return mass_BG / mass_BG.sum(-1, keepdim=True).clamp_min(1e-12)

    def reports(self, pooled_BEO: Tensor, input_weights_BE: Tensor, chosen_BC: Tensor,
                input_BO: Tensor | None = None, expert_weight: float = 1.0
                ) -> tuple[Tensor, Tensor]:
        """Draft report tensors for each (input, chosen constellation).

        The embedding is ``normalize(unit(input) + expert_weight * unit(experts))``, where
        ``experts`` is the sum of the constellation's experts' pooled outputs and ``input``
        the input's own pooled vector ``(B, O)`` (none: the experts' part alone). Keeping the
        input in the report keeps its meaning: two restatements stay near, two different
        notes stay apart, as in the encoder's space (a residual, as the blocks have).

        Returns embeddings ``(B, C, O)`` float32 and each member expert's mean routing weight
        ``(B, C, E)`` (zero for experts outside the constellation or that did not fire).
        """
        member_BCE = self.membership[chosen_BC].to(pooled_BEO.dtype)
        emb_BCO = F.normalize(torch.einsum("bce,beo->bco", member_BCE, pooled_BEO).float(),
                              dim=-1)
        if input_BO is not None:
            own_B1O = F.normalize(input_BO.float(), dim=-1).unsqueeze(1)
            emb_BCO = own_B1O + expert_weight * emb_BCO
        weights_BCE = member_BCE.to(input_weights_BE.dtype) * input_weights_BE.unsqueeze(1)
        return F.normalize(emb_BCO, dim=-1), weights_BCE
