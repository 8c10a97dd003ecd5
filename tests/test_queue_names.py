"""Constellation labels with any characters become queues that workers consume.

Celery splits ``-Q`` on commas and the worker's ``--shards`` did too, so a label such as
"biology, chemistry" became a librarian queue no worker consumed, and a queued job stayed
``running`` for ever. Labels now map to queue-safe names (`app.queue_safe`).
"""

from __future__ import annotations

import json
import sys

import forkrun
import numpy as np
import pytest
from test_queue_workers import _wait

from pipeline import jobs
from pipeline.queue.app import librarian_queue, queue_safe
from pipeline.queue.worker import shard_names

LABELS = ("biology, chemistry", "earth and space", "rocks/minerals")


def test_plain_labels_keep_their_names_and_others_are_encoded_one_to_one():
    assert queue_safe("mathematics") == "mathematics"
    assert librarian_queue("topic-3") == "librarian.topic-3"
    odd = ["biology, chemistry", "biology chemistry", "biology/chemistry", "a,b", "a b",
           "", ",,,", "é", "x" * 300, "mathematics-0123456789ab"]
    names = [queue_safe(label) for label in odd]
    assert len(set(names)) == len(odd)  # one to one, even where the slugs collide
    assert names[0].startswith("biology-chemistry-") and len(names[0]) == 30
    assert all(len(n) <= 80 and "," not in n and " " not in n and "/" not in n
               for n in names)
    assert queue_safe("biology, chemistry") == names[0]  # deterministic
    # a plain label that looks encoded is encoded too, so it cannot take another's queue
    assert names[-1] != "mathematics-0123456789ab"


def test_shards_are_read_as_human_names_or_queue_names():
    known = [*LABELS, "physics"]
    assert shard_names(["biology, chemistry,physics"], known) == ["biology, chemistry",
                                                                 "physics"]
    assert shard_names(["rocks/minerals", "earth and space , physics"], known) == [
        "rocks/minerals", "earth and space", "physics"]
    assert shard_names([queue_safe("biology, chemistry")], known) == ["biology, chemistry"]
    assert shard_names(["physics,physics", "other"], known) == ["physics", "other"]


def _labelled_items(n: int) -> list[dict]:
    rng = np.random.default_rng(24)
    centres = rng.standard_normal((len(LABELS), 16)) * 3
    return [{"id": f"lab-{i}", "vector": (centres[i % 3] + 0.1 * rng.standard_normal(16))
             .round(5).tolist(), "meta": {"topic": LABELS[i % 3]}} for i in range(n)]


@pytest.mark.backends("neo4j")
def test_labels_with_comma_space_and_slash_run_queued_to_the_graph(stack):
    raw = _labelled_items(30)
    path = stack.tmp / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in raw) + "\n")
    train = forkrun.run([sys.executable, "-m", "pipeline.cli", "train", str(path),
                         "--label-field", "topic", "--epochs", "20"], cwd=stack.tmp,
                        env=stack.env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    # The librarian is told its shards by their human names, commas and all.
    stack.workers("gpu", ("librarian", {}, ["--shards", ",".join(LABELS)]))
    job = jobs.submit(raw, stack.settings(), 10)
    state = _wait(stack, job.job_id, timeout_s=120)
    assert state.status == "completed", stack.logs()
    rows = stack.graph.run_cypher(
        "MATCH (i:Insight)-[e:SUPPORTED_BY]->(s:Source) WHERE e.job_id = $job "
        "MATCH (i)-[:IN_CONSTELLATION]->(c:Constellation) RETURN s.id AS source, "
        "c.id AS name", {"job": job.job_id})
    filed = {r["source"]: r["name"] for r in rows}
    assert set(filed) == {r["id"] for r in raw}  # every item in the graph
    assert set(filed.values()) == set(LABELS)  # read back under their own names
    right = sum(filed[r["id"]] == r["meta"]["topic"] for r in raw)
    assert right >= 27, filed
