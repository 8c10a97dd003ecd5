"""The Celery app: queue and task names, message format, delivery guarantees.

Delivery: tasks are acknowledged after they finish (``acks_late``), a task whose pool process
dies is requeued at once (``task_reject_on_worker_lost``), and a worker reserves one message
at a time (prefetch 1), so a death loses nothing and holds nothing back. With the Redis broker
a message taken by a worker that dies *whole* comes back after ``visibility_timeout``
(`Settings.visibility_timeout_s`, one hour by default: far above a batch's seconds, so a batch
still running is never handed out twice; the price is that hour of delay after such a death).
Redelivered work is recognised in SQL (`pipeline.jobs`) and rewrites the same graph rows
(deterministic ids), so the graph ends as if each batch ran once.

Messages are ``moe-json`` (`wire.py`): JSON with arrays as base64 binary; pickle is refused.
Anything else that lands on a queue is refused in one line and dead-lettered to ``moe.dead``
(`poison.py` says what, `guard.py` where), so no bytes on a queue stop a worker.

The app is built by `make_app(settings)` where an entry point needs one (``submit``, the
worker command); ``celery -A pipeline.queue.app ...`` (the compose healthcheck, Flower) finds
it as this module's ``app``, built from the environment on first access.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from typing import Any

from celery import Celery

from pipeline.queue import wire
from pipeline.settings import Settings

GPU_QUEUE, QUERY_QUEUE, LIBRARIAN_PREFIX = "gpu", "query", "librarian."
ROUTE_BATCH, CURATE_PART, SIMILAR, FORGET = "pipeline.route_batch", "pipeline.curate_part", \
    "pipeline.similar", "pipeline.forget"


# A constellation's label is any text a user trained with ("biology, chemistry", "a/b"),
# but a queue name travels through places that split or reject characters: Celery's ``-Q``
# and the worker's ``--shards`` split on commas, AMQP caps names at 255 bytes, and a name
# is read by people in Flower and `status`. So a label made only of these characters is its
# own queue name (readable, and the queues of existing deployments keep their names); any
# other label becomes a readable slug plus a hash of the whole label. The hash keeps the
# mapping one to one where slugs collide ("a/b" and "a b" both slug to "a-b"); a safe label
# that itself looks like an encoded one is encoded too, so no two labels share a queue.
_SAFE = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_ENCODED = re.compile(r".*-[0-9a-f]{12}")


def queue_safe(label: str) -> str:
    """The queue-safe form of a constellation label: the label itself where it is plain,
    else ``<slug>-<12 hex of sha256(label)>`` (the slug: runs of other characters as one
    '-', at most 60 characters). Deterministic, so every process derives the same name."""
    if _SAFE.fullmatch(label) and not _ENCODED.fullmatch(label):
        return label
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-.")[:60].strip("-.")
    digest = hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{slug or 'x'}-{digest}"


def librarian_queue(shard: str) -> str:
    """The queue of a shard's librarian, whatever characters the shard's label holds."""
    return LIBRARIAN_PREFIX + queue_safe(shard)


def url_scheme(url: str) -> str:
    return url.split(":", 1)[0].lower()


def result_backend(settings: Settings) -> str:
    """Where query answers go back: Redis (the broker's, if it is Redis), else RPC."""
    url = settings.broker_url()
    if settings.redis_url:
        return settings.redis_url
    return url if url.startswith(("redis://", "rediss://")) else "rpc://"


def _redis_options(settings: Settings, url: str) -> dict[str, Any]:
    """Transport options of a Redis broker or result backend at ``url``: the deployment's
    key prefix (kombu's and Celery's ``global_keyprefix``), so its keys share a database
    with others' untouched."""
    if settings.redis_prefix and url_scheme(url) in ("redis", "rediss"):
        return {"global_keyprefix": settings.redis_prefix}
    return {}


def make_app(settings: Settings) -> Celery:
    """The Celery app for these settings; a worker imports the task module through it."""
    wire.register()
    app = Celery("moe_pipeline", broker=settings.broker_url(),
                 backend=result_backend(settings), include=["pipeline.queue.tasks"],
                 set_as_current=True)
    vt = float(settings.visibility_timeout_s)
    if url_scheme(settings.broker_url()) in ("redis", "rediss"):
        # kombu's Redis transport with a check of each entry before it is decoded: any
        # bytes pushed onto a queue are refused in one line, not fatal (`guard`).
        app.conf.broker_transport = "pipeline.queue.guard:RedisTransport"
        if url_scheme(settings.broker_url()) == "rediss":
            # Naming the transport skips kombu's own rediss:// set-up, which would not check
            # the server's certificate: here it is checked against the system's CAs, so a
            # TLS broker cannot be impersonated.
            app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    app.conf.update(
        # Both brokers: a message that is not one of our tasks is refused before Celery
        # handles it (`guard`, `poison`).
        worker_consumer="pipeline.queue.guard:GuardedConsumer",
        task_serializer=wire.NAME, result_serializer=wire.NAME,
        # moe-json for tasks; plain JSON too, for remote control from tools such as
        # Flower. Never pickle.
        accept_content=[wire.NAME, "json"], result_accept_content=[wire.NAME, "json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that fails has recorded its failure in SQL first (see the tasks).
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # A pool process loads its model on start (`_load_once`) before it reports up.
        worker_proc_alive_timeout=float(settings.worker_start_timeout_s),
        # A batch is cut off well before Redis would hand its message to another worker,
        # so one batch never runs twice at the same time; a cut-off batch is redelivered
        # (its pool process is replaced) and counts an attempt.
        task_soft_time_limit=0.8 * vt,
        task_time_limit=0.9 * vt,
        task_ignore_result=True,  # only `similar` and `forget` answer (ignore_result=False)
        result_expires=600,
        task_default_queue=GPU_QUEUE,
        task_routes={ROUTE_BATCH: {"queue": GPU_QUEUE}, SIMILAR: {"queue": QUERY_QUEUE},
                     FORGET: {"queue": QUERY_QUEUE}},
        broker_transport_options={
            "visibility_timeout": vt,
            # Sweep for messages of dead workers often enough for the timeout chosen.
            "unacked_restore_interval": max(1.0, min(10.0, vt / 4)),
            "unacked_restore_throttle": 1,
            # Read by `guard`: a larger message is refused before it is decoded.
            "max_message_bytes": int(settings.max_message_mb * 2**20),
            **_redis_options(settings, settings.broker_url()),
        },
        result_backend_transport_options={
            "visibility_timeout": vt, **_redis_options(settings, result_backend(settings))},
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,  # for Flower
        task_send_sent_event=True,
    )
    return app


_APP: dict[str, Celery] = {}


def __getattr__(name: str) -> Any:
    """``app``, for the ``celery -A pipeline.queue.app`` command line only (built once, on
    first access, from the environment: that command is this process's entry point)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if "app" not in _APP:
        _APP["app"] = make_app(Settings())
    return _APP["app"]


def ask(settings: Settings, task: str, message: dict[str, Any], timeout: float) -> Any:
    """Send ``task`` to the query workers and wait for its answer; a `PipelineError` (one
    line, the broker's password masked) when none comes or the broker fails. A worker's own
    `PipelineError` comes back as itself."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from pipeline.errors import PipelineError
    from pipeline.redact import masked

    try:
        # Not started by then, it is dropped: nobody waits for its answer any more.
        return make_app(settings).send_task(task, args=[message], expires=timeout).get(
            timeout=timeout)
    except CeleryTimeout as err:
        raise PipelineError(f"no answer from a query worker within {timeout:.0f} s; is "
                            "`moe-pipeline worker query` running? (not started, it was "
                            "withdrawn; started, it still finishes)") from err
    except PipelineError:
        raise
    except Exception as err:  # the broker, or the worker's own error, passed on
        raise PipelineError(f"{task.rsplit('.', 1)[-1]} via {masked(settings.broker_url())}: "
                            f"{type(err).__name__}: {err}") from err
