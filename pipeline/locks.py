"""Shard locks: one librarian at a time writes a shard.

In the stack the lock is Redis's (`RedisShardLock`: a token lock with a timeout, so a dead
holder's lock expires); embedded, everything runs in one process and a `threading.Lock` per
shard does (`LocalShardLock`). Both are context managers factories: ``with locks(shard):``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from pipeline.config import Settings
from pipeline.errors import PipelineError


class LockTimeout(PipelineError):
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

    ``hold_s`` bounds how long a crashed holder blocks the shard: choose it above the longest
    curate (one graph transaction).
    """

    def __init__(self, url: str, hold_s: float = 300.0, wait_s: float = 600.0,
                 prefix: str = "moe:shard-lock:") -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.hold_s, self.wait_s, self.prefix = hold_s, wait_s, prefix

    @contextlib.contextmanager
    def __call__(self, shard: str) -> Iterator[None]:
        lock = self.client.lock(self.prefix + shard, timeout=self.hold_s,
                                blocking_timeout=self.wait_s)
        if not lock.acquire():
            raise LockTimeout(shard, self.wait_s)
        try:
            yield
        finally:
            lock.release()


def shard_locks(settings: Settings | None = None) -> LocalShardLock | RedisShardLock:
    """Redis locks when ``REDIS_URL`` is set (the stack), in-process ones otherwise."""
    settings = settings or Settings()
    return RedisShardLock(settings.redis_url) if settings.redis_url else LocalShardLock()
