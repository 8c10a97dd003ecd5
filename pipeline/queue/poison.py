"""What a worker refuses from its queues: the checks, pure functions of the bytes received.

Anyone who can write to the broker can put any bytes on a queue, and before these checks a
single such message stopped a worker: kombu's Redis transport decodes each message's JSON
envelope inside its event loop, so one non-JSON entry on the ``gpu`` list ended the GPU
worker (``Unrecoverable error: JSONDecodeError``) and every later job waited for ever. A
message is refused when:

1. (Redis) its envelope is not kombu's: not UTF-8 JSON, not an object, no ``properties``
   with a delivery tag and delivery info, or a base64 body that is not base64
   (`envelope`);
2. (both brokers) it is not one of our tasks as Celery sends them: larger than the limit
   (checked before anything is decoded), without protocol-2 headers (``task``, ``id``),
   naming a task the worker does not run, of a content type the app does not accept (pickle
   among them: refused by its type, never unpickled), a body that does not decode, or a
   body not shaped ``[args, kwargs, embed]`` with the fields its task reads (`message`).

Each check returns the reason as a short phrase (never the payload, which may hold anything)
or ``None``; `guard` logs the phrase in one line and dead-letters a bounded head of the bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Container
from typing import Any

from pipeline.queue import messages, wire
from pipeline.queue.app import CURATE_PART, ROUTE_BATCH

# The content types the app accepts (`app.make_app`), with the decoder of each.
DECODERS: dict[str, Callable[[str | bytes], Any]] = {wire.CONTENT_TYPE: wire.loads,
                                                     "application/json": json.loads}
# The fields each task reads from its one argument (a missing one fails it mid-task).
FIELDS = {ROUTE_BATCH: messages.BATCH_FIELDS, CURATE_PART: messages.PART_FIELDS}


def envelope(raw: bytes, limit: int) -> tuple[dict[str, Any] | None, str | None]:
    """Redis: ``(payload, None)`` for a kombu envelope kombu can turn into a message, else
    ``(None, reason)``. ``raw`` is the list entry as popped; ``limit`` is in bytes."""
    if len(raw) > limit:
        return None, f"{len(raw)} bytes, over the limit of {limit}"
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "not a JSON envelope"
    reason = envelope_shape(payload)
    return (None, reason) if reason else (payload, None)


def envelope_shape(payload: Any) -> str | None:
    """Why a decoded Redis envelope (a list entry, or a broadcast) is not one kombu can
    turn into a message, or ``None``."""
    if not isinstance(payload, dict):
        return f"envelope is a JSON {type(payload).__name__}, not an object"
    props = payload.get("properties")
    if not isinstance(props, dict) or not isinstance(props.get("delivery_tag"), str) \
            or not isinstance(props.get("delivery_info"), dict):
        return "envelope without properties, delivery tag or delivery info"
    body, encoding = payload.get("body"), props.get("body_encoding")
    if body is not None and not isinstance(body, str):
        return "envelope body is not a string"
    if encoding not in (None, "base64"):
        return "unknown body encoding"
    if encoding == "base64" and body:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not base64"
    for key in ("headers", "content-type", "content-encoding"):
        if payload.get(key) is not None and not isinstance(payload[key], dict if key ==
                                                           "headers" else str):
            return f"envelope {key} of the wrong type"
    return None


def message(headers: Any, content_type: str | None, body: bytes | str | None, limit: int,
            tasks: Container[str]) -> str | None:
    """Both brokers: why a delivered message is not a task this worker runs, or ``None``.

    ``tasks``: the names of the tasks the worker has registered."""
    size = len(body or b"")
    if size > limit:
        return f"body of {size} bytes, over the limit of {limit}"
    if not isinstance(headers, dict) or not isinstance(headers.get("task"), str) \
            or not isinstance(headers.get("id"), str):
        return "no task headers (task, id)"
    name = headers["task"]
    if name not in tasks:
        return f"unknown task {name[:80]!r}"
    if content_type not in DECODERS:
        return f"content type {str(content_type)[:80]!r} not accepted"
    try:
        decoded = DECODERS[content_type](body or b"")
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, binascii.Error):
        return f"body is not valid {content_type}"
    return _shape(name, decoded)


def _shape(name: str, decoded: Any) -> str | None:
    """Celery's protocol 2 body: ``[args, kwargs, embed]``; our tasks take one dict."""
    if not isinstance(decoded, list | tuple) or len(decoded) != 3 \
            or not isinstance(decoded[0], list | tuple) or not isinstance(decoded[1], dict):
        return "body is not [args, kwargs, embed]"
    fields = FIELDS.get(name)
    if fields is None:
        return None
    args = decoded[0]
    if len(args) != 1 or not isinstance(args[0], dict):
        return f"{name} takes one message object"
    missing = [f for f in fields if f not in args[0]]
    return f"{name} message without {', '.join(missing)}" if missing else None
