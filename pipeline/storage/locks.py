"""Shard locks: one librarian at a time writes a shard.

In the stack the lock is Redis's (`RedisShardLock`: a token lease renewed by a heartbeat
while held, so a dead holder's lock expires within seconds); embedded, everything runs in
one process and a `threading.Lock` per shard does (`LocalShardLock`). Both are context
manager factories: ``with locks(shard):``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from pipeline.errors import Outage
from pipeline.settings import Settings


class LockTimeout(Outage):
    """A shard's lock was not acquired in time; names the shard."""

    def __init__(self, shard: str, seconds: float) -> None:
        self.shard = shard
        super().__init__(f"shard {shard!r}: lock not acquired within {seconds:.0f} s")


class LocalShardLock:
    """Per-shard locks for one process."""

    def __init__(self, wait_s: float = 600.0) -> None:
        self.wait_s = wait_s
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, shard: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(shard, threading.Lock())
        if not lock.acquire(timeout=self.wait_s):
            raise LockTimeout(shard, self.wait_s)
        try:
            yield
        finally:
            lock.release()


class RedisShardLock:
    """Per-shard locks shared by every process that reaches the same Redis.

    The lock is a lease of ``lease_s`` seconds that a heartbeat thread renews every third of
    it while the holder works: a long curate keeps its lock, and a holder that dies (SIGKILL,
    a lost machine) frees the shard within ``lease_s``. Should a stalled holder lose its
    lease anyway, the graph write's seq fence (`StaleWriteError`) still refuses a write
    decided on a stale view of the shard.
    """

    KEY = "moe:shard-lock:"  # after `Settings.redis_prefix`, before the shard's label

    def __init__(self, url: str, lease_s: float = 30.0, wait_s: float = 600.0,
                 prefix: str = KEY) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.lease_s, self.wait_s, self.prefix = lease_s, wait_s, prefix

    @contextlib.contextmanager
    def __call__(self, shard: str) -> Iterator[None]:
        # thread_local=False: the heartbeat thread renews with the token this thread took.
        lock = self.client.lock(self.prefix + shard, timeout=self.lease_s,
                                blocking_timeout=self.wait_s, thread_local=False)
        if not lock.acquire():
            raise LockTimeout(shard, self.wait_s)
        stop = threading.Event()
        beat = threading.Thread(target=self._renew, args=(lock, stop), daemon=True,
                                name=f"lease-{shard}")
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            with contextlib.suppress(Exception):  # an expired lease has nothing to release
                lock.release()

    def _renew(self, lock, stop: threading.Event) -> None:
        import logging

        while not stop.wait(self.lease_s / 3):
            try:
                lock.reacquire()  # the TTL back to lease_s, if the token is still ours
            except Exception as err:  # lost or unreachable: say so, stop
                logging.getLogger(__name__).warning("shard lock %s: lease not renewed (%s)",
                                                    lock.name, err)
                return


def lock_url(settings: Settings) -> str | None:
    """The Redis the shard locks live in: ``REDIS_URL``, else a Redis ``CELERY_BROKER_URL``
    (librarians sharing a Redis broker must share their locks too: in-process locks would
    let two of them write one shard at once), else none (one process: in-process locks)."""
    if settings.redis_url:
        return settings.redis_url
    broker = settings.celery_broker_url
    if broker and broker.startswith(("redis://", "rediss://")):
        return broker
    return None


def shard_locks(settings: Settings | None = None) -> LocalShardLock | RedisShardLock:
    """Redis locks where processes share a Redis (`lock_url`), in-process ones otherwise."""
    settings = settings or Settings()
    url = lock_url(settings)
    if not url:
        return LocalShardLock()
    return RedisShardLock(url, prefix=settings.redis_prefix + RedisShardLock.KEY)
