"""The messages on the queues, to and from their wire form (plain dicts for `wire`).

- a batch (`ItemBatch`): ids and texts as JSON, the vectors as one float32 array;
- a shard part (`ShardPart`): the reports' fields as lists, the embeddings as one float16
  array (the precision the graph stores and the librarian decides on);
- a similarity question (`records.Question`: `similar_message`, `similar_question`);
- a forget (`ForgetRequest`): source ids or a job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.records import DraftReport, Item, ItemBatch, Question, ShardPart

# The fields a worker reads from each message (`poison` refuses one that lacks any).
BATCH_FIELDS = ("batch_id", "job_id", "run_id", "model", "ids", "texts", "vector_rows",
                "vectors")
PART_FIELDS = ("batch_id", "run_id", "shard", "job_id", "ids", "item_ids", "scores",
               "experts", "texts", "embeddings")


def batch_message(batch: ItemBatch) -> dict[str, Any]:
    items = batch.items
    rows = [i for i, item in enumerate(items) if item.vector is not None]
    vectors = (np.asarray([items[i].vector for i in rows], dtype=np.float32) if rows
               else None)
    return {"batch_id": batch.batch_id, "job_id": batch.job_id, "run_id": batch.run_id,
            "model": batch.model, "ids": [item.id for item in items],
            "lines": [item.line for item in items],  # so an item failing mid-batch is
            # reported at its line of the file
            "texts": [item.text for item in items], "vector_rows": rows, "vectors": vectors}


def message_batch(message: dict[str, Any]) -> ItemBatch:
    vectors = dict(zip(message["vector_rows"], message["vectors"] if message["vector_rows"]
                       else [], strict=True))
    lines = message.get("lines") or list(range(len(message["ids"])))  # older senders
    items = [Item(item_id, line, text, vectors.get(row)) for row, (item_id, line, text)
             in enumerate(zip(message["ids"], lines, message["texts"], strict=True))]
    return ItemBatch(message["batch_id"], message["job_id"], message["run_id"],
                     message["model"], items)


def part_message(part: ShardPart) -> dict[str, Any]:
    reports = part.reports
    return {"batch_id": part.batch_id, "run_id": part.run_id, "shard": part.shard,
            "job_id": reports[0].job_id, "ids": [r.id for r in reports],
            "item_ids": [r.item_id for r in reports], "scores": [r.score for r in reports],
            "experts": [r.experts for r in reports], "texts": [r.text for r in reports],
            "contents": [r.content for r in reports],
            "embeddings": np.stack([np.asarray(r.embedding, np.float16) for r in reports]),
            "model": part.model}


def message_part(message: dict[str, Any]) -> ShardPart:
    emb = message["embeddings"].astype(np.float32)
    contents = message.get("contents") or [""] * len(message["ids"])  # older senders
    reports = [DraftReport(rid, message["job_id"], item_id, message["shard"], emb[n], score,
                           experts, text, content)
               for n, (rid, item_id, score, experts, text, content) in enumerate(zip(
                   message["ids"], message["item_ids"], message["scores"],
                   message["experts"], message["texts"], contents, strict=True))]
    return ShardPart(message["batch_id"], message["run_id"], message["shard"], reports,
                     message.get("model"))


def similar_message(q: Question) -> dict[str, Any]:
    return {"text": q.text, "vector": None if q.vector is None else list(q.vector), "k": q.k,
            "constellation": q.constellation, "min_score": q.min_score, "like": q.like}


def similar_question(message: dict[str, Any]) -> Question:
    vector = message.get("vector")
    floor = message.get("min_score")
    return Question(message.get("text"),
                    None if vector is None else [float(v) for v in vector],
                    int(message.get("k", 10)), message.get("constellation"),
                    None if floor is None else float(floor), message.get("like"))


@dataclass(frozen=True)
class ForgetRequest:
    """``forget``: source ids, or a job whose filing is taken back, and whether only to
    say what would change."""

    ids: list[str]
    job: str | None = None
    dry_run: bool = False

    def to_message(self) -> dict[str, Any]:
        return {"ids": self.ids, "job": self.job, "dry_run": self.dry_run}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ForgetRequest:
        job = message.get("job")
        return cls([str(i) for i in message.get("ids") or []],
                   None if job is None else str(job), bool(message.get("dry_run")))
