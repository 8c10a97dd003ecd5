"""The Celery app: queues, message format, delivery guarantees, per-process resources.

Delivery: tasks are acknowledged after they finish (``acks_late``), a task whose pool process
dies is requeued at once (``task_reject_on_worker_lost``), and a worker reserves one message
at a time (prefetch 1), so a death loses nothing and holds nothing back. With the Redis broker
a message taken by a worker that dies *whole* comes back after ``visibility_timeout``
(`Settings.visibility_timeout_s`, one hour by default: far above a batch's seconds, so a batch
still running is never handed out twice; the price is that hour of delay after such a death).
Redelivered work is recognised in SQL (`pipeline.jobs`) and rewrites the same graph rows
(deterministic ids), so the graph ends as if each batch ran once.

Messages are ``moe-json`` (`wire.py`): JSON with arrays as base64 binary; pickle is refused.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from pipeline.config import Settings
from pipeline.workers import wire

GPU_QUEUE, QUERY_QUEUE, LIBRARIAN_PREFIX = "gpu", "query", "librarian."
ROUTE_BATCH, CURATE_PART, SIMILAR = "pipeline.route_batch", "pipeline.curate_part", \
    "pipeline.similar"

# What this process serves: set by `moe-pipeline worker KIND` before the worker starts, and
# inherited by its pool processes, whose start-up loads that kind's resources once.
ROLE: dict[str, Any] = {"kind": None}


def librarian_queue(shard: str) -> str:
    return LIBRARIAN_PREFIX + shard


def result_backend(settings: Settings) -> str:
    """Where query answers go back: Redis (the broker's, if it is Redis), else RPC."""
    url = settings.broker_url()
    if settings.redis_url:
        return settings.redis_url
    return url if url.startswith(("redis://", "rediss://")) else "rpc://"


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    wire.register()
    app = Celery("moe_pipeline", broker=settings.broker_url(),
                 backend=result_backend(settings),
                 include=["pipeline.workers.gpu", "pipeline.workers.librarian",
                          "pipeline.workers.query"])
    vt = float(settings.visibility_timeout_s)
    app.conf.update(
        task_serializer=wire.NAME, result_serializer=wire.NAME,
        accept_content=[wire.NAME], result_accept_content=[wire.NAME],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # failures are recorded in SQL, not redelivered
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # only `similar` answers (it sets ignore_result=False)
        result_expires=600,
        task_default_queue=GPU_QUEUE,
        task_routes={ROUTE_BATCH: {"queue": GPU_QUEUE}, SIMILAR: {"queue": QUERY_QUEUE}},
        broker_transport_options={
            "visibility_timeout": vt,
            # Sweep for messages of dead workers often enough for the timeout chosen.
            "unacked_restore_interval": max(1.0, min(10.0, vt / 4)),
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": vt},
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,  # for Flower
        task_send_sent_event=True,
    )
    return app


app = make_app()


class Resources:
    """What one worker process loads once: settings, SQL sessions, and the kind's own."""

    _instance: Resources | None = None

    def __init__(self) -> None:
        from pipeline.storage.sql import session_factory

        self.settings = Settings()
        # The schema is migrated by `submit` (and the stack's `migrate` service), not by
        # every worker process racing at start.
        self.Session = session_factory(self.settings.sql_url(), run_migrations=False)
        self._system = None
        self._graph = None
        self._librarians: dict[str, Any] = {}
        self._runs: set[str] = set()

    @classmethod
    def get(cls) -> Resources:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @property
    def device(self) -> str:
        return self.settings.torch_device()

    @property
    def system(self):
        if self._system is None:
            from pipeline.jobs import load_system

            self._system = load_system(self.settings, self.device)
        return self._system

    @property
    def graph(self):
        if self._graph is None:
            from pipeline.storage.local_graph import open_graph

            self._graph = open_graph(self.settings)
            self._graph.ensure_schema()
        return self._graph

    def librarian(self, config) -> Any:  # noqa: ANN001
        """One librarian per model shape (width, thresholds), its caches kept warm."""
        from pipeline.jobs import config_fingerprint
        from pipeline.librarian import Librarian
        from pipeline.locks import shard_locks

        key = config_fingerprint(config)
        if key not in self._librarians:
            self._librarians[key] = Librarian.from_config(
                self.graph, shard_locks(self.settings), config, run_id="",
                device=self.device)
        return self._librarians[key]

    def ensure_run(self, run_id: str, config) -> None:  # noqa: ANN001
        if run_id not in self._runs:
            from pipeline.jobs import constellation_map

            self.graph.ensure_run(run_id, config.to_dict(), constellation_map(config))
            self._runs.add(run_id)

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
        self.Session.kw["bind"].dispose()


@worker_process_init.connect
def _load_once(**_: Any) -> None:
    """In each pool process, after the fork: load the kind's model or graph up front, so
    the first task does not pay for it (and CUDA is first touched here, never in the
    parent that forks)."""
    Resources._instance = None  # never share a parent's connections across a fork
    kind = ROLE["kind"]
    if kind == "gpu":
        Resources.get().system  # noqa: B018 - load the model now
        if Resources.get().settings.text_model is not None:
            from pipeline.encoders import text_encoder

            text_encoder(Resources.get().settings.text_model, Resources.get().device)
    elif kind in ("librarian", "query"):
        Resources.get().graph  # noqa: B018 - connect now
        if kind == "query":
            Resources.get().system  # noqa: B018


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    if Resources._instance is not None:
        Resources._instance.close()


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors of an outage, not of the batch: the task is retried with backoff."""
    import kombu.exceptions
    import neo4j.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    from pipeline.locks import LockTimeout
    from pipeline.storage.graph import GraphUnavailable

    return (GraphUnavailable, LockTimeout, neo4j.exceptions.ServiceUnavailable,
            neo4j.exceptions.SessionExpired, neo4j.exceptions.TransientError,
            sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            kombu.exceptions.OperationalError, ConnectionError, TimeoutError)


RETRY = {"max_retries": 8, "retry_backoff": 2, "retry_backoff_max": 60, "retry_jitter": True}


def backoff(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: 2, 4, 8, ... at most 60 (with jitter)."""
    import random

    return random.uniform(0.5, 1.0) * min(RETRY["retry_backoff_max"],
                                          RETRY["retry_backoff"] * 2 ** retries)
