"""Run metadata on real SQLite and PostgreSQL: migrations, model round trips, alembic check."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from pipeline.storage.sql import (
    Batch,
    BatchMetrics,
    ItemError,
    Job,
    Run,
    alembic_config,
    make_engine,
    migrate,
    session_factory,
)

TABLES = {"runs", "jobs", "batches", "batch_metrics", "item_errors", "alembic_version"}


def test_migrations_create_the_schema_and_alembic_check_is_clean(sql_url):
    migrate(sql_url)
    engine = make_engine(sql_url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    command.check(alembic_config(sql_url))  # raises if models and migrations disagree
    migrate(sql_url)  # idempotent
    command.downgrade(alembic_config(sql_url), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate(sql_url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    engine.dispose()


def test_models_round_trip(sql_url):
    Session = session_factory(sql_url)
    with Session.begin() as s:
        run = Run(model_config={"num_experts": 8, "constellations": {"math": [0, 1]}},
                  code_version="0.1.0", device="cpu")
        job = Job(run=run, submitted_items=3)
        batch = Batch(job=job, index=0, item_ids=["a", "b", "c"],
                      timings={"encode": 0.1, "route": 0.2})
        batch.metrics = BatchMetrics(balance_loss=1.02, routing_entropy=1.5,
                                     expert_usage={"expert_0": 0.6, "expert_1": 0.4},
                                     reports=6, new_insights=4, merged=2, dedup_rate=1 / 3)
        s.add_all([run, job, batch,
                   ItemError(job=job, item_id="d", line=4, field="vector",
                             message="expected 384 values, got 3")])
        job_id = job.id
    with Session() as s:
        job = s.get(Job, job_id)
        assert job.status == "queued" and job.run.model_config["constellations"] == {
            "math": [0, 1]}
        (batch,) = job.batches
        assert batch.item_ids == ["a", "b", "c"] and batch.attempts == 0
        assert batch.timings["route"] == pytest.approx(0.2)
        assert batch.metrics.expert_usage == {"expert_0": 0.6, "expert_1": 0.4}
        (error,) = job.item_errors
        assert (error.item_id, error.line, error.field) == ("d", 4, "vector")
        assert s.scalars(select(Run.device)).one() == "cpu"


def test_a_job_cannot_have_two_batches_with_one_index(sql_url):
    Session = session_factory(sql_url)
    with Session.begin() as s:
        run = Run(model_config={}, code_version="0", device="cpu")
        job = Job(run=run, submitted_items=2)
        s.add_all([run, job, Batch(job=job, index=0, item_ids=["a"])])
        job_id = job.id
    with pytest.raises(IntegrityError), Session.begin() as s:
        s.add(Batch(job_id=job_id, index=0, item_ids=["b"]))
