"""The pipeline's host-side records, and the deterministic ids that name them.

An `Item` is one validated input (a `BadItem` one that was refused, with its reason). A
`DraftReport` is one (input item, chosen constellation) pair coming out of the model; an
`Insight` is a deduplicated report persisted in the graph. A `CuratedBatch` is everything one
librarian decision writes, in one transaction: new insights, and the edges of both new and
merged reports. `ItemBatch` and `ShardPart` are the two units of work the stages take (one
batch of items to route, one shard's reports to curate), whichever way they travelled.

Ids are deterministic so that a retried task writes the same rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def stable_id(*parts: str, length: int = 24) -> str:
    """A deterministic id from its parts (sha256, hex, ``length`` characters)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return digest[:length]


def storable(text: str, limit: int) -> str:
    """``text`` as any SQL or graph store can hold it, in at most ``limit`` characters: a
    lone surrogate (not encodable as UTF-8) and NUL (which PostgreSQL text refuses) are
    written as their escapes, and what is past the limit is cut, ending with an ellipsis.

    For what an error record stores (a bad item's id, a message quoting input): recording
    an error must never fail for the very content it reports."""
    if "\x00" in text or not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace(
            "\x00", "\\x00")
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def content_hash(text: str | None, vector: Any) -> str:
    """What an item says, as a hash kept on its Source: an id ingested again with another
    hash is a changed source (its old support is retracted first). Text and vectors hash
    apart; a vector by its float32 bytes, so 0.1 written two ways is one content."""
    h = hashlib.sha256()
    if text is not None:
        h.update(b"text\x1f" + text.encode("utf-8", "surrogatepass"))
    else:
        h.update(b"vector\x1f" + np.asarray([] if vector is None else vector,
                                              dtype="<f4").tobytes())
    return h.hexdigest()[:32]


def report_id(job_id: str, item_id: str, constellation: str) -> str:
    return stable_id("report", job_id, item_id, constellation)


def expert_id(name: str, model: str | None) -> str:
    """An Expert node belongs to one model: two models' "expert_3" are two experts, so the
    graph's expert questions never mix them. The name stays readable in front."""
    return name if model is None else f"{name}@{model}"


def expert_name(node_id: str) -> str:
    """The readable name of an Expert node's id."""
    return node_id.split("@", 1)[0]


def insight_id(shard: str, leader_report: str) -> str:
    """An insight is named by its shard and the report that founded it: replays agree."""
    return stable_id("insight", shard, leader_report)


def encode_embedding(vector: np.ndarray) -> bytes:
    """An embedding as compact little-endian float16 bytes (how the graph stores it)."""
    return np.asarray(vector, dtype="<f2").tobytes()


def decode_embeddings(blobs: list[bytes], dim: int) -> np.ndarray:
    """Many encoded embeddings at once: ``(n, dim)`` float16."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float16)
    flat = np.frombuffer(b"".join(blobs), dtype="<f2")
    if flat.size != len(blobs) * dim:
        raise ValueError(f"embeddings hold {flat.size} values, expected {len(blobs)} x {dim}")
    return flat.reshape(len(blobs), dim)


@dataclass(frozen=True)
class Item:
    """One validated input: text or a vector, with optional metadata."""

    id: str
    line: int  # 1-based line (or list position)
    text: str | None = None
    vector: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadItem:
    """An input that was refused: where it was, its id if it had one, the field and why.
    (``line`` is None for an item that failed after validation, in a step that knows its id
    but not its line.)"""

    line: int | None
    item_id: str | None
    field: str
    message: str


@dataclass(frozen=True)
class DraftReport:
    """One input item's report for one chosen constellation."""

    id: str
    job_id: str
    item_id: str
    constellation: str
    embedding: np.ndarray  # (dim,) float32, L2-normalised
    score: float  # the supervisor's probability for this constellation
    experts: dict[str, float]  # expert name -> mean routing weight, experts that fired
    text: str = ""  # the item's text span, if it had one
    content: str = ""  # the item's content hash (`content_hash`); "" from older senders


@dataclass(frozen=True)
class Insight:
    """A new insight node: its deterministic id, shard, sequence number and embedding."""

    id: str
    shard: str  # the constellation name
    seq: int  # per-shard, monotonically increasing
    embedding: np.ndarray  # (dim,) float32
    run_id: str
    summary: str = ""
    created_at: float = 0.0
    model: str | None = None  # fingerprint of the model whose report space it lives in


@dataclass(frozen=True)
class Support:
    """SUPPORTED_BY: a report's source item backs an insight (new or merged into)."""

    insight_id: str
    source_id: str
    report_id: str
    job_id: str
    weight: float
    source_text: str = ""
    embedding: np.ndarray | None = None  # (dim,) the report's, for the insight's medoid text
    content_hash: str = ""  # the source's (`content_hash`), kept on its node
    # when it arrived: the curated part's time (microseconds since the epoch) and the report's
    # place in it (a forget replays an insight's supports in this order, part by part)
    at: int | None = None
    pos: int | None = None


@dataclass(frozen=True)
class Produced:
    """PRODUCED_BY: an expert contributed to an insight with this (max) weight."""

    insight_id: str
    expert: str
    weight: float


@dataclass(frozen=True)
class Similar:
    """SIMILAR_TO: a near neighbour below the dedup threshold."""

    insight_id: str
    other_id: str
    score: float


@dataclass
class CuratedBatch:
    """Everything one librarian decision writes, in one graph transaction."""

    run_id: str
    insights: list[Insight] = field(default_factory=list)
    supports: list[Support] = field(default_factory=list)
    produced: list[Produced] = field(default_factory=list)
    similar: list[Similar] = field(default_factory=list)


@dataclass
class CurateResult:
    """What curating one shard's reports did."""

    shard: str
    reports: int
    skipped: int  # already curated (a replay)
    inserted: int
    merged: int  # reports that joined an insight someone else founded (cache or batch-mate)
    similar: int
    insight_of_report: dict[str, str]

    def outcome(self) -> tuple[int, int]:
        """(reports that founded an insight, reports that joined one), counting replayed
        reports by what their first curation did, so a redelivered part records the same
        figures as the delivery that wrote it."""
        founded = sum(insight == insight_id(self.shard, report)
                      for report, insight in self.insight_of_report.items())
        return founded, len(self.insight_of_report) - founded


@dataclass(frozen=True)
class ItemBatch:
    """One batch of a job's items, to be routed by the model the job was submitted for."""

    batch_id: str
    job_id: str
    run_id: str
    model: str  # the fingerprint of the served model at submission
    items: list[Item]


@dataclass(frozen=True)
class ShardPart:
    """One batch's draft reports for one shard, to be curated by that shard's librarian."""

    batch_id: str
    run_id: str
    shard: str
    reports: list[DraftReport]
    model: str | None = None  # the fingerprint of the model that drafted the reports


@dataclass(frozen=True)
class Question:
    """One `similar` question: a text, a vector (the model's input width) or a stored id
    (``like``), how many answers, and optionally one constellation and a floor."""

    text: str | None = None
    vector: Sequence[float] | None = None
    k: int = 10
    constellation: str | None = None
    min_score: float | None = None
    like: str | None = None
