"""A Celery worker of one kind, and the one `Runtime` of each of its pool processes.

`serve(settings, kind, ...)` starts the worker: ``gpu`` (queue ``gpu``), ``librarian``
(``librarian.<shard>`` for the given shards) or ``query``. Pools are prefork: each pool
process builds its runtime after the fork and loads what its kind needs up front (the model
and the text encoder for ``gpu``, the graph for ``librarian``, both for ``query``), so the
first task does not pay for it and CUDA is first touched in the child, never in the parent
that forks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from pipeline.encoders import EncoderUnavailable, text_encoder
from pipeline.queue.app import GPU_QUEUE, QUERY_QUEUE, librarian_queue, make_app, queue_safe
from pipeline.queue.policy import transient_errors
from pipeline.redact import redacted
from pipeline.runtime import Runtime
from pipeline.settings import Settings

KINDS = ("gpu", "librarian", "query")
log = logging.getLogger(__name__)

# This process's worker: set by `serve` before the pool forks (the children inherit it), and
# the pool process's runtime, built after the fork.
_PROCESS: dict[str, Any] = {"settings": None, "kind": None, "runtime": None, "reaper": None}


def queues(kind: str, shards: Sequence[str]) -> list[str]:
    """The queues a worker of ``kind`` consumes (a librarian: one per shard)."""
    if kind == "librarian":
        return [librarian_queue(s) for s in shards]
    return [GPU_QUEUE if kind == "gpu" else QUERY_QUEUE]


def shard_names(values: Sequence[str], known: Sequence[str]) -> list[str]:
    """The shards that ``--shards`` values name, in order, each once.

    A value is a comma-separated list of constellation labels or their queue-safe names
    (`app.queue_safe`). A label may itself hold commas: the longest run of comma-separated
    pieces that is a ``known`` label is taken whole, so with the labels "biology, chemistry"
    and "physics" the value ``"biology, chemistry,physics"`` names those two. A piece that
    names nothing known is taken as a label as it stands (a shard of another model).
    """
    lookup = {k.strip(): k for k in known} | {queue_safe(k): k for k in known}
    found: list[str] = []
    for value in values:
        pieces, i = value.split(","), 0
        while i < len(pieces):
            for j in range(len(pieces), i, -1):
                text = ",".join(pieces[i:j]).strip()
                if text in lookup:
                    found.append(lookup[text])
                    i = j
                    break
            else:
                found.append(pieces[i].strip())
                i += 1
    return list(dict.fromkeys(n for n in found if n))


def serve(settings: Settings, kind: str, shards: Sequence[str], concurrency: int = 1,
          loglevel: str = "INFO", name: str | None = None,
          extra: Sequence[str] = ()) -> None:
    """Run the worker until it is stopped."""
    _PROCESS.update(settings=settings, kind=kind, runtime=None, reaper=None)
    argv = ["worker", "-Q", ",".join(queues(kind, shards)), "-P", "prefork",
            "-c", str(concurrency), "--prefetch-multiplier", "1",
            "-n", name or f"{kind}-{os.getpid()}@%h", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle", *extra]
    make_app(settings).worker_main(argv)


def pool_device(settings: Settings) -> str:
    """The settings' device; with ``auto`` and several GPUs, pool process i takes GPU
    i mod count, so ``--concurrency N`` spreads N processes over the GPUs."""
    device = settings.torch_device()
    if device == "cuda" and settings.device == "auto":
        import billiard
        import torch

        index = getattr(billiard.current_process(), "index", 0) or 0  # 0-based in a pool
        device = f"cuda:{index % max(torch.cuda.device_count(), 1)}"
    return device


def runtime() -> Runtime:
    """This pool process's runtime (built on first use). A worker started by ``celery -A``
    rather than `serve` reads its settings here: the pool process is then the entry point."""
    if _PROCESS["runtime"] is None:
        settings = _PROCESS["settings"] or Settings()
        # The schema was migrated by the worker's main process (`_migrate`), not by every
        # pool process at start.
        _PROCESS["runtime"] = Runtime.from_settings(settings, device=pool_device(settings),
                                                    migrate=False)
    return _PROCESS["runtime"]


@worker_init.connect
def _migrate(**_: Any) -> None:
    """The worker's main process brings the SQL schema to head before its pool starts (one
    process at a time, `sql.migrate`): a worker started on an empty database would
    otherwise fail every task on a missing table until the first `submit` migrated it."""
    from pipeline.storage.sql import migrate

    settings = _PROCESS["settings"] or Settings()
    try:
        migrate(settings.sql_url())
    except transient_errors() as err:  # down at start: the tasks retry it, as any outage
        log.warning("SQL database not reachable at start, not migrated: %s",
                    redacted(str(err)).splitlines()[0])


@worker_process_init.connect
def _load_once(**_: Any) -> None:
    _PROCESS["runtime"] = None  # never share a parent's connections across a fork
    kind = _PROCESS["kind"]
    if kind == "gpu":
        rt = runtime()
        rt.system  # noqa: B018 - load the model now
        # The encoder too, when it is installed (text batches then pay nothing extra);
        # without it the worker serves vectors and a text batch fails with the reason.
        with contextlib.suppress(EncoderUnavailable):
            text_encoder(rt.settings.text_model, rt.device)
    elif kind in ("librarian", "query"):
        # Down at start: the first task connects, or retries the outage like any other.
        try:
            runtime().graph  # noqa: B018 - connect now
        except transient_errors() as err:
            log.warning("graph not reachable at start: %s", redacted(str(err)))
        if kind == "query":
            runtime().system  # noqa: B018


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    if _PROCESS["runtime"] is not None:
        _PROCESS["runtime"].close()


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    """The worker's main process requeues lapsed leases (`pipeline.queue.lease`): on the
    Redis broker only, where a dead worker's message would otherwise wait for the
    visibility timeout."""
    from pipeline.queue.lease import Reaper, is_redis
    from pipeline.storage.sql import session_factory

    settings = _PROCESS["settings"] or Settings()
    app = sender.app if sender is not None else make_app(settings)
    if not is_redis(app):
        return
    Session = session_factory(settings.sql_url(), run_migrations=False, pooled=False)
    reaper = Reaper(app, Session, settings.lease_timeout_s)
    reaper.start()
    _PROCESS["reaper"] = reaper


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _PROCESS["reaper"] is not None:
        _PROCESS["reaper"].stop()
