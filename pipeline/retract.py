"""Forgetting: sources taken back out of the graph, with everything that followed from them.

What forgetting a source means (the README's "Forgetting" section says the same):

- its ``SUPPORTED_BY`` edges go, and its ``Source`` node;
- an insight left with no support goes, with all its edges;
- an insight that keeps support has its remaining supports replayed in the order they
  arrived, as the librarian would have filed them without the forgotten ones (`arrivals`):
  where a forgotten report founded it, or led others of its part into it, those may now
  found an insight of their own (a split). It is re-represented from what remains: its
  text is what a run of its remaining sources alone gives it (the medoid of their texts,
  or the one source's text), and where its founder was forgotten, its embedding and
  summary become those of the earliest remaining report. Each insight so founded is
  decided again (`redecide`): it merges into another insight that its new founder restates;
- each shard whose insights were removed or changed counts one more forget (on its
  ``Constellation`` node): every cache replica, in any process, reads the shard anew at its
  next catch-up, which comes before any dedup decision or similarity answer; this process's
  cache snapshots of those shards are deleted;
- in SQL, the bad-item records of the forgotten ids go; jobs keep their rows, and a
  ``forgets`` row says what was taken back, when, and what it changed.

Forgetting a job (``job=``) takes back what that job filed: a source that another job filed
too keeps its support, less the job's reports, as it would had the job never run.

One graph transaction holds the whole change, under the locks of every shard (taken in order;
a librarian takes its own shard's, and may file a report into another shard's insight), so a
forget killed part-way changed nothing in the graph, and running it again finishes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import delete, select, update

from pipeline.dedup import Rule, scores
from pipeline.errors import PipelineError
from pipeline.lexical import shingles
from pipeline.records import decode_embeddings, insight_id, report_id
from pipeline.runtime import Runtime
from pipeline.storage import cypher, rows
from pipeline.storage.graph import CurateTx
from pipeline.storage.owner import interrupted
from pipeline.storage.sql import Batch, Forget, ItemError, Job

# Statuses of a job still filing items (a local job whose process is gone is not).
LIVE = ("queued", "running")

# The fields of a support as `cypher.INSIGHT_SUPPORTS` lists them: its source's id, the stored
# report embedding, the source's text, the reports behind it, when it arrived (its part's time;
# None on edges written before arrivals were kept), the jobs that filed it and its place in
# its part.
SOURCE, EMBEDDING, TEXT, REPORTS, AT, JOBS, POS = range(7)


@dataclass
class Plan:
    """What one forget changes in the graph, read in its transaction (`plan`)."""

    asked: list[str]
    unknown: list[str] = field(default_factory=list)  # ids no Source has
    drop: list[dict[str, str]] = field(default_factory=list)  # support edges removed
    thin: list[dict[str, Any]] = field(default_factory=list)  # edges other jobs still back
    sources: list[str] = field(default_factory=list)  # Source nodes removed
    insights: list[str] = field(default_factory=list)  # insights left with no support
    represent: list[dict[str, Any]] = field(default_factory=list)  # new text / embedding
    merge: list[dict[str, Any]] = field(default_factory=list)  # {"merged", "into"} insights
    # insights split off one that keeps support ({"id", "from", "shard", "props", "sources"}),
    # and split-off supports that join another insight instead ({"merged", "into", "sources"})
    split: list[dict[str, Any]] = field(default_factory=list)
    moves: list[dict[str, Any]] = field(default_factory=list)
    similar: list[dict[str, Any]] = field(default_factory=list)  # a split-off's neighbours
    locked: list[str] = field(default_factory=list)  # shard locks taken: all, if it changes any
    touched: list[str] = field(default_factory=list)  # shards whose insights changed

    def counts(self) -> dict[str, int]:
        return {"sources": len(self.sources), "supports": len(self.drop),
                "supports_thinned": len(self.thin), "insights_removed": len(self.insights),
                "insights_rerepresented": len(self.represent),
                "insights_merged": len(self.merge), "insights_split": len(self.split),
                "unknown": len(self.unknown)}


@dataclass
class ForgetResult:
    """What `forget` did (or, on a dry run, would do)."""

    id: str | None  # the ``forgets`` row; None on a dry run
    dry_run: bool
    asked: int
    unknown: list[str]
    counts: dict[str, int]
    shards: list[str]

    def to_message(self) -> dict[str, Any]:
        return {"id": self.id, "dry_run": self.dry_run, "asked": self.asked,
                "unknown": self.unknown, "counts": self.counts, "shards": self.shards}

    @classmethod
    def from_message(cls, m: dict[str, Any]) -> ForgetResult:
        return cls(m.get("id"), bool(m["dry_run"]), int(m["asked"]),
                   [str(i) for i in m.get("unknown") or []],
                   {str(k): int(v) for k, v in (m.get("counts") or {}).items()},
                   [str(x) for x in m.get("shards") or []])


def plan(tx: Any, ids: Sequence[str], job: str | None, with_vector: bool,
         keep: dict[str, str] | None = None, rule: Rule | None = None) -> Plan:
    """What forgetting ``ids`` (only ``job``'s backing of them, if given) changes, read on
    ``tx``; pure of writes. A source whose content hash is the one ``keep`` gives for it is
    left alone (a changed source that another librarian has filed anew already). With the
    librarians' dedup ``rule``, an insight founded anew is decided again against its shard
    (`redecide`)."""
    found = tx.run(cypher.SOURCE_SUPPORTS, ids=list(ids)).data()
    if keep:
        found = [r for r in found if r["hash"] is None or keep.get(r["source"]) != r["hash"]]
    known = {r["source"] for r in found}
    p = Plan(list(ids), unknown=[i for i in ids if i not in known])
    names = tx.run(cypher.CONSTELLATIONS).single(strict=True)["ids"] if job else []
    gone: dict[str, set[str]] = {}  # insight -> its sources whose support goes
    kept, locked = set(), set()
    for r in found:
        if r["insight"] is None:  # a source with no support at all: it goes too
            continue
        locked.add(r["shard"])
        jobs = [j for j in r["jobs"] if j is not None]
        if job is not None:
            if job not in jobs:
                kept.add(r["source"])
                continue
            others = [j for j in jobs if j != job]
            if others:
                mine = {report_id(job, r["source"], c) for c in names}
                reports = [x for x in r["reports"] if x is not None and x not in mine]
                p.thin.append({"insight": r["insight"], "source": r["source"],
                               "jobs": others, "reports": reports or r["reports"]})
                kept.add(r["source"])
                continue
        p.drop.append({"insight": r["insight"], "source": r["source"]})
        gone.setdefault(r["insight"], set()).add(r["source"])
    p.sources = sorted(known - kept)
    touched = set()
    remaining: dict[str, tuple[dict[str, Any], list[list[Any]]]] = {}  # insight: (row, rest)
    # records as the driver gives them: `Result.data()` walks every byte of the embeddings
    found_rows = list(tx.run(cypher.INSIGHT_SUPPORTS, ids=sorted(gone))) if gone else []
    shards = shard_names(tx) if found_rows and rule is not None else []
    for row in found_rows:
        rest = [s for s in row["supports"] if s[SOURCE] not in gone[row["id"]]]
        if not rest:
            p.insights.append(row["id"])
            touched.add(row["shard"])
            continue
        groups = arrivals(row, rest, rule, shards) if rule is not None else None
        if groups is not None and len(groups) > 1:
            rest = split_off(tx, p, row, groups, remaining, with_vector, shards)
        remaining[row["id"]] = (dict(row), rest)
        new = represent(row, rest, with_vector)
        if new is not None:
            p.represent.append(new)
            touched.add(row["shard"])
    locked |= {x["shard"] for x in p.split}
    touched |= {x["shard"] for x in p.split}
    if rule is not None:
        joined = redecide(tx, p, remaining, rule, shards)
        locked |= joined  # a merge into another shard needs its lock too
        touched |= joined
    if locked:
        # Every shard's lock, not only those the sources reach: a librarian files a report
        # into another shard's insight (a cross-shard join) under its own shard's lock
        # alone, so a forget that merged or removed that insight meanwhile would lose it.
        locked |= set(shards or shard_names(tx))
    p.locked, p.touched = sorted(locked), sorted(touched)
    return p


def founder_kept(row: dict[str, Any], rest: list[list[Any]]) -> bool:
    """Whether the report that founded the insight of ``row`` is among its supports ``rest``
    (an insight is named by its shard and that report, `insight_id`)."""
    return any(insight_id(row["shard"], rep) == row["id"] for s in rest
               for rep in (s[REPORTS] or []) if rep is not None)


def shard_names(tx: Any) -> list[str]:
    """Every constellation (shard) of the graph, sorted."""
    return sorted(tx.run(cypher.CONSTELLATIONS).single(strict=True)["ids"])


def filed_in(s: list[Any], names: list[str]) -> tuple[str, str] | None:
    """The shard a support's report was filed in, and that report (a report is named by its
    job, source and constellation: `report_id`); None where none of ``names`` gives one."""
    for job in s[JOBS] or []:
        for name in names:
            if (rep := report_id(job, s[SOURCE], name)) in (s[REPORTS] or []):
                return name, rep
    return None


def arrivals(row: dict[str, Any], rest: list[list[Any]], rule: Rule,
             names: list[str]) -> list[list[list[Any]]] | None:
    """The supports ``rest`` that an insight keeps, replayed as the librarian would have filed
    them without the forgotten ones: part by part in the order they arrived, each part's
    reports first grouped behind the earlier report of the part they restate best (its
    leader; `dedup.dedup_in_batch`), then each leader joining a group whose founder it
    restates under the dedup ``rule`` (report against the founder's summary, as against a
    cache; the best of those filed in its shard first, else of the others: `dedup.decide`),
    or founding a group of its own. A forgotten report may have been the founder, or the
    leader that drew others in: without it they may stand apart (a split).

    Groups in order, the founder first in each and the insight's own founder's (if kept)
    first; None where nothing is replayed (one support, or an edge without its arrival or
    embedding: written before arrivals were kept). Reports a forgotten one drew into an
    insight elsewhere are decided again only as founders (`redecide`).
    """
    if len(rest) < 2 or any(s[AT] is None or s[POS] is None or s[EMBEDDING] is None
                            for s in rest):
        return None
    filed = [(filed_in(s, names) or (row["shard"], ""))[0] for s in rest]
    order = sorted(range(len(rest)), key=lambda n: (int(rest[n][AT]), filed[n],
                                                    int(rest[n][POS]), str(rest[n][SOURCE])))
    emb = decode_embeddings([rest[n][EMBEDDING] for n in order], int(row["dim"]))
    emb = emb.astype(np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    texts = [(rest[n][TEXT] or "")[:280] for n in order]  # as reports and summaries hold it
    grams = [shingles(t) if t else frozenset() for t in texts] if rule.lexical else None
    shard = [filed[n] for n in order]

    def score(a: int, b: list[int]) -> np.ndarray:
        cos = (emb[b] @ emb[a])[None, :]
        return scores(cos, None if grams is None else [grams[a]],
                      None if grams is None else [grams[x] for x in b], rule)[0]

    heads: list[int] = []  # the founder of each group (an index into ``order``)
    group_of: dict[int, int] = {}
    start = 0
    while start < len(order):  # one curated part at a time: same arrival, same shard
        key = (int(rest[order[start]][AT]), shard[start])
        end = start
        while end < len(order) and (int(rest[order[end]][AT]), shard[end]) == key:
            end += 1
        leaders: list[int] = []
        follows: dict[int, int] = {}
        for n in range(start, end):
            if leaders:
                sc = score(n, leaders)
                best = int(np.argmax(sc))
                if sc[best] >= rule.threshold:
                    follows[n] = leaders[best]
                    continue
            leaders.append(n)
        for n in leaders:
            if heads:
                sc = score(n, heads)
                mine = np.where([shard[h] == shard[n] for h in heads], sc, -np.inf)
                best = int(np.argmax(mine if mine.max() >= rule.threshold else sc))
                if sc[best] >= rule.threshold:
                    group_of[n] = best
                    continue
            group_of[n] = len(heads)
            heads.append(n)
        for n, leader in follows.items():
            group_of[n] = group_of[leader]
        start = end
    groups: list[list[list[Any]]] = [[] for _ in heads]
    for n in range(len(order)):  # each group's founder first: it is its earliest member
        groups[group_of[n]].append(rest[order[n]])
    own = next((g for g, members in enumerate(groups) if founder_kept(row, members)), 0)
    return [groups[own]] + groups[:own] + groups[own + 1:]


def split_off(tx: Any, p: Plan, row: dict[str, Any], groups: list[list[list[Any]]],
              kept: dict[str, tuple[dict[str, Any], list[list[Any]]]],
              with_vector: bool, names: list[str]) -> list[list[Any]]:
    """Each group of ``groups`` but the first becomes an insight of its own (`Plan.split`):
    named, as the librarian names one, by the shard its founder's report was filed in and
    that report, with the next seq there; its summary and embedding the founder's, its text
    the group's medoid. Returns the supports the insight of ``row`` keeps: the first group,
    and any group whose name an insight has already (left where it was)."""
    dim, first = int(row["dim"]), list(groups[0])
    for group in groups[1:]:
        founder = group[0]
        shard, report = (filed_in(founder, names)
                         or (row["shard"], str((founder[REPORTS] or [""])[0])))
        iid = insight_id(shard, report)
        if (any(x["id"] == iid for x in p.split)
                or tx.run(cypher.EXISTING_INSIGHTS, ids=[iid]).single(strict=True)["ids"]):
            first += group
            continue
        seq = max([int(x["props"]["seq"]) for x in p.split if x["shard"] == shard]
                  + [_max_seq(tx, shard)]) + 1
        summary = (founder[TEXT] or "")[:280]
        props: dict[str, Any] = {
            "id": iid, "shard": shard, "seq": seq, "run_id": row["run_id"],
            "embedding": founder[EMBEDDING], "dim": dim, "summary": summary,
            "text": medoid_text(group, dim, summary), "created_at": row["created_at"]}
        if row["model"] is not None:
            props["model"] = row["model"]
        if with_vector:
            props["embedding_vector"] = [float(v) for v in
                                         decode_embeddings([founder[EMBEDDING]], dim)[0]]
        p.split.append({"id": iid, "from": row["id"], "shard": shard, "props": props,
                        "sources": [s[SOURCE] for s in group]})
        kept[iid] = ({"id": iid, "shard": shard, "dim": dim, "model": row["model"],
                      "seq": seq, "text": props["text"], "summary": summary}, group)
    return first


def _max_seq(tx: Any, shard: str) -> int:
    seq = tx.run(cypher.MAX_SEQ, shard=shard).single(strict=True)["seq"]
    return -1 if seq is None else int(seq)


def redecide(tx: Any, p: Plan, kept: dict[str, tuple[dict[str, Any], list[list[Any]]]],
             rule: Rule, names: list[str]) -> set[str]:
    """Each insight founded anew (its founding report was forgotten, or it was split off one
    that was) decided again, as the librarian decides a new report (`dedup.decide`): where
    its new founder restates another insight of the same model under the dedup ``rule``
    (its own shard first, then the others), it merges into that one, which then reads as the
    medoid of both insights' supports; a split-off one is then never created, its supports
    move to that insight (`Plan.moves`). Insights are taken in seq order, each against the
    graph as the forget leaves it so far; ``names`` are the graph's shards, sorted. Returns
    the shards merged into.

    A fresh run could still have decided differently: reports that a forgotten founder drew
    into another insight are not decided again.
    """
    founded = {r["id"]: (r["embedding"], r["summary"]) for r in p.represent
               if r["embedding"] is not None}
    new = {x["id"]: x for x in p.split}
    founded.update({x["id"]: (x["props"]["embedding"], x["props"]["summary"])
                    for x in p.split})
    if not founded:
        return set()
    dropped = set(p.insights)
    groups: dict[tuple[int, str | None], list[str]] = {}
    for iid in founded:
        row = kept[iid][0]
        groups.setdefault((int(row["dim"]), row["model"]), []).append(iid)
    into: dict[str, str] = {}
    shard_of: dict[str, str] = {}
    for (dim, model), iids in sorted(groups.items(), key=lambda g: str(g[0])):
        parts = [CurateTx(tx).read_shard(name, dim, model=model) for name in names]
        # the split-off insights, not in the graph yet, in their shards
        extra = [i for i in iids if i in new and new[i]["shard"] in names]
        ids = [i for part in parts for i in part.ids] + extra
        if not ids:
            continue
        home = np.concatenate([np.full(len(part), n) for n, part in enumerate(parts)]
                              + [np.array([names.index(new[i]["shard"]) for i in extra],
                                          dtype=np.int64)])
        at = {iid: n for n, iid in enumerate(ids)}
        emb = np.concatenate([part.embeddings for part in parts]
                             + [np.zeros((len(extra), dim), np.float16)]).astype(np.float32)
        texts = [t for part in parts for t in part.summaries] + [""] * len(extra)
        alive = np.array([iid not in dropped for iid in ids])
        for iid in iids:  # the new founders, as the graph will hold them
            if iid in at:
                emb[at[iid]] = decode_embeddings([founded[iid][0]], dim)[0]
                texts[at[iid]] = founded[iid][1]
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        grams: dict[int, frozenset[str]] = {}  # shingled when first needed
        # seq counts per shard: shard and id break its ties, the same on every server
        order = sorted((i for i in iids if i in at),
                       key=lambda i: (kept[i][0]["seq"], kept[i][0]["shard"], i))
        for iid in order:
            me = at[iid]
            cos = emb @ emb[me]
            cos[~alive] = -np.inf
            cos[me] = -np.inf
            # its own shard first; else the best of each other shard's, as `dedup.decide`
            best, score = _best_in(home == home[me], me, cos, texts, grams, rule)
            if score < rule.threshold:
                away = [_best_in(home == h, me, cos, texts, grams, rule)
                        for h in range(len(parts)) if h != home[me]]
                best, score = max(away, key=lambda b: b[1], default=(-1, -np.inf))
            if best >= 0 and score >= rule.threshold:
                into[iid] = ids[best]
                shard_of[ids[best]] = names[int(home[best])]
                alive[me] = False
            elif iid in new:  # a new insight: its near neighbours, as the librarian links
                p.similar += _neighbours(iid, cos, home == home[me], ids, rule)
    if not into:
        return set()

    def final(iid: str) -> str:
        while iid in into:
            iid = into[iid]
        return iid

    p.merge = [{"merged": iid, "into": final(iid), "sources": None}
               for iid in sorted(into) if iid not in new]
    p.moves = [{"merged": new[x]["from"], "into": final(x), "sources": new[x]["sources"]}
               for x in sorted(into) if x in new and new[x]["from"] != final(x)]
    # The targets' texts: the medoid of their supports and the merged ones' (as `represent`).
    targets = sorted({final(iid) for iid in into})
    new_by_id = {r["id"]: r for r in p.represent}
    missing = [t for t in targets if t not in kept]
    for row in tx.run(cypher.INSIGHT_SUPPORTS, ids=missing) if missing else []:
        kept[row["id"]] = (dict(row), list(row["supports"]))
    # One support per source: where a merged insight and its target share a source, the
    # graph keeps the target's edge (MOVE_SUPPORTS merges onto it).
    pooled: dict[str, dict[str, list[Any]]] = {
        t: {s[SOURCE]: s for s in kept[t][1]} for t in targets if t in kept}
    for iid in sorted(into):
        into_ = pooled.setdefault(final(iid), {})
        for s in kept[iid][1]:
            into_.setdefault(s[SOURCE], s)
    p.represent = [r for r in p.represent if r["id"] not in into]
    p.split = [x for x in p.split if x["id"] not in into]
    for target, by_source in pooled.items():
        row = kept[target][0]
        # a re-founded target's summary is its new founder's, not the one read before
        summary = founded[target][1] if target in founded else row["summary"]
        text = medoid_text(list(by_source.values()), int(row["dim"]), summary)
        if target in new:
            new[target]["props"]["text"] = text
        elif target in new_by_id:
            new_by_id[target]["text"] = text
        elif text != row["text"]:
            p.represent.append({"id": target, "text": text, "summary": summary,
                                "embedding": None, "vector": None})
    return {shard_of[t] for t in targets}


def _neighbours(iid: str, cos: np.ndarray, mine: np.ndarray, ids: list[str],
                rule: Rule, k: int = 5) -> list[dict[str, Any]]:
    """SIMILAR_TO rows from a new insight to its near neighbours (``rule.related`` <= cosine
    < ``rule.threshold``): the ``k`` nearest in its own shard (rows ``mine``) and the ``k``
    nearest in the others, as `dedup.decide` links an inserted report."""
    near = (cos >= rule.related) & (cos < rule.threshold)
    rows_ = []
    for where in (near & mine, near & ~mine):
        cand = np.flatnonzero(where)
        rows_ += [{"insight": iid, "b": ids[j], "score": float(cos[j])}
                  for j in cand[np.argsort(-cos[cand], kind="stable")[:k]]]
    return rows_


def _best_in(where: np.ndarray, me: int, cos: np.ndarray, texts: list[str],
             grams: dict[int, frozenset[str]], rule: Rule) -> tuple[int, float]:
    """Row ``me``'s best candidate under ``rule`` among the rows ``where`` (row, score): the
    rule applied to the top 32 by cosine ``cos``, as the librarian applies it to a cache."""
    cand = np.flatnonzero(where)
    cand = cand[np.argsort(-cos[cand], kind="stable")[:32]]
    if not cand.size:
        return -1, -np.inf
    lexical = rule.lexical is not None
    sc = scores(cos[cand][None, :], [_gram(texts, grams, me)] if lexical else None,
                [_gram(texts, grams, int(c)) for c in cand] if lexical else None, rule)[0]
    top = int(np.argmax(sc))
    return int(cand[top]), float(sc[top])


def _gram(texts: list[str], memo: dict[int, frozenset[str]], n: int) -> frozenset[str]:
    """Row ``n``'s character shingles, computed once."""
    if n not in memo:
        memo[n] = shingles(texts[n]) if texts[n] else frozenset()
    return memo[n]


