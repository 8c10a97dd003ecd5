"""The pipeline's one code path: route a batch, curate a shard part, answer `similar`.

Both ways to run call these functions and nothing else does the work. `route_batch` takes a
``ship`` callable for the shard parts it produces: the in-process run (`jobs.run_local`)
passes one that curates the part at once (`curate_part`), the Celery task one that sends it
to the shard's librarian queue. Each function counts its delivery in the ledger first, so a
redelivered batch or part finishes what an earlier delivery began and repeats nothing.

One item never sinks its batch: an item that breaks encode, route or curate, or whose row or
output is NaN or infinite, is recorded as a bad item of the job and its batch goes on
without it (`pipeline.isolation`; nothing extra runs while nothing is wrong).
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import neo4j.exceptions
import numpy as np
import torch

from pipeline import encoders
from pipeline.errors import PipelineError
from pipeline.inputs import read_items
from pipeline.isolation import describe, isolate
from pipeline.librarian import ChangedSources
from pipeline.moe.system import MixtureOfExpertsSystem
from pipeline.records import (
    BadItem,
    CurateResult,
    DraftReport,
    Item,
    ItemBatch,
    Question,
    ShardPart,
    content_hash,
    report_id,
)
from pipeline.retract import forget
from pipeline.runtime import Runtime, worker_name
from pipeline.settings import Settings
from pipeline.storage import ledger

Ship = Callable[[ShardPart], None]

# What an item can cause in a step. Encode and route do no I/O: any error there but a
# PipelineError (a missing encoder, a model mismatch) may be an item's. Curate writes the
# graph: only errors a report's own content can cause (a string the driver cannot encode, a
# statement the server refuses for its values); an outage is none of them, and is retried
# as before, not tried once per report.
COMPUTE_FAULTS: tuple[type[BaseException], ...] = (Exception,)
CURATE_FAULTS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, ArithmeticError, neo4j.exceptions.ClientError)


def encode(items: Sequence[Item], input_dim: int, seed: int = 0,
           text_model: str | None = None, device: str = "cpu") -> torch.Tensor:
    """The items as ``(n, input_dim)`` rows: text through the encoder, vectors projected."""
    return encoders.encode_items(items, input_dim, seed, text_model, device)


@dataclass
class Routed:
    reports: list[DraftReport]
    metrics: ledger.RoutingMetrics
    unfinite: list[int] = field(default_factory=list)  # rows whose output is NaN or inf


def _bad(item: Item, message: str) -> BadItem:
    return BadItem(item.line, item.id, "text" if item.text is not None else "vector",
                   message)


@torch.no_grad()
def route(system: MixtureOfExpertsSystem, x: torch.Tensor, items: Sequence[Item],
          job_id: str) -> Routed:
    """The model's forward with draft reports, turned into host records (one sync, here).

    A chosen constellation none of whose experts any token of the item reached (possible
    where routing is flat and the supervisor untrained) gives no report; neither does an
    item whose output is NaN or infinite (listed in ``unfinite``, for `route_each`).
    """
    system.eval()
    device = next(system.parameters()).device
    out = system.draft_reports(x.to(device))
    rep = out.reports
    assert rep is not None  # draft_reports drafts them
    ids = rep.constellation_ids.cpu().numpy()
    scores = rep.scores.float().cpu().numpy()
    emb = rep.embeddings.float().cpu().numpy()
    weights = rep.expert_weights.float().cpu().numpy()
    names = system.constellation.names
    experts = system.constellation.expert_names
    n = len(items)
    finite_B = (np.isfinite(emb.reshape(n, -1)).all(1) & np.isfinite(scores.reshape(n, -1))
                .all(1) & np.isfinite(weights.reshape(n, -1)).all(1))
    content = [content_hash(item.text, item.vector) for item in items]
    reports = []
    for b, item in enumerate(items):
        if not finite_B[b]:
            continue
        for c in range(ids.shape[1]):
            shard = names[ids[b, c]]
            fired = {experts[e]: float(w) for e, w in enumerate(weights[b, c]) if w > 0}
            if not fired:  # no token of this item reached the constellation: nothing to say
                continue
            reports.append(DraftReport(report_id(job_id, item.id, shard), job_id, item.id,
                                       shard, emb[b, c], float(scores[b, c]), fired,
                                       item.text or "", content[b]))
    counts = torch.stack([a.counts for a in out.aux]).sum(0).float().cpu()
    usage = (counts / counts.sum().clamp_min(1)).tolist()
    metrics = ledger.RoutingMetrics(
        len(reports), float(torch.stack([a.balance_loss for a in out.aux]).mean()),
        float(torch.stack([a.router_entropy for a in out.aux]).mean()),
        {experts[e]: u for e, u in enumerate(usage)})
    return Routed(reports, metrics, [b for b in range(n) if not finite_B[b]])


def encode_each(items: Sequence[Item], input_dim: int, settings: Settings, device: str
                ) -> tuple[list[Item], torch.Tensor, list[BadItem]]:
    """`encode`, isolating the items that break it or whose row is NaN or infinite once
    projected (finite values too large for float32 arithmetic): the items kept, their
    ``(n, input_dim)`` rows, and the ones that failed."""
    s = settings
    step = isolate(lambda its: encode(its, input_dim, s.seed, s.text_model, device), items,
                   COMPUTE_FAULTS)
    bad = [_bad(item, f"encode failed: {describe(err)}") for item, err in step.failed]
    kept, x = step.kept, step.result
    finite_N = torch.isfinite(x).all(1)  # the rows are on the host: no device sync
    if not bool(finite_N.all()):
        if not bool(finite_N.any()):
            raise PipelineError(f"every item's row is NaN or infinite once projected to the "
                                f"model's input width ({input_dim})")
        ok = finite_N.tolist()
        bad += [_bad(item, f"NaN or infinite once projected to the model's input width "
                           f"({input_dim}): values too large") for item, good in zip(
                    kept, ok, strict=True) if not good]
        kept, x = [item for item, good in zip(kept, ok, strict=True) if good], x[finite_N]
    return kept, x, bad


def route_each(system: MixtureOfExpertsSystem, x: torch.Tensor, items: Sequence[Item],
               job_id: str) -> tuple[Routed, list[BadItem]]:
    """`route`, isolating the items that break it or whose output is NaN or infinite; the
    survivors are routed again without them, so the batch's figures are theirs."""
    bad: list[BadItem] = []
    rows = list(range(len(items)))

    def work(rs: list[int]) -> Routed:  # the whole batch as it is, or some of its rows
        whole = len(rs) == len(items)
        return route(system, x if whole else x[rs], items if whole else [items[i] for i in rs],
                     job_id)

    while True:
        step = isolate(work, rows, COMPUTE_FAULTS)
        bad += [_bad(items[i], f"route failed: {describe(err)}") for i, err in step.failed]
        routed = step.result
        if not routed.unfinite:
            return routed, bad
        if len(routed.unfinite) == len(items):
            raise PipelineError(f"the model's output is NaN or infinite for every item of "
                                f"the batch ({len(items)}): is the checkpoint broken?")
        dropped = {step.kept[p] for p in routed.unfinite}
        bad += [_bad(items[i], "the model's output for it is NaN or infinite (values too "
                               "large for the model?)") for i in sorted(dropped)]
        rows = [i for i in step.kept if i not in dropped]
        if not rows:
            return Routed([], ledger.RoutingMetrics(0, None, None, {})), bad


