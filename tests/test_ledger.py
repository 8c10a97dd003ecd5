"""The ledger: the SQL state machine of batches, parts and jobs, on real SQLite and
PostgreSQL.

Workers finish parts concurrently and can die between any two transactions; these tests
drive the transitions from many threads at once and from the states a crash leaves.
"""

from __future__ import annotations

import threading

from sqlalchemy import select, update

from pipeline.inputs import read_items
from pipeline.records import CurateResult, insight_id
from pipeline.serving import default_config
from pipeline.storage import ledger
from pipeline.storage.sql import Batch, BatchPart, Job, session_factory

SHARDS = [f"shard{i}" for i in range(6)]


def _routed(Session, n_batches: int = 1) -> ledger.NewJob:
    items, bad = read_items([{"id": f"i{i}", "vector": [float(i), 1.0]}
                             for i in range(4 * n_batches)])
    job = ledger.create_job(Session, items, bad, default_config(), "queued", 4, "cpu")
    routed = ledger.RoutingMetrics(0, 1.0, 0.5, {"expert_0": 1.0})
    for batch_id, _ in job.batches:
        assert ledger.begin_batch(Session, batch_id, "w", "cpu", 3) == ("run", 1)
        pending = ledger.record_routing(Session, batch_id, routed, dict.fromkeys(SHARDS, 2),
                                      {"route": 0.1})
        assert pending == SHARDS
        ledger.mark_dispatched(Session, batch_id, pending)
        ledger.mark_routed(Session, batch_id)
    return job


def _result(shard: str) -> CurateResult:
    """Two reports: one founds an insight, the other joins it."""
    founder = insight_id(shard, "r1")
    return CurateResult(shard, 2, 0, 1, 1, 0, {"r1": founder, "r2": founder})