def medoid_text(supports: list[list[Any]], dim: int, summary: str) -> str:
    """The text of ``supports`` (`INSIGHT_SUPPORTS` rows: `SOURCE`, `EMBEDDING`, ...) as curating
    them makes it: the medoid of the texts where two or more have an embedding (what
    `rows.medoid_rows` keeps an insight's text at), else ``summary``."""
    pairs = [s for s in supports if s[EMBEDDING] is not None and s[TEXT]]
    if len(pairs) < 2:
        return summary
    return pairs[rows.medoid([s[EMBEDDING] for s in pairs], dim,
                             [s[TEXT] for s in pairs])][TEXT]


def represent(row: dict[str, Any], rest: list[list[Any]],
              with_vector: bool) -> dict[str, Any] | None:
    """An insight's text (and, if its founder is gone, embedding and summary) from its
    remaining supports ``rest`` (`INSIGHT_SUPPORTS` rows), as curating
    them alone would have made it; None when nothing changes.

    The text is `medoid_text` of the remaining supports. An insight whose founding report is
    among the forgotten is founded anew by the earliest remaining report (the one a run
    without the forgotten would have founded it with; the medoid where the edges do not say
    when they arrived): its embedding and its text's first 280 characters (the summary a new
    insight has).
    """
    iid, dim = row["id"], int(row["dim"])
    founded = founder_kept(row, rest)
    usable = [s for s in rest if s[EMBEDDING] is not None]
    if usable and all(s[AT] is not None for s in rest):
        founder = min(usable, key=lambda s: (int(s[AT]), int(s[POS] or 0), str(s[SOURCE])))
    elif usable:
        founder = usable[rows.medoid([s[EMBEDDING] for s in usable], dim,
                                     [s[TEXT] or s[SOURCE] for s in usable])]
    else:
        founder = rest[0]
    summary = row["summary"] if founded else (founder[TEXT] or "")[:280]
    text = medoid_text(rest, dim, summary)
    if founded and text == row["text"]:
        return None
    out: dict[str, Any] = {"id": iid, "text": text, "summary": summary, "embedding": None,
                           "vector": None}
    if not founded and founder[EMBEDDING] is not None:
        out["embedding"] = founder[EMBEDDING]
        if with_vector:
            out["vector"] = [float(v) for v in decode_embeddings([founder[EMBEDDING]], dim)[0]]
    return out


