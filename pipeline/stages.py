"""The pipeline's stages as plain functions: encode, route, curate, record.

The in-process run (`jobs.run_local`) calls them one batch after another; the Celery tasks of
the stack are to call the same functions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.inputs import Item
from pipeline.librarian import CurateResult, Librarian
from pipeline.moe.system import MixtureOfExpertsSystem
from pipeline.reports import DraftReport, report_id


class Projection:
    """A fixed map from the inputs' width to the model's: identity when they agree, else a
    seeded random orthonormal projection (distances are roughly kept, Johnson-Lindenstrauss).
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0) -> None:
        self.in_dim, self.out_dim = in_dim, out_dim
        self.matrix = None
        if in_dim != out_dim:
            gen = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(max(in_dim, out_dim), min(in_dim, out_dim),
                                               generator=gen))
            self.matrix = q if in_dim > out_dim else q.t()  # (in_dim, out_dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.matrix is None else x @ self.matrix


def encode(items: Sequence[Item], projection: Projection) -> torch.Tensor:
    """Vectors of the items, projected to the model's input width: ``(n, input_dim)``."""
    if any(item.vector is None for item in items):
        raise PipelineError("text items need a text encoder, which arrives with the queued "
                            "pipeline; give vectors for now")
    x = torch.tensor(np.asarray([item.vector for item in items], dtype=np.float32))
    return projection(x)


@dataclass
class Routed:
    reports: list[DraftReport]
    balance_loss: float
    routing_entropy: float
    expert_usage: dict[str, float]


@torch.no_grad()
def route(system: MixtureOfExpertsSystem, x: torch.Tensor, items: Sequence[Item],
          job_id: str) -> Routed:
    """The model's forward with draft reports, turned into host records (one sync, here).

    A chosen constellation none of whose experts any token of the item reached (possible
    where routing is flat and the supervisor untrained) gives no report.
    """
    system.eval()
    device = next(system.parameters()).device
    out = system.draft_reports(x.to(device))
    rep = out.reports
    ids = rep.constellation_ids.cpu().numpy()
    scores = rep.scores.float().cpu().numpy()
    emb = rep.embeddings.float().cpu().numpy()
    weights = rep.expert_weights.float().cpu().numpy()
    names = system.constellation.names
    experts = system.constellation.expert_names
    reports = []
    for b, item in enumerate(items):
        for c in range(ids.shape[1]):
            shard = names[ids[b, c]]
            fired = {experts[e]: float(w) for e, w in enumerate(weights[b, c]) if w > 0}
            if not fired:  # no token of this item reached the constellation: nothing to say
                continue
            reports.append(DraftReport(report_id(job_id, item.id, shard), job_id, item.id,
                                       shard, emb[b, c], float(scores[b, c]), fired,
                                       item.text or ""))
    counts = torch.stack([a.counts for a in out.aux]).sum(0).float().cpu()
    usage = (counts / counts.sum().clamp_min(1)).tolist()
    return Routed(reports, float(torch.stack([a.balance_loss for a in out.aux]).mean()),
                  float(torch.stack([a.router_entropy for a in out.aux]).mean()),
                  {experts[e]: u for e, u in enumerate(usage)})


def curate(librarian: Librarian, reports: Sequence[DraftReport]) -> dict[str, CurateResult]:
    """Each shard's reports through its librarian, one shard after another."""
    by_shard: dict[str, list[DraftReport]] = defaultdict(list)
    for r in reports:
        by_shard[r.constellation].append(r)
    return {shard: librarian.curate(shard, rs) for shard, rs in sorted(by_shard.items())}
