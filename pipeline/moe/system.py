"""The MoE system: supervisor gating over constellations, a stack of MoE blocks, reports.

Legend: B inputs, N tokens per input, D input dim, O output dim, E experts, C constellations
chosen per input.

``MixtureOfExpertsSystem`` is the plain model, readable and easy to debug;
``FullyOptimizedMoESystem`` runs the same modules under torch.compile, mixed precision and
gradient checkpointing as its config asks, and on CUDA serves ``infer`` from CUDA graphs
(`GraphedInference`). Both keep the original framework's API: ``forward``,
``training_step``, ``save``/``load`` and ``model_info``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError, InputShapeError
from pipeline.moe import checkpoint as ckpt
from pipeline.moe.analysis import parameter_counts
from pipeline.moe.config import TOKEN_CHOICE_GATES, LayerConfig, MoEConfig
from pipeline.moe.constellation import ExpertConstellation
from pipeline.moe.fitting import FitResult, fit
from pipeline.moe.layer import MoEAux, MoELayer, RoutingConstraint
from pipeline.moe.supervisor import SupervisorDecision, SupervisorGating

# config.json: each constellation name -> a digest of the supervisor row that scores it.
SUPERVISOR_ROWS = "supervisor_rows"


class DraftReportBatch(NamedTuple):
    """One draft report per (input, chosen constellation), as tensors."""

    constellation_ids: Tensor  # (B, C) int64, best first
    scores: Tensor  # (B, C) float32 supervisor probability
    embeddings: Tensor  # (B, C, D) float32, L2-normalised pooled output of its experts
    expert_weights: Tensor  # (B, C, E) mean routing weight of each member that fired, else 0


class SystemOutput(NamedTuple):
    output: Tensor  # (B, N, O), or (B, O) for a 2-D input
    loss: Tensor  # () weighted auxiliary loss to add to the task loss
    decision: SupervisorDecision
    aux: tuple[MoEAux, ...]  # one per block
    reports: DraftReportBatch | None


class MoEBlock(nn.Module):
    """Pre-norm residual MoE block: ``h + moe(norm(h))``."""

    def __init__(self, layer: LayerConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(layer.input_dim)
        self.moe = MoELayer(dataclasses.replace(layer, output_dim=layer.input_dim))

    def forward(self, h_BND: Tensor, constraint: RoutingConstraint | None,
                pool: bool) -> tuple[Tensor, MoEAux]:
        y_BND, aux = self.moe(self.norm(h_BND), constraint=constraint, pool=pool)
        return h_BND + y_BND, aux


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        for xk, yk in (("x", "y"), ("inputs", "targets")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
        raise InputShapeError("batch", (len(batch),), "a dict with 'x' and 'y' "
                              "(or 'inputs' and 'targets')")
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    raise InputShapeError("batch", (), "an (inputs, targets) pair")


class MixtureOfExpertsSystem(nn.Module):
    """Supervisor → constellations → MoE blocks → output head, with draft reports."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not config.is_token_choice:
            raise ConfigError("gate_type", config.gate_type, "a token-choice gate ("
                              + ", ".join(TOKEN_CHOICE_GATES) + "): draft reports pool per expert")
        self.config = config
        self.constellation = ExpertConstellation(config.system)
        self.supervisor = SupervisorGating(config.system, len(self.constellation))
        self.blocks = nn.ModuleList(MoEBlock(config.layer) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.input_dim)
        self.head = nn.Linear(config.input_dim, config.output_dim)
        self.knowledge: Any = None  # a Librarian, once attached

    def attach_knowledge_graph(self, librarian: Any) -> None:
        """Serve `query_knowledge_graph` from this librarian's hot caches (any object with
        ``search(query, top_k, shards)``)."""
        self.knowledge = librarian

    def default_knowledge(self) -> Any:
        """What `query_knowledge_graph` searches when no librarian was attached: none in the
        model package, which does no I/O (`pipeline.api` overrides this)."""
        return None

    def query_knowledge_graph(self, query_embedding: Tensor, top_k: int = 5,
                              shards: list[str] | None = None) -> list[dict[str, Any]]:
        """The insights most similar to ``query_embedding`` ``(input_dim,)``, best first:
        ``[{"node_id", "similarity", "shard"}, ...]`` from the hot caches (every shard of the
        graph unless ``shards`` names some).

        With no knowledge graph attached, `default_knowledge` answers: here none, so an empty
        list; ``pipeline.MixtureOfExpertsSystem`` and ``pipeline.FullyOptimizedMoESystem``
        (`pipeline.api`) answer from the graph the settings name.
        """
        if query_embedding.shape[-1] != self.config.input_dim:
            raise InputShapeError("query_embedding", tuple(query_embedding.shape),
                                  f"({self.config.input_dim},)")
        knowledge = self.knowledge if self.knowledge is not None else self.default_knowledge()
        if knowledge is None:
            return []
        self.knowledge = knowledge
        return knowledge.search(query_embedding.detach().float().reshape(1, -1).cpu(),
                                top_k, shards)

    # -- forward ---------------------------------------------------------------------------
    def run(self, x: Tensor, reports: bool = False,
            chosen_BC: Tensor | None = None) -> SystemOutput:
        """The whole forward. ``x`` is ``(B, N, D)`` or ``(B, D)`` (one token per input).
        ``chosen_BC`` (int64 constellation ids) overrides the supervisor's choice: what an
        input would report in constellations it was not routed to (`reports_in`)."""
        cfg = self.config
        if x.dim() not in (2, 3) or x.shape[-1] != cfg.input_dim:
            raise InputShapeError("x", tuple(x.shape), f"(batch, seq, {cfg.input_dim}) or "
                                  f"(batch, {cfg.input_dim})")
        x_BND = x if x.dim() == 3 else x.unsqueeze(1)
        decision = self.supervisor(x_BND)
        if chosen_BC is not None:
            decision = decision._replace(chosen=chosen_BC,
                                         scores=decision.probs.gather(1, chosen_BC))
        confine = cfg.constellations_constrain_routing
        constraint = None
        if confine:
            constraint = RoutingConstraint(
                self.constellation.allowed(decision.chosen),
                self.constellation.expert_scale(decision.chosen, decision.scores))
        align = self.training and not confine
        h, auxes = x_BND, []
        for i, block in enumerate(self.blocks):
            pool = (reports or align) and i == len(self.blocks) - 1
            h, aux = self._call_block(block, h, constraint, pool)
            auxes.append(aux)
        out = self.head(self.final_norm(h))
        loss = torch.stack([a.loss for a in auxes]).sum()
        loss = loss + cfg.constellation_balance_weight * decision.balance_loss()
        last = auxes[-1]
        if align:
            assert last.input_weights is not None  # the last block pooled
            target = self.constellation.mass(last.input_weights)
            loss = loss + cfg.constellation_balance_weight * self.supervisor.alignment_loss(
                decision, target)
        batch = None
        if reports:
            assert last.pooled is not None and last.input_weights is not None  # it pooled
            emb, weights = self.constellation.reports(
                last.pooled, last.input_weights, decision.chosen, x_BND.mean(1),
                cfg.report_expert_weight)
            batch = DraftReportBatch(decision.chosen, decision.scores, emb, weights)
        if x.dim() == 2:
            out = out.squeeze(1)
        return SystemOutput(out, loss, decision, tuple(auxes), batch)

    def _call_block(self, block: nn.Module, h: Tensor, constraint: RoutingConstraint | None,
                    pool: bool) -> tuple[Tensor, MoEAux]:
        return block(h, constraint, pool)

    def _runner(self) -> Callable[..., SystemOutput]:
        return self.run

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, O)``."""
        with self._autocast():
            return self._runner()(x).output

    def draft_reports(self, x: Tensor) -> SystemOutput:
        """Forward that also returns the draft reports (``.reports``)."""
        with self._autocast():
            return self._runner()(x, reports=True)

    def reports_in(self, x_D: Tensor, constellations: list[int]) -> DraftReportBatch:
        """The reports one input ``(D,)``, or each of ``(N, D)``, would draft in each of
        ``constellations`` (C of them), whatever the supervisor would choose: ``embeddings``
        is ``(N * C, 1, D)``, input-major (row ``n * C + c``). The eager forward: questions,
        not the serving hot path."""
        x_ND = x_D.reshape(-1, x_D.shape[-1])
        chosen_B1 = torch.tensor(constellations, device=x_D.device).repeat(
            x_ND.shape[0]).unsqueeze(1)
        x_BD = x_ND.repeat_interleave(len(constellations), dim=0)
        with self._autocast():
            batch = self.run(x_BD, reports=True, chosen_BC=chosen_B1).reports
        assert batch is not None  # reports=True drafts them
        return batch

    # -- training --------------------------------------------------------------------------
    def init_supervisor(self, prototypes_GD: Tensor, temperature: float = 0.05) -> None:
        """Route by meaning from the start: constellation g scores the cosine of an input
        with ``prototypes_GD[g]`` (e.g. its encoded description), see
        `SupervisorGating.init_from_prototypes`."""
        self.supervisor.init_from_prototypes(prototypes_GD, temperature)

    def fit(self, x_ND: Tensor, targets_N: Tensor | None = None, **kw: Any) -> FitResult:
        """Fit the model to inputs ``x_ND``, supervised where ``targets_N`` (constellation
        indices, -1 unknown) says where an input belongs; see `pipeline.moe.fitting.fit`."""
        return fit(self, x_ND, targets_N, **kw)

    def training_step(self, batch: Any, optimizer: torch.optim.Optimizer,
                      loss_fn: Callable[[Tensor, Tensor], Tensor]) -> float:
        """One optimizer step on ``(inputs, targets)``: task loss + weighted aux losses.

        Returns the loss as a float for logging: the one host sync a step is allowed.
        """
        x, y = _unpack(batch)
        device = next(self.parameters()).device
        x, y = x.to(device), y.to(device)
        self.train()
        with self._autocast():
            out = self._runner()(x)
            loss = loss_fn(out.output.float(), y) + out.loss
        optimizer.zero_grad(set_to_none=True)
        self._step(loss, optimizer)
        for moe, aux in zip(self.moe_layers(), out.aux, strict=True):
            moe.update_balance_bias(aux.counts)
        return float(loss.detach())

    def _step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        loss.backward()
        optimizer.step()

    # -- persistence and introspection -----------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Weights (safetensors) and config (JSON) into directory ``path``."""
        return ckpt.save(self, self.config, path, extra={
            "class": type(self).__name__, SUPERVISOR_ROWS: self._supervisor_rows()})

    def load(self, path: str | Path) -> MixtureOfExpertsSystem:
        """Load weights saved by `save`; refuses a checkpoint of a different config, and one
        whose constellation names no longer sit on the supervisor rows they were saved with."""
        ckpt.load(self, self.config, path)
        saved = ckpt.read_record(path).get(SUPERVISOR_ROWS)
        if saved is not None and not isinstance(saved, dict):
            raise ckpt.CheckpointError(Path(path), f"config.json: field {SUPERVISOR_ROWS} is "
                                       f"{type(saved).__name__}, not an object",
                                       (SUPERVISOR_ROWS,))
        if saved is not None:
            moved = [name for name, digest in self._supervisor_rows().items()
                     if saved.get(name) != digest]
            if moved:
                raise ckpt.CheckpointError(
                    Path(path), f"constellation(s) {', '.join(moved)} are not on the "
                    "supervisor rows they were saved with: config.json's constellation order "
                    "was changed after saving")
        return self

    def _supervisor_rows(self) -> dict[str, str]:
        """Each constellation's name -> a digest of its supervisor scoring row: the name and
        the row that decides for it must travel together."""
        weight_CD = self.supervisor.score.weight.detach().float().cpu().contiguous()
        return {name: hashlib.sha256(weight_CD[c].numpy().tobytes()).hexdigest()[:16]
                for c, name in enumerate(self.constellation.names)}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MixtureOfExpertsSystem:
        """A new system built from a checkpoint's own config, its weights loaded."""
        return cls(ckpt.read_config(path)).load(path)

    def model_info(self) -> dict[str, Any]:
        p = next(self.parameters())
        return {
            "class": type(self).__name__,
            "parameters": parameter_counts(self),
            "device": str(p.device),
            "dtype": str(p.dtype).removeprefix("torch."),
            "constellations": {name: [self.constellation.expert_names[e]
                                      for e in self.constellation.members(name)]
                               for name in self.constellation.names},
            "config": self.config.to_dict(),
        }

    def moe_layers(self) -> Iterator[MoELayer]:
        # nn.ModuleList yields plain modules; each block's `moe` is a MoELayer.
        return (cast(MoELayer, block.moe) for block in self.blocks)
