"""Workers survive any bytes on their queues, on Redis and on RabbitMQ.

Ten kinds of poison are written straight onto the ``gpu`` queue (Redis: LPUSH on the list the
transport pops; RabbitMQ: a raw publish), each followed by a real job: the job must complete,
the worker must still be the same process, the poison must be refused in one log line that
shows none of its bytes, and a record of it must wait on the dead-letter queue ``moe.dead``.
One worker pair per broker serves every kind (module-scoped), so the cost is two starts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_queue_workers import Stack, _items, _wait, _which

from pipeline import jobs
from pipeline.queue.guard import DEAD_QUEUE

pytestmark = pytest.mark.integration

SECRET = "s3cret-payload"  # in every poison body: it must never reach a log
MARKER = Path(f"/tmp/moe-unpickled-{uuid.uuid4().hex}")


class _Opens:
    """Unpickling this creates MARKER: proof that a pickle was (or was never) loaded."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


def _proto2(args: list, task: str = "pipeline.route_batch") -> tuple[dict, bytes]:
    headers = {"task": task, "id": str(uuid.uuid4()), "lang": "py", "retries": 0}
    return headers, json.dumps([args, {}, {"callbacks": None, "errbacks": None}]).encode()


def _kinds() -> dict[str, tuple[dict | None, str | None, bytes, str]]:
    """kind -> (headers, content type, body, the reason the worker must give)."""
    batch = {"batch_id": "b", "job_id": "j", "run_id": "r", "model": "m", "ids": ["x"],
             "texts": [SECRET], "vector_rows": [], "vectors": None}
    headers, good = _proto2([batch])
    moe = "application/x-moe-json"
    return {
        "not_json": (headers, moe, b"{not json " + SECRET.encode(), "body is not valid"),
        "bad_base64_array": (headers, moe, json.dumps([[{**batch, "vectors": {
            "__array__": "float32", "shape": [1], "b64": "!!" + SECRET}}], {}, {}]).encode(),
            "body is not valid"),
        "wrong_shape": (headers, moe, json.dumps({"hello": SECRET}).encode(),
                        "body is not [args, kwargs, embed]"),
        "missing_fields": (headers, moe, _proto2([{"texts": [SECRET]}])[1],
                           "message without batch_id"),
        "missing_headers": (None, moe, good, "no task headers"),
        "unknown_task": ({**headers, "task": "os.system"}, moe, good, "unknown task"),
        "huge": (headers, moe, good + b" " * (2 * 2**20), "over the limit"),
        "wrong_content_type": (headers, "application/x-yaml", good, "not accepted"),
        "pickle": (headers, "application/x-python-serialize",
                   pickle.dumps([[_Opens()], {}, {}]), "'application/x-python-serialize' not"),
        "truncated": (headers, moe, good[:len(good) // 2], "body is not valid"),
        "nul_bytes": (None, None, b"\x00\xff\xfe\x00" * 64 + SECRET.encode(),
                      "no task headers"),
    }


# Redis: these kinds are raw list entries that are not even kombu's envelope (the ones that
# stopped the worker); the rest are envelopes around the message-level kinds above.
RAW = {"not_json_envelope": (b"\x00{" + SECRET.encode(), "not a JSON envelope"),
       "envelope_not_base64": (None, "body is not base64"),
       "envelope_array": (b"[1, 2, 3]", "envelope is a JSON list"),
       "nul_envelope": (b"\x00\xff" * 100, "not a JSON envelope")}


def _envelope(headers: dict | None, content_type: str | None, body: bytes,
              encoded: str | None = None) -> bytes:
    """The JSON envelope kombu's Redis transport keeps in a list entry."""
    return json.dumps({
        "body": encoded or base64.b64encode(body).decode(), "content-encoding": "utf-8",
        "content-type": content_type, "headers": headers,
        "properties": {"delivery_tag": str(uuid.uuid4()), "body_encoding": "base64",
                       "priority": 0, "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "gpu"}}}).encode()


class Broker:
    """One broker's worker pair and the ways to poison its ``gpu`` queue."""

    def __init__(self, stack: Stack, kind: str) -> None:
        self.stack, self.kind = stack, kind
        stack.env["MOE_MAX_MESSAGE_MB"] = "1"
        self.gpu, self.librarian = stack.workers("gpu", "librarian")

    def push(self, poison: str) -> str:
        """Write one poison onto ``gpu``; returns the reason the worker must log."""
        if self.kind == "redis":
            import redis

            raw, reason = RAW.get(poison, (None, None))
            if reason is None:
                headers, ctype, body, reason = _kinds()[poison]
                raw = _envelope(headers, ctype, body)
            elif raw is None:
                raw = _envelope(*_kinds()["wrong_shape"][:3], encoded="!!" + SECRET + "*")
            redis.Redis.from_url(self.stack.env["CELERY_BROKER_URL"]).lpush(
                self.stack.prefix + "gpu", raw)  # the stack's own queue (MOE_REDIS_PREFIX)
            return reason
        import kombu

        headers, ctype, body, reason = _kinds()[poison]
        with kombu.Connection(self.stack.env["CELERY_BROKER_URL"]) as conn:
            channel = conn.default_channel
            channel.basic_publish(channel.prepare_message(
                body, 0, ctype, "utf-8" if ctype else None, headers, {}), exchange="",
                routing_key="gpu")
        return reason

    def dead(self) -> dict:
        """The newest record on ``moe.dead``, taken off it."""
        import kombu

        options = {"global_keyprefix": self.stack.prefix} if self.kind == "redis" else {}
        with kombu.Connection(self.stack.env["CELERY_BROKER_URL"],
                              transport_options=options) as conn:
            queue = conn.SimpleQueue(DEAD_QUEUE)
            message = queue.get(timeout=10)
            message.ack()
            queue.close()
            return message.payload


def _full_logs(stack: Stack) -> str:
    return "\n".join(log.read_text(errors="replace") for _, log in stack.procs)


def _refusals(stack: Stack) -> list[str]:
    return re.findall(r"refused a message on queue .*", _full_logs(stack))


def _rabbitmq_vhost() -> str:
    base = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
    if not _which("rabbitmqctl"):
        pytest.skip("no rabbitmqctl to make a vhost of this test's own")
    vhost = f"moe-poison-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], capture_output=True, timeout=60,
                   check=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*",
                    ".*"], capture_output=True, timeout=60, check=True)
    return f"{base}/{vhost}"


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def broker(request, tmp_path_factory, graph, redis_url):
    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials for worker processes")
    url = _rabbitmq_vhost() if request.param == "rabbitmq" else None
    stack = Stack(tmp_path_factory.mktemp(request.param), graph, redis_url, broker_url=url)
    try:
        yield Broker(stack, request.param)
    finally:
        stack.close()
        if url:
            subprocess.run(["rabbitmqctl", "delete_vhost", url.rsplit("/", 1)[1]],
                           capture_output=True, timeout=60)


POISONS = [*_kinds(), *RAW]


# The graph plays no part in refusing a message: the embedded backend alone (the queued stack
# on Neo4j is test_queue_workers' and test_stack's), which halves the module's worker starts.
@pytest.mark.backends("embedded")
@pytest.mark.parametrize("poison", POISONS)
def test_a_poison_message_is_refused_and_the_next_job_completes(broker, poison):
    if poison in RAW and broker.kind != "redis":
        pytest.skip("a Redis list entry's envelope: RabbitMQ frames every message itself")
    stack = broker.stack
    before = len(_refusals(stack))
    reason = broker.push(poison)
    deadline = time.monotonic() + 30
    while len(_refusals(stack)) == before:
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)
    job = jobs.submit(_items(6, seed=40 + POISONS.index(poison)), stack.settings(), 6)
    assert _wait(stack, job.job_id, timeout_s=60).status == "completed", stack.logs()
    assert broker.gpu.poll() is None and broker.librarian.poll() is None  # the same workers
    (line,) = _refusals(stack)[before:]  # one line, naming the queue and the reason
    assert line.startswith("refused a message on queue gpu: ") and reason in line, line
    assert line.endswith("dropped, a record kept on queue moe.dead"), line
    logs = _full_logs(stack)
    assert SECRET not in logs and "Traceback" not in logs
    record = broker.dead()
    assert record["queue"] == "gpu" and reason in record["reason"]
    assert 0 < len(base64.b64decode(record["head_b64"])) <= min(record["bytes"], 4096)
    assert not MARKER.exists()  # the pickle was never loaded
    with contextlib.suppress(FileNotFoundError):
        MARKER.unlink()