def apply(tx: Any, p: Plan, with_vector: bool) -> None:
    """The writes of plan ``p``, on ``tx``."""
    if p.drop:
        tx.run(cypher.DROP_SUPPORTS, rows=p.drop).consume()
    if p.thin:
        tx.run(cypher.THIN_SUPPORTS, rows=p.thin).consume()
    if p.insights:
        tx.run(cypher.DROP_INSIGHTS, ids=p.insights).consume()
    if p.sources:
        tx.run(cypher.DROP_BARE_SOURCES, ids=p.sources).consume()
    if p.split:  # created first: a merge or a move may go into one
        tx.run(cypher.SPLIT_INSIGHTS, rows=[{"shard": x["shard"], "props": x["props"]}
                                            for x in p.split]).consume()
        moved = [{"merged": x["from"], "into": x["id"], "sources": x["sources"]}
                 for x in p.split]
        tx.run(cypher.SPLIT_DISCOVERED, rows=moved).consume()
        tx.run(cypher.MOVE_PRODUCED, rows=moved).consume()
        tx.run(cypher.MOVE_SUPPORTS, rows=moved).consume()
    if p.similar:
        tx.run(cypher.MERGE_SIMILAR, rows=p.similar).consume()
    if p.moves:
        tx.run(cypher.MOVE_SUPPORTS, rows=p.moves).consume()
        tx.run(cypher.MOVE_PRODUCED, rows=p.moves).consume()
    if p.merge:
        tx.run(cypher.MOVE_SUPPORTS, rows=p.merge).consume()
        tx.run(cypher.MOVE_PRODUCED, rows=p.merge).consume()
        tx.run(cypher.DROP_INSIGHTS, ids=[m["merged"] for m in p.merge]).consume()
    if p.represent:
        tx.run(cypher.REPRESENT_VECTOR if with_vector else cypher.REPRESENT,
               rows=p.represent).consume()
    if p.touched:
        tx.run(cypher.BUMP_EPOCHS, shards=p.touched).consume()


