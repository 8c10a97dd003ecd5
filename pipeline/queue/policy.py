"""The queue's error policy: what is retried, what fails the work, what is never lost.

An outage (the graph, SQL, Redis or the broker unreachable; a shard lock not acquired) is not
the work's fault: the delivery gives back its attempt and the task is retried with backoff
and jitter, for about half an hour, before the work is failed with its cause. The work's own
fault (`PipelineError`: bad input, a model mismatch) fails it at once and the job goes on.
Anything else fails it with the error's type and is re-raised for the worker's log.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from celery.exceptions import Reject, Retry

from pipeline.errors import PipelineError, outage_errors
from pipeline.redact import redacted

log = logging.getLogger(__name__)


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors of an outage, not of the batch (`errors.outage_errors`, the one definition):
    the task is retried with backoff."""
    return outage_errors()


# An outage is retried for about half an hour (2 s doubling to 60 s between tries) before
# the batch is failed with its cause; it never counts as an attempt of the batch. The
# jitter is `backoff`'s own (always on), so there is no switch for it here.
RETRY = {"max_retries": 32, "retry_backoff": 2, "retry_backoff_max": 60}


def retry_or_requeue(task, err: BaseException) -> BaseException:
    """The exception a task raises to be tried again after an outage: Celery's Retry (a new
    message, counted down), or, when even that cannot be published, a Reject that leaves
    the message to come back (never an ack that would lose it)."""
    try:
        return task.retry(exc=err, countdown=backoff(task.request.retries),
                          max_retries=RETRY["max_retries"])
    except Retry as retry:
        return retry
    except Exception:  # the broker is down too
        return Reject(err, requeue=True)


def guarded(task: Any, work: Callable[[Callable[[int], None]], dict[str, Any]],
            release: Callable[[int], None], fail: Callable[[str], None]) -> dict[str, Any]:
    """Run a task's ``work(on_attempt)`` under the policy of this module.

    ``work`` reports the attempt its delivery counted through ``on_attempt(n)``; after an
    outage that attempt is given back (``release(n)``) and the task retried, failing the work
    (``fail(message)``) only when the retries run out.
    """
    attempt = [0]

    def on_attempt(n: int) -> None:
        attempt[0] = n

    try:
        return work(on_attempt)
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


def best_effort(fn, *args: Any) -> None:
    """Bookkeeping that must not hide the error being handled (SQL may be the outage)."""
    try:
        fn(*args)
    except Exception as err:
        log.warning("%s failed: %s", getattr(fn, "__name__", fn), redacted(str(err)))


def backoff(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: 2, 4, 8, ... at most 60 (with jitter)."""
    return random.uniform(0.5, 1.0) * min(RETRY["retry_backoff_max"],
                                          RETRY["retry_backoff"] * 2 ** retries)
