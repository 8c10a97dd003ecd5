"""MOE_REDIS_PREFIX: a queued stack keeps to its own keys in a Redis database others share.

The suite runs many stacks, and its users other programs, on one Redis database, and nothing
flushes it (conftest). This holds only if every Redis key the system writes carries the
prefix: kombu's queues and bindings, Celery's result of a `similar` question, shard locks, and
the unacked set the lease reaper reads. A key another user wrote before the stack started is
still there, unchanged, after the stack ran a job, answered a question and was taken down.
"""

from __future__ import annotations

import json
import sys
import uuid

import forkrun
import pytest
import redis
from test_queue_workers import _items, _wait

from pipeline import jobs


def _keys(client: redis.Redis, pattern: str) -> set[str]:
    return {k.decode() for k in client.scan_iter(match=pattern, count=500)}


@pytest.mark.backends("neo4j")
def test_a_queued_stack_leaves_keys_it_did_not_create_untouched(stack):
    client = redis.Redis.from_url(stack.redis_url)
    sentinel = f"someone-else-{uuid.uuid4().hex[:12]}"  # under no prefix of the suite's
    client.set(sentinel, "theirs")
    try:
        stack.workers("gpu", "librarian", "query")
        raw = _items(40, seed=25)
        job = jobs.submit(raw, stack.settings(), 16)
        assert _wait(stack, job.job_id).status == "completed", stack.logs()
        (stack.tmp / "v.json").write_text(json.dumps(raw[0]["vector"]))
        hit = forkrun.run([sys.executable, "-m", "pipeline.cli", "similar", "--vector-file",
                           str(stack.tmp / "v.json"), "--k", "1", "--json", "--queue"],
                          cwd=stack.tmp, env=stack.env, capture_output=True, text=True,
                          timeout=120)
        assert hit.returncode == 0, hit.stderr + stack.logs()
        assert len(hit.stdout.splitlines()) == 1

        ours = _keys(client, stack.prefix + "*")
        # The broker's bindings and the question's answer (Celery's result backend) carry
        # the prefix; the answer's key exists under no other name.
        assert stack.prefix + "_kombu.binding.gpu" in ours, sorted(ours)
        answers = [k for k in ours if k.startswith(stack.prefix + "celery-task-meta-")]
        assert len(answers) == 1, sorted(ours)
        assert not client.exists(answers[0][len(stack.prefix):])
        stack.close()
        assert _keys(client, stack.prefix + "*") == set()  # its own keys, and only those, gone
        assert client.get(sentinel) == b"theirs" and client.ttl(sentinel) == -1
    finally:
        client.delete(sentinel)  # the test's own key
        client.close()
