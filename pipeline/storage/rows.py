"""Pure functions from the pipeline's records to the parameter rows Cypher statements take.

Every value a statement needs arrives as a parameter built here; nothing is formatted into
query text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from pipeline.records import (
    CuratedBatch,
    Insight,
    Produced,
    Similar,
    Support,
    decode_embeddings,
    encode_embedding,
    expert_id,
    expert_name,
)

Row = dict[str, Any]


def insight_row(insight: Insight, with_vector: bool = False) -> Row:
    props: Row = {"id": insight.id, "shard": insight.shard, "seq": insight.seq,
                  "run_id": insight.run_id, "embedding": encode_embedding(insight.embedding),
                  "dim": int(insight.embedding.shape[-1]), "summary": insight.summary,
                  # what a reader sees: the medoid of its sources' texts once it has several
                  "text": insight.summary,
                  "created_at": insight.created_at}
    if insight.model is not None:  # the model that drafted it: its report space
        props["model"] = insight.model
    if with_vector:  # a list-of-floats copy, for servers with a vector index
        props["embedding_vector"] = [float(v) for v in insight.embedding]
    return {"id": insight.id, "shard": insight.shard, "props": props}


def support_row(s: Support) -> Row:
    return {"insight": s.insight_id, "source": s.source_id, "report": s.report_id,
            "job": s.job_id, "weight": float(s.weight), "text": s.source_text,
            "hash": s.content_hash or None, "at": s.at, "pos": s.pos,
            "embedding": None if s.embedding is None else encode_embedding(s.embedding)}


# An insight's text is recomputed while it has at most this many supports; past that its
# medoid barely moves, and reading every support's embedding at each merge would not pay.
MEDOID_MAX_SUPPORT = 64


def medoid_rows(found: list[dict[str, Any]], dim: int) -> list[Row]:
    """{"id", "text"} for each insight whose supports' texts have a medoid: the text of the
    support whose report embedding is nearest the supports' mean direction (cosine), so the
    insight reads as its most typical restatement, not whichever came first. ``found`` rows
    hold ``id`` and ``pairs`` of [stored embedding bytes (None where an edge has none), text]
    (pairs, since Cypher's collect drops the nulls of a list of values)."""
    out = []
    for row in found:
        pairs = [(e, t) for e, t in row["pairs"] if e is not None and t]
        if len(pairs) < 2:
            continue
        pick = medoid([e for e, _ in pairs], dim, [t for _, t in pairs])
        out.append({"id": row["id"], "text": pairs[pick][1]})
    return out


# Scores this close to the best tie: with two supports both are exactly as near the mean, but
# rounding decides which scores higher, and the order the server lists them in decides that.
MEDOID_TIE = 1e-5


def medoid(blobs: list[bytes], dim: int, keys: list[str] | None = None) -> int:
    """The index of the stored embedding nearest the mean direction of them all (cosine);
    ties go to the smallest of ``keys`` (the texts), so the answer does not depend on the
    order the rows came in."""
    emb = decode_embeddings(blobs, dim).astype(np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    score = emb @ emb.mean(0)
    near = np.flatnonzero(score >= score.max() - MEDOID_TIE)
    if keys is None or len(near) == 1:
        return int(near[0])
    return int(min(near, key=lambda i: keys[i]))


def produced_row(p: Produced) -> Row:
    return {"insight": p.insight_id, "expert": p.expert, "weight": float(p.weight)}


def similar_row(s: Similar) -> Row:
    return {"insight": s.insight_id, "b": s.other_id, "score": float(s.score)}


def batch_rows(batch: CuratedBatch, existing: set[str],
               with_vector: bool = False) -> dict[str, list[Row]]:
    """The parameter rows of one curated batch, keyed by statement.

    ``existing`` holds the ids of the batch's insights already in the graph. A new insight's
    row carries its supports, producing experts and similar neighbours (written in one pass
    with the node); edges of existing insights become rows of the MERGE statements.
    Raises `ValueError` for a new insight without a support or a producing expert.
    """
    new_ids = {i.id for i in batch.insights if i.id not in existing}
    nested: dict[str, Row] = {}
    for insight in batch.insights:
        if insight.id in new_ids:
            row = insight_row(insight, with_vector)
            row.update(run_id=batch.run_id, supports=[], produced=[], similar=[])
            nested[insight.id] = row
    old: dict[str, list[Row]] = {"supports": [], "produced": [], "similar": []}

    def place(key: str, insight_id: str, row: Row, late: bool = False) -> None:
        if insight_id in nested and not late:
            nested[insight_id][key].append(row)
        else:
            old[key].append(row)

    for support in batch.supports:
        place("supports", support.insight_id, support_row(support))
    for produced in batch.produced:
        place("produced", produced.insight_id, produced_row(produced))
    for similar in batch.similar:
        # A similar edge between two new insights waits for both nodes: MERGE, after.
        place("similar", similar.insight_id, similar_row(similar),
              late=similar.other_id in new_ids)
    # Support counts distinct sources: one SUPPORTED_BY per (insight, source), whatever
    # number of jobs (or reports of one item) back it; the first report names the edge.
    for row in nested.values():
        row["supports"] = _one_per_source(row["supports"])
    old["supports"] = _one_per_source(old["supports"])
    for key in ("supports", "produced"):
        empty = [i for i, row in nested.items() if not row[key]]
        if empty:
            raise ValueError(f"insight {empty[0]} is new but has no {key} rows")
    return {"insights": list(nested.values()), "old_supports": old["supports"],
            "old_produced": old["produced"], "old_similar": old["similar"]}


def _one_per_source(rows: list[Row]) -> list[Row]:
    """Support rows merged per (insight, source): the first names the edge; every report and
    job that backs it is listed (``reports``, what replay detection looks up; ``jobs``)."""
    merged: dict[tuple[str, str], Row] = {}
    for r in rows:
        key = (r["insight"], r["source"])
        if key not in merged:
            merged[key] = {**r, "reports": [r["report"]], "jobs": [r["job"]]}
            continue
        m = merged[key]
        m["reports"] += [r["report"]] if r["report"] not in m["reports"] else []
        m["jobs"] += [r["job"]] if r["job"] not in m["jobs"] else []
    return list(merged.values())


def model_rows(constellations: dict[str, list[str]], model: str | None = None) -> list[Row]:
    """MEMBER_OF rows: one per (expert, constellation), the expert that of ``model``."""
    return [{"expert": expert_id(e, model), "name": e, "model": model, "constellation": c}
            for c, experts in constellations.items() for e in experts]


def expert_rows(ids: Iterable[str]) -> list[Row]:
    """Expert nodes by id, with the readable name and the model the id carries."""
    return [{"id": i, "name": expert_name(i), "model": i.split("@", 1)[1] if "@" in i else None}
            for i in sorted(set(ids))]
