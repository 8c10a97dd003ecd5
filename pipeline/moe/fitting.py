"""Fitting a system to a corpus of inputs, pure torch: what ``moe-pipeline train`` runs.

Legend: N inputs, D input dim, G constellations.

The objective, per batch:

* supervision where a target constellation is known: cross-entropy from the supervisor's
  logits to it (labels of -1 are unknown and left out);
* reconstruction: the output should give back the input (when the output is as wide), so
  that each constellation's experts learn to model the inputs routed to them;
* the system's own auxiliary losses: the experts' balance and z-losses, and the balance of
  inputs over constellations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class FitResult:
    losses: list[float]  # mean loss per epoch
    supervised: int  # inputs with a known target
    steps: int


def fit(system, x_ND: Tensor, targets_N: Tensor | None = None, *, epochs: int = 30,  # noqa: ANN001
        batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
        on_epoch: Callable[[int, float], None] | None = None) -> FitResult:
    """Train ``system`` in place on ``x_ND`` (float) with optional ``targets_N`` (int64
    constellation indices, -1 for unknown). Returns the per-epoch mean loss."""
    device = next(system.parameters()).device
    x_ND = x_ND.to(device).float()
    n = x_ND.shape[0]
    if n == 0:
        raise ValueError("nothing to fit: no inputs")
    targets_N = (torch.full((n,), -1, dtype=torch.int64) if targets_N is None
                 else targets_N.to(torch.int64)).to(device)
    reconstruct = system.config.output_dim == system.config.input_dim
    opt = torch.optim.AdamW(system.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    system.train()
    losses: list[float] = []
    steps = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, n, batch_size):
            idx = order[start: start + batch_size]
            out = system.run(x_ND[idx])
            loss = out.loss
            known = targets_N[idx] >= 0
            if bool(known.any()):  # a sync per step, outside the model's forward
                loss = loss + F.cross_entropy(out.decision.logits[known], targets_N[idx][known])
            if reconstruct:
                loss = loss + F.mse_loss(out.output, x_ND[idx]) * x_ND.shape[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for block, aux in zip(system.blocks, out.aux, strict=True):
                block.moe.update_balance_bias(aux.counts)
            total += loss.detach() * idx.numel()
            steps += 1
        losses.append(float(total) / n)
        if on_epoch:
            on_epoch(epoch, losses[-1])
    system.eval()
    return FitResult(losses, int((targets_N >= 0).sum()), steps)