def test_parts_finished_at_once_complete_batch_and_job_exactly_once(sql_url):
    Session = session_factory(sql_url)
    job = _routed(Session, n_batches=2)
    barrier = threading.Barrier(len(SHARDS) * 2)
    errors: list[BaseException] = []

    def finish(batch_id: str, shard: str) -> None:
        try:
            assert ledger.begin_part(Session, batch_id, shard, "w", 3)[0] == "run"
            barrier.wait(timeout=30)
            ledger.finish_part(Session, batch_id, shard, _result(shard), 0.01)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=finish, args=(batch_id, shard))
               for batch_id, _ in job.batches for shard in SHARDS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with Session() as s:
        assert s.get(Job, job.job_id).status == "completed"
        for batch_id, _ in job.batches:
            batch = s.get(Batch, batch_id)
            assert batch.status == "completed"
            assert (batch.metrics.new_insights, batch.metrics.merged) == (6, 6)
    # Completing again, from any number of callers, changes nothing and nobody "wins".
    wins: list[bool] = []
    batch_id = job.batches[0][0]
    threads = [threading.Thread(target=lambda: wins.append(
        ledger.try_complete_batch(Session, batch_id))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins == [False] * 8


def test_a_routed_batch_completes_exactly_once_when_raced(sql_url):
    Session = session_factory(sql_url)
    job = _routed(Session)
    batch_id = job.batches[0][0]
    with Session.begin() as s:  # every part done, as if the finishing worker died right after
        s.execute(update(BatchPart).where(BatchPart.batch_id == batch_id)
                  .values(status="done", new_insights=1, merged=1))
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def complete() -> None:
        barrier.wait(timeout=30)
        wins.append(ledger.try_complete_batch(Session, batch_id))

    threads = [threading.Thread(target=complete) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_a_redelivery_finishes_what_a_crash_left_between_two_steps(sql_url):
    Session = session_factory(sql_url)
    job = _routed(Session)
    batch_id = job.batches[0][0]
    with Session.begin() as s:  # parts done and committed; the worker died before settling
        s.execute(update(BatchPart).where(BatchPart.batch_id == batch_id)
                  .values(status="done"))
    with Session() as s:
        assert s.get(Batch, batch_id).status == "routed"
        assert s.get(Job, job.job_id).status == "running"
    # The GPU message comes back: it finds the batch routed, and settles batch and job.
    assert ledger.begin_batch(Session, batch_id, "w2", "cpu", 3)[0] == "done"
    with Session() as s:
        assert s.get(Batch, batch_id).status == "completed"
        assert s.get(Job, job.job_id).status == "completed"


def test_a_poison_part_fails_its_batch_and_the_job_ends(sql_url):
    Session = session_factory(sql_url)
    job = _routed(Session)
    batch_id = job.batches[0][0]
    for shard in SHARDS[1:]:
        ledger.begin_part(Session, batch_id, shard, "w", 2)
        ledger.finish_part(Session, batch_id, shard, _result(shard), 0.01)
    # SHARDS[0] kills its worker each time: two deliveries start and never finish.
    assert ledger.begin_part(Session, batch_id, SHARDS[0], "w", 2) == ("run", 1)
    assert ledger.begin_part(Session, batch_id, SHARDS[0], "w", 2) == ("run", 2)
    assert ledger.begin_part(Session, batch_id, SHARDS[0], "w", 2) == ("gave_up", 3)
    with Session() as s:
        batch = s.get(Batch, batch_id)
        assert batch.status == "failed" and "shard shard0: gave up after 2" in batch.error
        assert s.get(Job, job.job_id).status == "failed"


def test_an_outage_gives_back_only_its_own_attempt(sql_url):
    Session = session_factory(sql_url)
    items, _ = read_items([{"id": "a", "vector": [1.0, 2.0]}])
    job = ledger.create_job(Session, items, [], default_config(), "queued", 4, "cpu")
    batch_id = job.batches[0][0]
    assert ledger.begin_batch(Session, batch_id, "w", "cpu", 3) == ("run", 1)  # killed
    assert ledger.begin_batch(Session, batch_id, "w", "cpu", 3) == ("run", 2)  # outage
    ledger.release_batch(Session, batch_id, 2)
    ledger.release_batch(Session, batch_id, 2)  # twice: still only its own
    with Session() as s:
        assert s.scalar(select(Batch.attempts).where(Batch.id == batch_id)) == 1


def test_a_redelivered_routing_sends_only_undispatched_parts(sql_url):
    Session = session_factory(sql_url)
    items, _ = read_items([{"id": "a", "vector": [1.0, 2.0]}])
    job = ledger.create_job(Session, items, [], default_config(), "queued", 4, "cpu")
    batch_id = job.batches[0][0]
    routed = ledger.RoutingMetrics(0, 1.0, 0.5, {})
    ledger.begin_batch(Session, batch_id, "w", "cpu", 3)
    assert ledger.record_routing(Session, batch_id, routed, {"a": 1, "b": 1}, {}) == ["a", "b"]
    ledger.mark_dispatched(Session, batch_id, ["a"])  # died after sending a, before b
    assert ledger.begin_batch(Session, batch_id, "w", "cpu", 3) == ("run", 2)
    assert ledger.record_routing(Session, batch_id, routed, {"a": 1, "b": 1}, {}) == ["b"]


def test_a_run_row_keeps_only_what_curation_and_stats_read(sql_url):
    """The knowledge part and the constellations' expert names, not the whole config; a
    row of the old format (the whole flat config) still reads."""
    from dataclasses import asdict

    from pipeline.storage.sql import Run

    Session = session_factory(sql_url)
    config = default_config()
    job = _routed(Session)
    with Session() as s:
        stored = s.scalar(select(Run.model_config).where(Run.id == job.run_id))
    assert stored == {"knowledge": asdict(config.knowledge),
                      "constellations": config.system.constellation_map()}
    known = ledger.run_knowledge(Session, job.run_id)
    assert known.knowledge == config.knowledge
    assert known.constellations == config.system.constellation_map()
    with Session.begin() as s:  # a row written before the config had parts
        s.execute(update(Run).where(Run.id == job.run_id).values(
            model_config=config.to_dict()))
    assert ledger.run_knowledge(Session, job.run_id) == known
