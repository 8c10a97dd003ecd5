"""Leases in SQL, on SQLite and PostgreSQL: beats, lapses, and exactly one claim."""

from __future__ import annotations

import time

from pipeline import serving
from pipeline.inputs import read_items
from pipeline.queue.lease import Reaper
from pipeline.storage import leases, ledger
from pipeline.storage.leases import Lease
from pipeline.storage.sql import Batch, session_factory


def _one_batch(sql_url: str):
    Session = session_factory(sql_url)
    items, _ = read_items([{"id": f"l{i}", "vector": [1.0, float(i)]} for i in range(3)])
    job = ledger.create_job(Session, items, [], serving.default_config(), "queued", 10, "cpu")
    (batch_id, _), = job.batches
    return Session, batch_id


def test_a_silent_lease_lapses_and_exactly_one_claim_wins(sql_url):
    Session, batch_id = _one_batch(sql_url)
    lease = Lease(batch_id)
    assert not leases.beat(Session, lease, "tag-1")  # queued: nobody works on it yet
    assert ledger.begin_batch(Session, batch_id, "w1", "cpu", 3) == ("run", 1)
    assert leases.beat(Session, lease, "tag-1")
    now = time.time()
    assert leases.lapsed(Session, 60, now=now) == []  # it just beat
    later = now + 120
    (gone,) = leases.lapsed(Session, 60, now=later)
    assert (gone.lease, gone.delivery, gone.worker, gone.requeues) == (lease, "tag-1", "w1", 0)
    assert gone.silent_s >= 119
    # Two workers see it at once: one claim wins, and the lease is no longer lapsed.
    assert leases.claim(Session, gone, 60, now=later)
    assert not leases.claim(Session, gone, 60, now=later)
    assert leases.lapsed(Session, 60, now=later) == []
    with Session() as s:
        assert s.get(Batch, batch_id).requeues == 1
    # The requeued message's delivery counts an attempt like any other.
    assert ledger.begin_batch(Session, batch_id, "w2", "cpu", 3) == ("run", 2)


def test_a_lease_that_beats_again_is_not_claimed(sql_url):
    Session, batch_id = _one_batch(sql_url)
    lease = Lease(batch_id)
    ledger.begin_batch(Session, batch_id, "w1", "cpu", 3)
    leases.beat(Session, lease, "tag-1")
    (gone,) = leases.lapsed(Session, 60, now=time.time() + 120)
    leases.beat(Session, lease, "tag-1")  # its worker was only slow, and speaks again
    assert not leases.claim(Session, gone, 60, now=time.time())


def test_a_lapsed_lease_whose_message_is_not_held_is_left_alone(sql_url, redis_url,
                                                                 redis_prefix):
    """Its message is back in the queue (or acknowledged): neither counted nor failed, so
    work that only waits for a worker is never given up on."""
    from pipeline.queue.app import make_app
    from pipeline.settings import Settings

    Session, batch_id = _one_batch(sql_url)
    ledger.begin_batch(Session, batch_id, "w1", "cpu", 3)
    leases.beat(Session, Lease(batch_id), "tag-not-in-redis")
    with Session.begin() as s:
        s.get(Batch, batch_id).heartbeat_at = time.time() - 600
    reaper = Reaper(make_app(Settings(celery_broker_url=redis_url, redis_prefix=redis_prefix)),
                    Session, timeout_s=60)
    for _ in range(5):
        assert reaper.sweep() == []
    with Session() as s:
        batch = s.get(Batch, batch_id)
        assert (batch.status, batch.requeues) == ("running", 0)
