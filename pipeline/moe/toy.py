"""The toy task of ``moe-pipeline demo``: a mixture of linear regression problems.

Legend: K tasks, D dim, N samples.

Inputs come from K Gaussian clusters, and the cluster an input is in picks the linear map
that gives its target: a problem one dense layer fits badly and a routed mixture fits well,
which makes the routing visible.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mixture_task(num_tasks: int, dim: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The task: cluster centres ``(K, D)`` and one map per cluster ``(K, D, D)``."""
    centres_KD = torch.randn(num_tasks, dim, generator=gen) * 3
    maps_KDD = torch.randn(num_tasks, dim, dim, generator=gen) / dim**0.5
    return centres_KD, maps_KDD


def sample(centres_KD: Tensor, maps_KDD: Tensor, n: int,
           gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` (input, target) pairs: ``(N, D)`` each."""
    task_N = torch.randint(0, centres_KD.shape[0], (n,), generator=gen)
    x_ND = centres_KD[task_N] + torch.randn(n, centres_KD.shape[1], generator=gen)
    y_ND = torch.einsum("nd,nde->ne", x_ND, maps_KDD[task_N])
    return x_ND, y_ND
