"""The project's one exception tree.

Every error a user can cause derives from `PipelineError`; subclasses carry the ids a user
needs to find the culprit (the config field, the input's name), and the CLI turns any of them
into one clear line and a non-zero exit.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A configuration field holds a value outside what it allows.

    Attributes:
        field: the name of the offending field.
        value: the value that was given.
    """

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}={value!r} is invalid: expected {expected}")


class InputShapeError(PipelineError, ValueError):
    """A tensor handed to the model has the wrong shape or dtype.

    Attributes:
        name: the argument's name (``x``, ``token_ids``).
        shape: the shape that was given.
    """

    def __init__(self, name: str, shape: tuple[int, ...], expected: str) -> None:
        self.name = name
        self.shape = shape
        super().__init__(f"{name} has shape {shape}: expected {expected}")


class Outage(PipelineError):
    """A service the work needs did not answer (the graph, SQL, Redis, the broker) or a
    shard's lock was not acquired in time: not the work's fault, nor any item's.

    Every retry decision reads this one definition (`outage_errors`): the queue retries the
    task with backoff and gives back its attempt, an in-process run stops (resumable), and
    per-item isolation never blames an item for it.
    """


def outage_errors() -> tuple[type[BaseException], ...]:
    """`Outage` and the drivers' own errors of an outage (imported here, when first asked,
    so that this module stays importable without them)."""
    import kombu.exceptions
    import neo4j.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    return (Outage, neo4j.exceptions.ServiceUnavailable, neo4j.exceptions.SessionExpired,
            neo4j.exceptions.TransientError, sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError, redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError, kombu.exceptions.OperationalError,
            ConnectionError, TimeoutError)


def is_outage(err: BaseException) -> bool:
    return isinstance(err, outage_errors())
