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

import contextlib
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
        self._fingerprint: str | None = None
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
        """The settings' device; with ``auto`` and several GPUs, pool process i takes GPU
        i mod count, so ``--concurrency N`` spreads N processes over the GPUs."""
        device = self.settings.torch_device()
        if device == "cuda" and self.settings.device == "auto":
            import billiard
            import torch

            index = getattr(billiard.current_process(), "index", 0) or 0  # 0-based in a pool
            device = f"cuda:{index % max(torch.cuda.device_count(), 1)}"
        return device

    @property
    def fingerprint(self) -> str:
        from pipeline.jobs import model_fingerprint

        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.settings, self.system.config)
        return self._fingerprint

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

            graph = open_graph(self.settings)
            graph.ensure_schema()
            self._graph = graph  # only once the schema is known to be there
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
        res = Resources.get()
        res.system  # noqa: B018 - load the model now
        from pipeline.encoders import EncoderUnavailable, text_encoder

        # The encoder too, when it is installed (text batches then pay nothing extra);
        # without it the worker serves vectors and a text batch fails with the reason.
        with contextlib.suppress(EncoderUnavailable):
            text_encoder(res.settings.text_model, res.device)
    elif kind in ("librarian", "query"):
        # Down at start: the first task connects, or retries the outage like any other.
        try:
            Resources.get().graph  # noqa: B018 - connect now
        except transient_errors() as err:
            import logging

            logging.getLogger(__name__).warning("graph not reachable at start: %s", err)
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


# An outage is retried for about half an hour (2 s doubling to 60 s between tries) before
# the batch is failed with its cause; it never counts as an attempt of the batch.
RETRY = {"max_retries": 32, "retry_backoff": 2, "retry_backoff_max": 60, "retry_jitter": True}


def retry_or_requeue(task, err: BaseException) -> BaseException:  # noqa: ANN001
    """The exception a task raises to be tried again after an outage: Celery's Retry (a new
    message, counted down), or, when even that cannot be published, a Reject that leaves
    the message to come back (never an ack that would lose it)."""
    from celery.exceptions import Reject, Retry

    try:
        return task.retry(exc=err, countdown=backoff(task.request.retries),
                          max_retries=RETRY["max_retries"])
    except Retry as retry:
        return retry
    except Exception:  # noqa: BLE001 - the broker is down too
        return Reject(err, requeue=True)


def guarded(task, work, release, fail) -> dict[str, Any]:  # noqa: ANN001
    """Run a task's ``work(attempt)`` with the pipeline's error policy.

    An outage (`transient_errors`) gives back this delivery's attempt (``release(n)``, once
    ``work`` has set ``attempt[0]``) and retries with backoff, failing the work only when the
    retries run out; the work's own fault (`PipelineError`) fails it (``fail(message)``) and
    the job goes on; anything else fails it with the error's type and is re-raised for the
    worker's log.
    """
    from pipeline.errors import PipelineError

    attempt = [0]
    try:
        return work(attempt)
    except transient_errors() as err:
        if task.request.retries >= RETRY["max_retries"]:
            best_effort(fail, f"gave up after {task.request.retries} retries of an outage: "
                        f"{type(err).__name__}: {err}")
            raise
        if attempt[0]:
            best_effort(release, attempt[0])
        raise retry_or_requeue(task, err) from err
    except PipelineError as err:
        fail(str(err))
        return {"status": "failed", "error": str(err)}
    except Exception as err:
        best_effort(fail, f"{type(err).__name__}: {err}")
        raise


def best_effort(fn, *args: Any) -> None:  # noqa: ANN001
    """Bookkeeping that must not hide the error being handled (SQL may be the outage)."""
    import logging

    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001
        logging.getLogger(__name__).warning("%s failed: %s", getattr(fn, "__name__", fn),
                                            err)


def backoff(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: 2, 4, 8, ... at most 60 (with jitter)."""
    import random

    return random.uniform(0.5, 1.0) * min(RETRY["retry_backoff_max"],
                                          RETRY["retry_backoff"] * 2 ** retries)