def by_shard(reports: Sequence[DraftReport]) -> dict[str, list[DraftReport]]:
    """Reports grouped by the shard (constellation) whose librarian curates them."""
    groups: dict[str, list[DraftReport]] = defaultdict(list)
    for r in reports:
        groups[r.constellation].append(r)
    return dict(sorted(groups.items()))


def faults(settings: Settings, attempt: int, item_ids: Sequence[str]) -> None:
    """Fault injection for tests and drills (both off unless set): stall the first attempt,
    or kill this process when the work holds a given item."""
    if settings.fault_stall_s and attempt == 1:
        time.sleep(settings.fault_stall_s)
    if settings.fault_kill_item and settings.fault_kill_item in item_ids:
        os.kill(os.getpid(), signal.SIGKILL)


def _route(rt: Runtime, batch: ItemBatch, attempts: int
           ) -> tuple[Routed, list[BadItem], dict[str, float]]:
    """Encode and route a batch whose delivery counted ``attempts``: what it drafted, its
    items that failed alone, and the seconds of each step."""
    s = rt.settings
    if batch.model != rt.fingerprint:
        raise PipelineError(
            f"batch {batch.batch_id}: submitted for model {batch.model}, but this worker "
            f"serves {rt.fingerprint}; start the GPU workers with the MOE_MODEL_PATH, MOE_SEED "
            "and MOE_TEXT_MODEL the job was submitted with")
    faults(s, attempts, [i.id for i in batch.items])
    system = rt.system
    timings: dict[str, float] = {}
    t = time.perf_counter()
    items, x, bad = encode_each(batch.items, system.config.input_dim, s, rt.device)
    timings["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    routed, unrouted = route_each(system, x, items, batch.job_id)
    timings["route"] = time.perf_counter() - t
    return routed, bad + unrouted, timings


def route_batch(rt: Runtime, batch: ItemBatch, ship: Ship,
                on_attempt: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encode and route one batch, record its parts, and ship one part per shard.

    ``on_attempt(n)`` is told the attempt this delivery counted, before any work (the queue's
    error policy gives it back after an outage). Returns a summary for the task's log.
    Three transactions: the delivery counted, the routing recorded (metrics, parts, items
    that failed), the parts sent (which completes the batch if they are all curated).
    """
    verdict, attempts = ledger.begin_batch(rt.Session, batch.batch_id, worker_name(),
                                           rt.device, rt.settings.max_attempts)
    if verdict != "run":
        return {"batch": batch.batch_id, "status": verdict, "attempts": attempts}
    if on_attempt:
        on_attempt(attempts)
    routed, bad, timings = _route(rt, batch, attempts)
    groups = by_shard(routed.reports)
    # Items that failed are recorded before the batch can complete, so its job counts them.
    pending = ledger.record_routing(rt.Session, batch.batch_id, routed.metrics,
                                    {k: len(v) for k, v in groups.items()}, timings,
                                    bad, batch.job_id)
    if pending is None:  # another delivery of this batch moved it on
        return {"batch": batch.batch_id, "status": "done", "attempts": attempts}
    for shard in pending:
        ship(ShardPart(batch.batch_id, batch.run_id, shard, groups[shard], batch.model))
    ledger.mark_routed(rt.Session, batch.batch_id, pending)
    return {"batch": batch.batch_id, "status": "routed", "reports": len(routed.reports),
            "shards": sorted(groups)}


def run_batch(rt: Runtime, batch: ItemBatch, attempts: int) -> dict[str, Any]:
    """The in-process way: route a batch this process has claimed (`ledger.add_batch` with a
    claim, delivery ``attempts``) and curate its parts at once.

    Two more transactions: the routing recorded with every part claimed, then every part's
    outcome with the batch's completion. A crash between them leaves the batch ``routing``,
    which the next run of the file redoes (the graph writes are idempotent)."""
    routed, bad, timings = _route(rt, batch, attempts)
    groups = by_shard(routed.reports)
    s = rt.settings
    claim = ledger.Claim(worker_name(), rt.device, s.max_attempts)
    todo = ledger.record_routing(rt.Session, batch.batch_id, routed.metrics,
                                 {k: len(v) for k, v in groups.items()}, timings, bad,
                                 batch.job_id, claim)
    if todo is None:
        return {"batch": batch.batch_id, "status": "done", "reports": 0}
    outcomes, failed = [], []
    totals = {"reports": 0, "inserted": 0, "merged": 0}
    for shard in todo:
        part = ShardPart(batch.batch_id, batch.run_id, shard, groups[shard], batch.model)
        faults(s, attempts, [r.item_id for r in part.reports])
        result, alone, seconds = _curate(rt, part)
        outcomes.append(ledger.PartOutcome(shard, result, seconds))
        failed += alone
        inserted, merged = result.outcome() if alone else (result.inserted, result.merged)
        totals = {"reports": totals["reports"] + len(part.reports),
                  "inserted": totals["inserted"] + inserted,
                  "merged": totals["merged"] + merged}
    ledger.finish_parts(rt.Session, batch.batch_id, outcomes, failed, batch.job_id)
    return {"batch": batch.batch_id, "status": "done", **totals}


def _curate(rt: Runtime, part: ShardPart) -> tuple[CurateResult, list[BadItem], float]:
    """Curate one part into the graph (one write transaction, under the shard's lock),
    isolating the reports that break it: the result, those reports as bad items, seconds."""
    known = rt.run_knowledge(part.run_id)
    rt.ensure_run(part.run_id, known, part.model)
    t = time.perf_counter()
    librarian = rt.librarian(known.knowledge)
    for attempt in range(3):
        try:
            step = isolate(lambda reports: librarian.curate(
                part.shard, reports, run_id=part.run_id, model=part.model),
                part.reports, CURATE_FAULTS)
            break
        except ChangedSources as changed:
            # Ingested before with other content: its old support is taken back first (under
            # the locks of every shard it reached), then the part is curated again.
            if attempt == 2:
                raise
            forget(rt, changed.ids, keep=changed.keep, rule=librarian.rule)
    bad = [BadItem(None, r.item_id, "text" if r.text else "vector",
                   f"curate failed: {describe(err)}") for r, err in step.failed]
    return step.result, bad, time.perf_counter() - t


def curate_part(rt: Runtime, part: ShardPart,
                on_attempt: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Curate one shard part into the graph (under the shard's lock) and record it: two
    transactions, the delivery counted and the outcome (which completes the batch when it
    makes its last part done)."""
    verdict, attempts = ledger.begin_part(rt.Session, part.batch_id, part.shard,
                                          worker_name(), rt.settings.max_attempts)
    if verdict != "run":
        return {"batch": part.batch_id, "shard": part.shard, "status": verdict,
                "attempts": attempts}
    if on_attempt:
        on_attempt(attempts)
    faults(rt.settings, attempts, [r.item_id for r in part.reports])
    result, bad, seconds = _curate(rt, part)
    ledger.finish_part(rt.Session, part.batch_id, part.shard, result, seconds, bad,
                       part.reports[0].job_id)
    # After isolation the kept reports were written one by one, then replayed: count them
    # by what their first curation did.
    inserted, merged = result.outcome() if bad else (result.inserted, result.merged)
    return {"batch": part.batch_id, "shard": part.shard, "status": "done",
            "inserted": inserted, "merged": merged}


def query_input(rt: Runtime, text: str | None, vector: Sequence[float] | None
                ) -> torch.Tensor:
    """One question as the model's input row, validated like an item: a vector of another
    width than the served model's (``MOE_VECTOR_DIM``, when it is fixed) is refused."""
    rows, bad = query_inputs(rt, [(text, vector)])
    if bad:
        raise bad[0]
    return rows


def query_inputs(rt: Runtime, asked: Sequence[tuple[str | None, Sequence[float] | None]]
                 ) -> tuple[torch.Tensor, dict[int, PipelineError]]:
    """Questions (a text or a vector each) as the model's input rows, validated like items
    and encoded in one pass: the rows of the valid ones, in order, and the error of each
    invalid one by its position."""
    raws: list[dict[str, Any]] = [
        {"id": f"query-{n}", "text": text} if text is not None
        else {"id": f"query-{n}", "vector": list(vector or [])}
        for n, (text, vector) in enumerate(asked)]
    items, bad = read_items(raws, dim=rt.settings.vector_dim)
    errors = {int(str(b.item_id).rsplit("-", 1)[1]): PipelineError(
        f"query: {b.field}: {b.message}") for b in bad}
    s = rt.settings
    if not items:
        return torch.zeros(0, rt.config.input_dim), errors
    return encode(items, rt.config.input_dim, s.seed, s.text_model, rt.device), errors


@dataclass
class SimilarAnswer:
    """`similar`'s answer: the hits at or above ``floor``, best first, what was searched, and
    how many insights of other models sit in those constellations unsearched."""

    hits: list[dict[str, Any]]
    floor: float
    searched: list[str]
    other_models: int = 0
    below_floor: int = 0  # hits the floor held back

    def to_message(self) -> dict[str, Any]:
        return {"hits": self.hits, "floor": self.floor, "searched": self.searched,
                "other_models": self.other_models, "below_floor": self.below_floor}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> SimilarAnswer:
        return cls(list(message["hits"]), float(message["floor"]), list(message["searched"]),
                   int(message.get("other_models", 0)), int(message.get("below_floor", 0)))


@torch.no_grad()
def similar(rt: Runtime, text: str | None = None, vector: Sequence[float] | None = None,
            k: int = 10, *, constellation: str | None = None, min_score: float | None = None,
            like: str | None = None) -> SimilarAnswer:
    """Insights nearest one text, vector or stored item (``like``: an insight's or a
    source's id), over every constellation of the served model (or ``constellation``).

    The question goes through the model like an item, and its report in each constellation
    (`reports_in`: what it would draft there, whether or not it would be routed there) is
    searched in that constellation's cache, caught up by seq first; the caches' top-k are
    exact, and so is their merge. Hits below ``min_score`` (default the settings'
    ``similar_floor``) are held back: an off-topic question answers nothing rather than
    noise. An insight given by id is searched with its own stored embedding, itself left out.
    """
    answer = similar_many(rt, [Question(text, vector, k, constellation, min_score, like)])[0]
    if isinstance(answer, PipelineError):
        raise answer
    return answer


@torch.no_grad()
def similar_many(rt: Runtime, questions: Sequence[Question]
                 ) -> list[SimilarAnswer | PipelineError]:
    """`similar` for several questions at once, each answered as it would be alone: one
    encoder pass and one model forward for all of them, one catch-up of the caches, one
    search per constellation and one read of the hits' details. A question that cannot be
    asked (an unknown constellation or id, a bad text or vector) gets its `PipelineError`
    in its place; the others are answered."""
    system = rt.system
    names = list(system.constellation.names)
    out: dict[int, SimilarAnswer | PipelineError] = {}
    shards: dict[int, list[str]] = {}
    for n, q in enumerate(questions):
        if q.constellation is not None and q.constellation not in names:
            out[n] = PipelineError(f"--constellation {q.constellation!r}: the served model "
                                   f"has {', '.join(names)}")
        else:
            shards[n] = [q.constellation] if q.constellation is not None else names
    # What each question searches with: a stored insight's own embedding, else what its
    # text or vector (a source's text, for a source id) would draft in each constellation.
    stored: dict[int, torch.Tensor] = {}
    asked: dict[int, tuple[str | None, Sequence[float] | None]] = {}
    for n in shards:
        q = questions[n]
        if q.like is None:
            asked[n] = (q.text, q.vector)
            continue
        found = rt.graph.lookup(q.like)
        if found is not None and found.get("embedding") is not None:
            stored[n] = torch.from_numpy(
                np.frombuffer(found["embedding"], "<f2").astype(np.float32))
        elif found is None:
            out[n] = PipelineError(f"--id {q.like!r}: no insight or source has this id")
        elif not found.get("text"):
            out[n] = PipelineError(f"--id {q.like!r}: a source with no text (a vector "
                                   "item): ask with --vector-file")
        else:
            asked[n] = (found["text"], None)
    drafted = _drafted(rt, names, asked, out)
    live = [n for n in shards if n not in out]
    if live:
        _answer(rt, questions, live, names, shards, stored, drafted, out)
    return [out[n] for n in range(len(questions))]


def _drafted(rt: Runtime, names: list[str],
             asked: dict[int, tuple[str | None, Sequence[float] | None]],
             out: dict[int, SimilarAnswer | PipelineError]) -> dict[int, torch.Tensor]:
    """Question -> ``(C, D)``, the report its text or vector would draft in each
    constellation, for every question in ``asked`` in one pass (an invalid one gets its
    error in ``out`` instead)."""
    order = list(asked)
    x, bad = query_inputs(rt, [asked[n] for n in order])
    for position, err in bad.items():
        out[order[position]] = err
    good = [n for i, n in enumerate(order) if i not in bad]
    if not good:
        return {}
    system = rt.system
    system.eval()
    device = next(system.parameters()).device
    index = list(range(len(names)))
    cfg = rt.config
    if cfg.is_token_choice and cfg.dispatch == "dropless":  # each row routed on its own
        emb = system.reports_in(x.to(device), index).embeddings[:, 0].float().cpu()
        emb = emb.reshape(len(good), len(names), -1)
        return {n: emb[i] for i, n in enumerate(good)}
    # Expert choice, soft routing and capacity dispatch route a batch as a whole: a question
    # asked beside others would draft another report than alone, so each goes alone.
    return {n: system.reports_in(x[i].to(device), index).embeddings[:, 0].float().cpu()
            for i, n in enumerate(good)}


def _answer(rt: Runtime, questions: Sequence[Question], live: list[int], names: list[str],
            shards: dict[int, list[str]], stored: dict[int, torch.Tensor],
            drafted: dict[int, torch.Tensor],
            out: dict[int, SimilarAnswer | PipelineError]) -> None:
    """Search, merge across constellations, hold back what is under each floor, and read
    the details of what is left, for the questions in ``live``."""
    librarian = rt.librarian(rt.system.config)
    wanted = [s for s in names if any(s in shards[n] for n in live)]
    librarian.catch_up(wanted, model=rt.fingerprint)  # every shard's cache, in one read
    best: dict[int, dict[str, dict]] = {n: {} for n in live}
    for shard in wanted:
        asking = [n for n in live if shard in shards[n]]
        query = torch.stack([stored[n] if n in stored else drafted[n][names.index(shard)]
                             for n in asking])
        k = max(questions[n].k for n in asking) + 1
        found = librarian.search_many(query, k, shard, model=rt.fingerprint)
        for n, hits in zip(asking, found, strict=True):
            exclude = questions[n].like if n in stored else None
            for hit in hits:
                if hit["node_id"] == exclude:
                    continue
                seen = best[n].get(hit["node_id"])
                if seen is None or seen["similarity"] < hit["similarity"]:
                    best[n][hit["node_id"]] = hit
    kept: dict[int, tuple[list[dict], float, int]] = {}
    for n in live:
        q = questions[n]
        floor = rt.settings.similar_floor if q.min_score is None else float(q.min_score)
        ranked = sorted(best[n].values(), key=lambda h: -h["similarity"])[:q.k]
        hits = [h for h in ranked if h["similarity"] >= floor]
        kept[n] = (hits, floor, len(ranked) - len(hits))
    details = rt.graph.insight_details(
        sorted({h["node_id"] for hits, _, _ in kept.values() for h in hits}))
    for n, (hits, floor, below) in kept.items():
        hits = [{**h, **{key: details.get(h["node_id"], {}).get(key)
                         for key in ("summary", "support", "sources")}} for h in hits]
        out[n] = SimilarAnswer(hits, floor, shards[n],
                               librarian.other_models(shards[n], rt.fingerprint), below)