def job_item_ids(rt: Runtime, job: str) -> list[str]:
    """Every item id a job recorded, in order; `PipelineError` (one line) for an unknown job
    or one still filing items."""
    with rt.Session() as s:
        row = s.get(Job, job)
        if row is None:
            raise PipelineError(f"--job {job!r}: no such job (moe-pipeline status lists them)")
        if row.status in LIVE and not interrupted(row, time.time()):
            raise PipelineError(f"--job {job!r} is still {row.status}: forget it once it has "
                                "finished (moe-pipeline status JOB)")
        lists = s.scalars(select(Batch.item_ids).where(Batch.job_id == job)
                          .order_by(Batch.index)).all()
    return list(dict.fromkeys(i for ids in lists for i in ids))


def forget(rt: Runtime, sources: Iterable[str] = (), job: str | None = None,
           dry_run: bool = False, keep: dict[str, str] | None = None,
           rule: Rule | None = None) -> ForgetResult:
    """Take back ``sources`` (ids), or what ``job`` filed, from the graph, every cache and
    SQL (see the module's docstring); with ``dry_run``, only say what would change.

    An id no source has is reported (``unknown``) and changes nothing; a request with no
    known id at all is a `PipelineError`, unless it finishes a forget that was cut off.
    ``keep`` (id -> content hash) spares a source that already holds that content: how a
    librarian retracts a changed source's old content without undoing another's new one.
    ``rule`` decides the merges of re-founded insights (`redecide`; default: the served
    model's dedup rule).
    """
    ids = list(dict.fromkeys(str(i) for i in sources))
    if job is not None:
        ids = job_item_ids(rt, job)
    elif not ids:
        raise PipelineError("forget: name at least one source id, a --file or a --job")
    graph, wv = rt.graph, rt.graph.with_vector
    # The dedup rule that decides merges: the curating librarian's for a changed source, else
    # the served model's.
    rule = rule or rt.librarian().rule
    # The preview only reads: a read transaction (the reader user on the embedded server).
    preview = graph.view(lambda view: plan(view.tx, ids, job, wv, keep,
                                           rule if dry_run else None))
    if dry_run:
        return ForgetResult(None, True, len(ids), preview.unknown if job is None else [],
                            preview.counts(), preview.touched)
    record = _open_record(rt, ids, job)
    if record is None and job is None and keep is None and len(preview.unknown) == len(ids):
        shown = ", ".join(repr(i) for i in ids[:3]) + (" ..." if len(ids) > 3 else "")
        raise PipelineError(f"forget: no source has the id(s) {shown}; nothing changed")
    record = record or _new_record(rt, ids, job)
    want = set(preview.locked)
    while True:
        done = _apply_locked(rt, ids, job, frozenset(want), keep, rule)
        if set(done.locked) <= want:
            break
        want |= set(done.locked)  # a job filed these sources into more shards meanwhile
    counts = done.counts()
    if job is not None:
        counts["unknown"] = 0  # a job's bad items have no source: not worth a word
    _finish_record(rt, record, ids, job, counts)
    for librarian in rt.librarians():
        librarian.forget_shards(done.touched)
    return ForgetResult(record, False, len(ids), done.unknown if job is None else [],
                        counts, done.touched)


