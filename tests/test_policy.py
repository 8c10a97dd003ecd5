"""What an outage is, decided in one place (`pipeline.errors.Outage`, `outage_errors`), and
read by every retry decision: the queue's policy, the in-process run, per-item isolation."""

from __future__ import annotations

import pytest
import sqlalchemy.exc

from pipeline.errors import Outage, PipelineError, is_outage, outage_errors
from pipeline.isolation import isolate
from pipeline.queue import policy
from pipeline.storage.graph import GraphUnavailable
from pipeline.storage.locks import LockTimeout


def test_every_outage_is_one_class_and_the_queue_retries_exactly_those():
    assert issubclass(GraphUnavailable, Outage) and issubclass(LockTimeout, Outage)
    assert issubclass(Outage, PipelineError)  # still one clear line at the CLI
    assert policy.transient_errors() == outage_errors()
    sql_down = sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError())
    assert is_outage(sql_down) and is_outage(LockTimeout("s", 1.0))
    assert not is_outage(PipelineError("bad input")) and not is_outage(ValueError("x"))
    # The jitter is backoff's own: no setting that nothing reads.
    assert "retry_jitter" not in policy.RETRY
    waits = [policy.backoff(3) for _ in range(200)]
    assert min(waits) >= 8.0 and max(waits) <= 16.0 and len(set(waits)) > 100


@pytest.mark.parametrize("outage", [
    sqlalchemy.exc.OperationalError("UPDATE batches", {}, ConnectionRefusedError()),
    ConnectionResetError("broker gone"), GraphUnavailable("bolt://x", "refused")])
def test_isolation_never_blames_an_item_for_an_outage(outage):
    """The graph or SQL drops while a batch is curated, and again while one item is tried
    alone: the outage propagates at once (to be retried), no item is recorded as bad."""
    calls: list[list[str]] = []

    def work(items: list[str]) -> int:
        calls.append(items)
        if len(items) > 1 or items == ["b"]:
            raise outage
        return len(items)

    with pytest.raises(type(outage)):
        isolate(work, ["a", "b", "c"], (Exception,))
    assert calls == [["a", "b", "c"]]
