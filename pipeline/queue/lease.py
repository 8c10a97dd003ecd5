"""Leases on the Redis broker: a task beats while it works; every worker requeues the lapsed.

Redis hands an unacknowledged message back only after its visibility timeout (an hour by
default, because it must exceed the longest batch). A worker that dies whole would hold its
batch that long. Instead each task, while it runs, writes a heartbeat to its SQL row from a
thread (`beating`); each worker's main process looks every quarter of the lease timeout for
working rows whose heartbeat is older than the timeout (`Reaper`), claims one (exactly one
worker wins, see `storage.leases.claim`) and moves its message from Redis's unacked set back
to the head of its queue, as Redis itself would after the visibility timeout. Work comes back
within about ``lease_timeout_s`` (a minute by default) of the death, or of the first worker to
start afterwards. Only a message still in the unacked set is handed back: one already back in
its queue is waiting for a worker and is left alone.

Heartbeats are stamped with the worker's clock and read with the reaper's: the hosts' clocks
must agree to well within the lease (NTP does; a minute is the default lease).

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
from pipeline.storage import leases
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
    except Exception as err:  # an outage; the task meets it itself
        log.debug("lease of %s not recorded: %s", lease, redacted(str(err)))

    def run() -> None:
        while not stop.wait(every):
            try:
                leases.beat(Session, lease, delivery)
            except Exception as err:  # an outage; the task meets it itself
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

    def __init__(self, app: Celery, Session: sessionmaker, timeout_s: float) -> None:
        self.app, self.Session, self.timeout_s = app, Session, timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[Lease]:
        """Hand back to the broker the message of every lapsed lease that is still held in
        Redis's unacked set; returns the leases this call handed back.

        A lapsed lease whose message is *not* in the unacked set is left alone: its message
        is already back in the queue (handed back earlier, or by the visibility timeout) and
        waits for a worker, or it was acknowledged by a delivery that finished. Counting it
        again would fail work that is only waiting. Giving up on work that kills every
        worker is the redelivery's business (`ledger.begin_batch` counts the attempts)."""
        requeued = []
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            for item in leases.lapsed(self.Session, self.timeout_s):
                with channel.conn_or_acquire() as client:
                    # kombu's prefixing client leaves HEXISTS alone: prefix it here.
                    held = client.hexists(channel.global_keyprefix + channel.unacked_key,
                                          item.delivery)
                if not held or not leases.claim(self.Session, item, self.timeout_s):
                    continue  # waiting in its queue, done, or another worker took it
                channel.qos.restore_by_tag(item.delivery, leftmost=True)
                log.warning("%s: worker %s silent for %.0f s, its message handed back to the "
                            "broker (requeue %d)", item.lease, item.worker, item.silent_s,
                            item.requeues + 1)
                requeued.append(item.lease)
        return requeued

    def _run(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception as err:  # SQL or Redis down: look again later
                log.warning("lease sweep skipped: %s", redacted(str(err)))
            if self._stop.wait(self.timeout_s / 4):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