def _apply_locked(rt: Runtime, ids: list[str], job: str | None, shards: frozenset[str],
                  keep: dict[str, str] | None, rule: Rule | None = None) -> Plan:
    """Under the locks of ``shards`` (taken in order, as every librarian takes them), plan
    and apply in one graph transaction; a plan that reaches a shard not held is returned
    unapplied, for the caller to take that lock too."""
    wv = rt.graph.with_vector
    with contextlib.ExitStack() as held:
        for shard in sorted(shards):
            held.enter_context(rt.locks(shard))

        def work(tx: Any) -> Plan:
            p = plan(tx, ids, job, wv, keep, rule)
            if set(p.locked) <= shards:
                apply(tx, p, wv)
                if rt.settings.fault_kill_item in ids:  # a drill: killed before the commit
                    os.kill(os.getpid(), signal.SIGKILL)
            return p

        return rt.graph.write(work)


def _open_record(rt: Runtime, ids: list[str], job: str | None) -> str | None:
    """A forget of the same request that was cut off before it finished, if there is one:
    running it again finishes that one."""
    with rt.Session() as s:
        rows_ = s.scalars(select(Forget).where(Forget.finished_at.is_(None))).all()
        for row in rows_:
            if row.job_id == job and row.source_ids == ids:
                return row.id
    return None


def _new_record(rt: Runtime, ids: list[str], job: str | None) -> str:
    with rt.Session.begin() as s:
        row = Forget(job_id=job, source_ids=ids, counts={})
        s.add(row)
        s.flush()
        return row.id


def _finish_record(rt: Runtime, record: str, ids: list[str], job: str | None,
                   counts: dict[str, int]) -> None:
    """The forgotten ids' bad-item records go (they may quote the input); the forget's row
    is finished with what this run changed."""
    with rt.Session.begin() as s:
        if job is not None:
            s.execute(delete(ItemError).where(ItemError.job_id == job))
        else:
            for start in range(0, len(ids), 500):
                s.execute(delete(ItemError).where(ItemError.item_id.in_(ids[start:start + 500])))
        s.execute(update(Forget).where(Forget.id == record)
                  .values(counts=counts, finished_at=time.time()))
