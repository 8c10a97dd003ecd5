"""Leases on the Redis broker: a task beats while it works; every worker requeues the lapsed.

Redis hands an unacknowledged message back only after its visibility timeout (an hour by
default, because it must exceed the longest batch). A worker that dies whole would hold its
batch that long. Instead each task, while it runs, writes a heartbeat to its SQL row from a
thread (`beating`); each worker's main process looks every quarter of the lease timeout for
working rows whose heartbeat is older than the timeout (`Reaper`), claims one (exactly one
worker wins, see `storage.leases.claim`) and moves its message from Redis's unacked set back
to the head of its queue, as Redis itself would after the visibility timeout. Work comes back
within about ``lease_timeout_s`` (a minute by default) of the death, or of the first worker to
start afterwards. A row requeued more than ``max_attempts`` times is failed with its reason, so
nothing waits forever on a message the broker no longer has.

RabbitMQ needs none of this: it redelivers a dead consumer's unacknowledged messages as soon
as the connection drops. The heartbeat is written there too (`status` shows it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from celery import Celery
from sqlalchemy.orm import sessionmaker

from pipeline.redact import redacted
from pipeline.storage import leases, ledger
from pipeline.storage.leases import Lease

log = logging.getLogger(__name__)


def heartbeat_every(timeout_s: float) -> float:
    return timeout_s / 6


@contextlib.contextmanager
def beating(Session: sessionmaker, lease: Lease, delivery: str | None,
            timeout_s: float) -> Iterator[None]:
    """Record the delivery on ``lease``'s row, then beat for it from a thread while the
    block runs. Until the first beat the row's claim time counts as its last word. A beat
    that fails (SQL down) is skipped: the next one tries again, and a lease lapses only
    after several missed in a row."""
    stop = threading.Event()
    every = heartbeat_every(timeout_s)
    try:
        leases.hold(Session, lease, delivery)
    except Exception as err:  # noqa: BLE001 - an outage; the task meets it itself
        log.debug("lease of %s not recorded: %s", lease, redacted(str(err)))

    def run() -> None:
        while not stop.wait(every):
            try:
                leases.beat(Session, lease, delivery)
            except Exception as err:  # noqa: BLE001 - an outage; the task meets it itself
                log.debug("heartbeat of %s skipped: %s", lease, redacted(str(err)))

    thread = threading.Thread(target=run, name=f"lease {lease}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def is_redis(app: Celery) -> bool:
    return app.conf.broker_url.split(":", 1)[0] in ("redis", "rediss")


class Reaper:
    """The requeuing loop of one worker's main process (Redis broker only)."""

    def __init__(self, app: Celery, Session: sessionmaker, timeout_s: float,
                 max_attempts: int) -> None:
        self.app, self.Session = app, Session
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[Lease]:
        """Requeue (or, past ``max_attempts`` requeues, fail) every lapsed lease; returns
        the leases this call requeued."""
        requeued = []
        for item in leases.lapsed(self.Session, self.timeout_s):
            if not leases.claim(self.Session, item, self.timeout_s):
                continue  # another worker took it, or its worker came back
            if item.requeues >= self.max_attempts:
                reason = (f"its worker ({item.worker}) went silent {item.requeues + 1} times "
                          "and its message was not seen again")
                if item.lease.shard is None:
                    ledger.fail_batch(self.Session, item.lease.batch_id, reason)
                else:
                    ledger.fail_part(self.Session, item.lease.batch_id, item.lease.shard,
                                     reason)
                continue
            with self.app.connection_for_write() as conn:
                conn.default_channel.qos.restore_by_tag(item.delivery, leftmost=True)
            log.warning("%s: worker %s silent for %.0f s, its message handed back to the "
                        "broker (requeue %d)", item.lease, item.worker, item.silent_s,
                        item.requeues + 1)
            requeued.append(item.lease)
        return requeued

    def _run(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception as err:  # noqa: BLE001 - SQL or Redis down: look again later
                log.warning("lease sweep skipped: %s", redacted(str(err)))
            if self._stop.wait(self.timeout_s / 4):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
