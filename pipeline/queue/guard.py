"""Where a worker catches a poison message, so that it keeps consuming whatever arrives.

Two places, because the two brokers fail at different depths:

- `RedisTransport`: kombu's Redis transport JSON-decodes each popped entry inside the worker's
  event loop, where an exception is fatal to the worker. Its channel here checks the bytes
  (`poison.envelope`) between the pop and the decode; this copies the few lines of kombu
  5.x's ``_brpop_read`` and ``_get`` that surround that decode (the queue tests hold it to
  the kombu installed).
- `GuardedConsumer` (Celery's ``worker_consumer``): on both brokers, a message that reached
  Celery is checked (`poison.message`) before Celery's own handling, which survives most
  poison but logs its payload, tracebacks, and for some shapes dies on a ``KeyError``.

A refused message is logged in one line (queue, reason, size: never the payload) and a record
of it (queue, reason, size, time, the first 4 KiB as base64) is published to the queue
``moe.dead`` on the same broker: a Redis list trimmed to the newest 1000, a RabbitMQ queue
declared with ``x-max-length`` 1000. The message itself is taken off its queue (acknowledged).
Dead-lettering is best effort: if it fails, the message is still dropped and the worker goes
on.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from celery.worker.consumer import Consumer
from kombu import Exchange, Queue
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from pipeline.queue import poison

log = logging.getLogger(__name__)

DEAD, DEAD_KEEP, DEAD_HEAD = "moe.dead", 1000, 4096
DEAD_QUEUE = Queue(DEAD, Exchange(""), routing_key=DEAD, durable=True,
                   queue_arguments={"x-max-length": DEAD_KEEP})


def _limit(options: dict[str, Any]) -> int:
    """The message size limit in bytes, from the broker transport options (`make_app`)."""
    return int(options.get("max_message_bytes") or 512 * 2**20)


def record(queue: str, reason: str, raw: bytes | str | None) -> dict[str, Any]:
    """What the dead-letter queue keeps of a refused message: a bounded head, not all."""
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw or b""
    return {"queue": queue, "reason": reason, "bytes": len(data), "at": time.time(),
            "head_b64": base64.b64encode(data[:DEAD_HEAD]).decode("ascii")}


def _refused(queue: str, reason: str, size: int, kept: bool) -> None:
    where = f"a record kept on queue {DEAD}" if kept else "not dead-lettered (see above)"
    log.error("refused a message on queue %s: %s (%d bytes); dropped, %s", queue, reason,
              size, where)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, checking each popped entry before kombu decodes it."""

    def _admit(self, queue: str, raw: bytes) -> dict[str, Any] | None:
        payload, reason = poison.envelope(raw, _limit(self.connection.client.transport_options))
        if reason is not None:
            _refused(queue, reason, len(raw), self.dead_letter(record(queue, reason, raw)))
        return payload

    def dead_letter(self, entry: dict[str, Any]) -> bool:
        """LPUSH a kombu envelope holding ``entry`` onto ``moe.dead`` and trim the list."""
        try:
            message = self.prepare_message(json.dumps(entry), content_type="application/json",
                                           content_encoding="utf-8")
            self._inplace_augment_message(message, "", DEAD)
            with self.conn_or_acquire() as client:
                # kombu's prefixing client prefixes LPUSH but not LTRIM: name the key whole.
                client.pipeline().lpush(DEAD, json.dumps(message)).ltrim(
                    self.global_keyprefix + DEAD, 0, DEAD_KEEP - 1).execute()
            return True
        except Exception as err:  # best effort: the drop must not fail
            log.warning("dead-lettering failed: %s", type(err).__name__)
            return False

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP",
                                                        **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._admit(dest, item)
            if payload is not None:
                self.connection._deliver(payload, dest)
            return True
        finally:
            # kombu declares `_in_poll = False`, then keeps the polling connection or None in
            # it (as its own `_brpop_read` does).
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.6
            if flush is not None:
                flush()

    def _deliver_fanout_message(self, message: Any, exchange: str) -> bool:
        """A broadcast (remote control) arrives decoded; kombu skips one that is not JSON
        but fails on JSON of another shape, so that is refused here (logged, not kept)."""
        reason = poison.envelope_shape(message)
        if reason is not None:
            log.error("refused a broadcast on exchange %s: %s; dropped", exchange, reason)
            return False
        return super()._deliver_fanout_message(message, exchange)

    # kombu's Redis channel, whose `_get` this replaces, takes no timeout either.
    def _get(self, queue: str) -> dict[str, Any]:  # type: ignore[override]
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while item := client.rpop(self._q_for_pri(queue, pri)):
                    self._maybe_update_queues_expire(client, queue)
                    payload = self._admit(queue, item)
                    if payload is not None:
                        return payload
            self._maybe_update_queues_expire(client, queue)
            raise kombu_redis.Empty()


class RedisTransport(kombu_redis.Transport):
    """The Redis transport with `Channel` (``broker_transport`` when the broker is Redis)."""

    Channel = Channel


class GuardedConsumer(Consumer):
    """Celery's consumer, refusing a poison message before Celery handles it."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        limit = _limit(self.app.conf.broker_transport_options or {})

        def on_task_received(message: Any) -> Any:
            reason = poison.message(message.headers, message.content_type, message.body,
                                    limit, self.strategies)
            if reason is None:
                return handle(message)
            queue = (message.delivery_info or {}).get("routing_key") or "?"
            kept = self._dead_letter(record(queue, reason, message.body))
            _refused(queue, reason, len(message.body or b""), kept)
            message.ack()
            return None

        return on_task_received

    def _dead_letter(self, entry: dict[str, Any]) -> bool:
        channel = getattr(self.connection, "default_channel", None)
        if isinstance(channel, Channel):  # Redis: one list, trimmed
            return channel.dead_letter(entry)
        try:
            with self.app.producer_or_acquire() as producer:
                producer.publish(entry, exchange="", routing_key=DEAD, serializer="json",
                                 declare=[DEAD_QUEUE], retry=False, delivery_mode=2)
            return True
        except Exception as err:  # best effort: the drop must not fail
            log.warning("dead-lettering failed: %s", type(err).__name__)
            return False
