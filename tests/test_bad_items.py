"""Items that can never sink a job (issue 16): every strange item becomes a bad item naming
its line, id, field and the limit it broke, and the good items of its job and batch are all
in the graph afterwards, on SQLite, on PostgreSQL and through the Celery workers.

The fast tests check the validators and the per-item isolation with no server; the server
tests run one job each holding every kind at once.
"""

from __future__ import annotations

import codecs
import json
import math

import numpy as np
import pytest
from factories import graph_settings
from sqlalchemy import select

from pipeline import inputs, stages
from pipeline.errors import PipelineError
from pipeline.inputs import read_items
from pipeline.isolation import isolate
from pipeline.records import Item, storable
from pipeline.serving import default_config, load_system
from pipeline.settings import Settings
from pipeline.storage import ledger
from pipeline.storage.sql import BatchMetrics, ItemError, Job, session_factory

DIM = 16


def _vector(seed: int, dim: int = DIM) -> list[float]:
    # A seed of its own: the session's graph is shared, and another test's vectors drawn from
    # default_rng(seed) would otherwise merge with these (and these with theirs).
    return np.random.default_rng([seed, 16016]).standard_normal(dim).round(5).tolist()


def _line(obj: dict) -> bytes:
    """One JSONL line as a client would write it (``\\ud800`` and ``\\u0000`` escaped)."""
    return json.dumps(obj).encode()


def _deep(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


# (name, line bytes, field, words the reason must hold): every kind validation refuses.
REFUSED = [
    ("surrogate id", b'{"id": "\\ud800", "vector": %s}', "id", "lone surrogate (\\ud800"),
    ("surrogate text", b'{"id": "st", "text": "a \\udc00 b"}', "text", "lone surrogate"),
    ("NUL id", b'{"id": "a\\u0000b", "vector": %s}', "id", "NUL character"),
    ("NUL text", b'{"id": "nt", "text": "a\\u0000b"}', "text", "NUL character"),
    ("long id", b'{"id": "' + b"x" * 300 + b'", "vector": %s}', "id",
     "longer than 255 characters (300)"),
    ("deep meta", b'{"id": "dm", "vector": %s, "meta": ' + _deep(10_000).encode() + b"}",
     "line", "nested too deep to read (meta may nest 32 levels)"),
    ("meta past the limit", b'{"id": "dm33", "vector": %s, "meta": ' + _deep(33).encode()
     + b"}", "meta", "nested deeper than 32 levels"),
    ("400 digits", b'{"id": "d400", "vector": [' + b"9" * 400 + b", 1.0]}", "vector",
     "integer of 400 digits: it overflows float32"),
    ("5000 digits", b'{"id": "d5000", "vector": [' + b"9" * 5000 + b", 1.0]}", "vector",
     "integer of 5000 digits: it overflows float32"),
    ("past float32", b'{"id": "f39", "vector": [1e39, 1.0]}', "vector",
     "value 0 (1e+39) overflows float32"),
    ("long text", b'{"id": "lt", "text": "' + b"y" * 100_001 + b'"}', "text",
     "longer than 100000 characters"),
    ("narrow vector", b'{"id": "w3", "vector": [1, 2, 3]}', "vector",
     "expected 16 values, got 3 (the width most of this job's vectors have)"),
    ("boolean id", b'{"id": true, "vector": %s}', "id", "got a boolean"),
]


def _refused_lines() -> list[bytes]:
    return [raw.replace(b"%s", json.dumps(_vector(90 + k)).encode()) if b"%s" in raw else raw
            for k, (_, raw, _, _) in enumerate(REFUSED)]


# -- fast: the validators -------------------------------------------------------------------
@pytest.mark.parametrize("name, raw, field, reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_each_strange_line_is_a_bad_item_naming_field_and_limit(tmp_path, name, raw, field,
                                                                 reason):
    path = tmp_path / "items.jsonl"
    good = [_line({"id": f"g{i}", "vector": _vector(i)}) for i in range(3)]
    line = raw.replace(b"%s", json.dumps(_vector(9)).encode())
    path.write_bytes(b"\n".join([good[0], line, *good[1:]]))
    items, bad = read_items(path)
    assert [i.id for i in items] == ["g0", "g1", "g2"]
    assert len(bad) == 1 and (bad[0].line, bad[0].field) == (2, field), bad
    assert reason in bad[0].message, bad[0].message
    if field == "id":  # the id is kept, as it was, for the record (made storable there)
        assert bad[0].item_id is None or len(bad[0].item_id) > 0


def test_a_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b"\n".join(
        _line({"id": f"b{i}", "vector": _vector(i)}) for i in range(3)))
    items, bad = read_items(path)
    assert [i.id for i in items] == ["b0", "b1", "b2"] and bad == []


def test_a_line_past_the_limit_is_refused_without_being_held(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_LINE_BYTES", 64)
    path = tmp_path / "long.jsonl"
    path.write_bytes(b'{"id": "a", "vector": [1, 2]}\n{"id": "long", "text": "' + b"z" * 500
                     + b'"}\n{"id": "c", "vector": [3, 4]}\n')
    items, bad = read_items(path)
    assert [i.id for i in items] == ["a", "c"]
    assert [(b.line, b.field, b.message) for b in bad] == [(2, "line", "longer than 64 bytes")]


def test_python_dicts_get_the_same_checks():
    deep: dict = {}
    node = deep
    for _ in range(10_000):  # a Python dict 10,000 deep: refused, not recursed into
        node["a"] = node = {}
    items, bad = read_items([
        {"id": "ok", "vector": [1.0, 2.0]},
        {"id": "deep", "vector": [1.0, 2.0], "meta": deep},
        {"id": "huge", "vector": [10 ** 400, 1.0]},
        {"id": 10 ** 2000, "vector": [1.0, 2.0]},
        {"id": "np", "vector": [np.float64(1.5), 2.0]},  # a float subclass is a float
        {"id": "m", "vector": [1.0, 2.0], "meta": {"k": "\ud800"}},
        {"id": "m32", "vector": [1.0, 2.0], "meta": json.loads(_deep(32))},  # at the limit
    ])
    assert [i.id for i in items] == ["ok", "np", "m32"]
    assert {(b.item_id, b.field): b.message for b in bad} == {
        ("deep", "meta"): "nested deeper than 32 levels",
        ("huge", "vector"): "value 0 (an integer of about 401 digits) overflows float32 "
                            "(at most 3.403e+38)",
        (None, "id"): "longer than 255 characters",
        ("m", "meta"): "a string holds a lone surrogate (\\ud800 at position 0): not valid "
                       "Unicode"}


def test_values_at_the_float32_edge():
    largest = float(np.finfo(np.float32).max)
    items, bad = read_items([{"id": "edge", "vector": [largest, -largest]},
                             {"id": "e30", "vector": [1e30, 1.0]},  # finite as float32
                             {"id": "inf", "vector": [math.inf, 1.0]},
                             {"id": "over", "vector": [largest * 1.001, 1.0]}])
    assert [i.id for i in items] == ["edge", "e30"]
    assert {b.item_id: b.message for b in bad} == {
        "inf": "holds NaN or infinity (value 0)",
        "over": "value 0 (3.406e+38) overflows float32 (at most 3.403e+38)"}


def test_the_width_is_the_models_when_fixed_else_the_jobs_majority_not_line_one():
    raw = [{"id": "w3", "vector": [1.0, 2.0, 3.0]}] + [
        {"id": f"v{i}", "vector": _vector(i)} for i in range(19)]
    items, bad = read_items(raw)
    assert len(items) == 19 and [(b.item_id, b.message) for b in bad] == [
        ("w3", "expected 16 values, got 3 (the width most of this job's vectors have)")]
    items, bad = read_items(raw, dim=3)  # MOE_VECTOR_DIM=3: the model's width wins
    assert [i.id for i in items] == ["w3"] and len(bad) == 19
    assert bad[0].message == "expected 3 values, got 16 (the served model's vector width, " \
                             "MOE_VECTOR_DIM)"
    # ties go to the width seen first, and a duplicate id claims nothing when refused
    items, bad = read_items([{"id": "a", "vector": [1.0, 2.0]}, {"id": "a", "vector": [1.0]},
                             {"id": "b", "vector": [3.0]}, {"id": "c", "vector": [4.0, 5.0]}])
    assert [i.id for i in items] == ["a", "c"]
    assert [(b.item_id, b.field) for b in bad] == [("a", "vector"), ("b", "vector")]


def test_a_similar_vector_of_the_wrong_width_is_one_clear_error(tmp_path):
    settings = Settings(state_dir=tmp_path, device="cpu", vector_dim=DIM,
                        database_url=f"sqlite:///{tmp_path / 'runs.sqlite3'}")
    from pipeline.runtime import Runtime

    with Runtime.from_settings(settings) as rt:
        assert tuple(stages.query_input(rt, None, _vector(1)).shape) == (1, 384)
        with pytest.raises(PipelineError) as err:
            stages.query_input(rt, None, [1.0, 2.0, 3.0])
        assert str(err.value) == ("query: vector: expected 16 values, got 3 (the served "
                                  "model's vector width, MOE_VECTOR_DIM)")
        with pytest.raises(PipelineError, match=r"query: vector: value 0 \(an integer of "
                                                r"about 401 digits\) overflows float32"):
            stages.query_input(rt, None, [10 ** 400] + [1.0] * (DIM - 1))


def test_storable_escapes_and_cuts_what_no_store_takes():
    assert storable("a\x00b", 255) == "a\\x00b"
    assert storable("\ud800z", 255) == "\\ud800z"
    assert storable("x" * 300, 255) == "x" * 254 + "\u2026"
    assert storable("café", 255) == "café"
    for text in ("a\x00b", "\ud800" * 300, "é" * 400):
        out = storable(text, 255)
        assert len(out) <= 255 and "\x00" not in out and out.encode("utf-8")


# -- fast: per-item isolation ---------------------------------------------------------------
def test_isolation_costs_one_call_when_nothing_is_wrong_and_blames_only_the_culprit():
    calls: list[list[int]] = []

    def work(xs: list[int]) -> int:
        calls.append(xs)
        if 3 in xs:
            raise ValueError("three")
        return sum(xs)

    ok = isolate(work, [1, 2, 4])
    assert (ok.result, ok.kept, ok.failed, len(calls)) == (7, [1, 2, 4], [], 1)
    calls.clear()
    step = isolate(work, [1, 3, 4])
    assert (step.result, step.kept) == (5, [1, 4])
    assert [(x, str(e)) for x, e in step.failed] == [(3, "three")]
    with pytest.raises(ValueError, match="three"):  # no item works alone: not an item's fault
        isolate(work, [3, 3])
    with pytest.raises(ValueError):  # a batch of one is not blamed either
        isolate(work, [3])
    with pytest.raises(PipelineError):  # never an item's fault

        def broken(xs: list[int]) -> int:
            raise PipelineError("no encoder")

        isolate(broken, [1, 2])


@pytest.fixture(scope="module")
def system():
    return load_system(Settings(device="cpu", model_path=None), "cpu")


def test_an_item_too_large_for_the_model_fails_alone_and_the_figures_stay_finite(system):
    items = [Item(f"g{i}", i + 1, vector=_vector(i)) for i in range(9)]
    items.insert(4, Item("huge", 5, vector=[1e30] * DIM))  # finite as float32, not for the model
    settings = Settings(device="cpu")
    kept, x, bad = stages.encode_each(items, 384, settings, "cpu")
    assert len(kept) == 10 and bad == []
    routed, failed = stages.route_each(system, x, kept, "job")
    assert [(b.item_id, b.line, b.field) for b in failed] == [("huge", 5, "vector")]
    assert "NaN or infinite" in failed[0].message
    assert sorted({r.item_id for r in routed.reports}) == sorted(f"g{i}" for i in range(9))
    m = routed.metrics
    assert math.isfinite(m.balance_loss) and math.isfinite(m.routing_entropy)
    assert all(math.isfinite(u) for u in m.expert_usage.values())
    alone = stages.route(system, x[[i for i in range(10) if i != 4]],
                         [i for i in kept if i.id != "huge"], "job")
    assert [r.id for r in routed.reports] == [r.id for r in alone.reports]


def test_an_item_that_breaks_the_encoder_fails_alone(system):
    items = [Item("t0", 1, text="Primes have two divisors."), Item("bad", 2, text="a \ud800"),
             Item("t1", 3, text="Light enters the eye.")]  # past validation, by hand
    kept, x, bad = stages.encode_each(items, 384, Settings(device="cpu"), "cpu")
    assert [i.id for i in kept] == ["t0", "t1"] and tuple(x.shape) == (2, 384)
    assert [(b.item_id, b.field) for b in bad] == [("bad", "text")]
    assert bad[0].message.startswith("encode failed: TypeError")


# -- servers: one job of every kind, local on SQLite and PostgreSQL, and queued -------------
GOOD_VECTORS = 30
GOOD_TEXTS = 4
TEXTS = ["Integration by parts turns one integral into another.",
         "The retina turns light into signals.", "Grammar orders the words of a sentence.",
         "We forget what we never rehearse."]


def _job_file(path, prefix: str) -> tuple[list[str], dict[str, str]]:
    """A file of every kind of strange item among good ones (their ids unique to the test):
    the good ids, and the field of each bad one expected."""
    good = [_line({"id": f"{prefix}g{i}", "vector": _vector(i)}) for i in range(GOOD_VECTORS)]
    good += [_line({"id": f"{prefix}t{i}", "text": t}) for i, t in enumerate(TEXTS)]
    strange = _refused_lines() + [_line({"id": "huge", "vector": [1e30] * DIM})]
    lines: list[bytes] = []
    for k, line in enumerate(good):  # one strange line after every second good one
        lines.append(line)
        if k % 2 and strange:
            lines.append(strange.pop(0))
    lines += strange
    path.write_bytes(codecs.BOM_UTF8 + b"\n".join(lines) + b"\n")
    good_ids = [f"{prefix}g{i}" for i in range(GOOD_VECTORS)] + [
        f"{prefix}t{i}" for i in range(GOOD_TEXTS)]
    return good_ids, {**{name: field for name, _, field, _ in REFUSED}, "huge": "vector"}


def _check_job(Session, graph, job_id: str, good_ids: list[str], expected: dict[str, str]):
    with Session() as s:
        job = s.get(Job, job_id)
        assert job.status == "completed_with_errors", job.error
        assert all(b.status == "completed" for b in job.batches), [
            (b.status, b.error) for b in job.batches]
        errors = s.scalars(select(ItemError).where(ItemError.job_id == job_id)).all()
        metrics = s.scalars(select(BatchMetrics).where(BatchMetrics.batch_id.in_(
            [b.id for b in job.batches]))).all()
    assert len(errors) == len(expected), [(e.item_id, e.field, e.message) for e in errors]
    assert sorted(e.field for e in errors) == sorted(expected.values())
    by_id = {e.item_id: e for e in errors}
    assert by_id["\\ud800"].field == "id" and by_id["a\\x00b"].field == "id"
    assert by_id["x" * 254 + "\u2026"].message == "longer than 255 characters (300)"
    assert "NaN or infinite" in by_id["huge"].message
    assert all(e.line is not None for e in errors if e.item_id != "huge")
    assert all(m.balance_loss is not None and math.isfinite(m.balance_loss) for m in metrics)
    found = graph.run_cypher("MATCH (:Insight)-[e:SUPPORTED_BY]->(s:Source) "
                             "WHERE $job IN e.jobs RETURN DISTINCT s.id AS id", {"job": job_id})
    assert sorted(r["id"] for r in found) == sorted(good_ids)



@pytest.mark.deployments
def test_every_kind_in_one_local_job_keeps_every_good_item(tmp_path, graph, sql_url):
    from pipeline.jobs import run_local

    path = tmp_path / "strange.jsonl"
    good_ids, expected = _job_file(path, tmp_path.name)
    settings = graph_settings(tmp_path, graph, sql_url)
    summary = run_local(path, settings, batch_size=10)
    assert summary.status == "completed_with_errors"
    # Every bad item is counted, the one that failed alone inside its batch included.
    assert (summary.items, summary.bad_items) == (len(good_ids) + 1, len(expected))
    _check_job(session_factory(sql_url), graph, summary.job_id, good_ids, expected)


def test_non_finite_figures_are_recorded_as_null(sql_url):
    Session = session_factory(sql_url)
    items, _ = read_items([{"id": "a", "vector": [1.0, 2.0]}])
    job = ledger.create_job(Session, items, [], default_config(), "local", 4, "cpu")
    (batch_id, _), = job.batches
    ledger.begin_batch(Session, batch_id, "w", "cpu", 3)
    ledger.record_routing(Session, batch_id, ledger.RoutingMetrics(
        1, math.nan, math.inf, {"e0": math.nan, "e1": 0.5}), {}, {"route": 0.1})
    with Session() as s:
        m = s.get(BatchMetrics, batch_id)
        assert (m.balance_loss, m.routing_entropy, m.expert_usage) == (None, None,
                                                                       {"e0": None, "e1": 0.5})


def test_an_error_record_is_stored_whatever_the_item_held(sql_url):
    Session = session_factory(sql_url)
    items, bad = read_items([{"id": "ok", "vector": [1.0]},
                             {"id": "\ud800" * 300, "vector": []},
                             {"id": "a\x00" * 200, "text": ""}])
    job = ledger.create_job(Session, items, bad, default_config(), "local", 4, "cpu")
    ledger.record_item_errors(Session, job.job_id, bad)  # once each, however often recorded
    ledger.fail_job(Session, job.job_id, "stopped: \x00\ud800 " + "e" * 5000)
    with Session() as s:
        errors = s.scalars(select(ItemError).where(ItemError.job_id == job.job_id)).all()
        assert len(errors) == 2
        assert all(len(e.item_id) <= 255 and e.item_id.endswith("\u2026") for e in errors)
        assert s.get(Job, job.job_id).error.startswith("stopped: \\x00\\ud800 eee")


@pytest.mark.deployments
def test_every_kind_in_one_queued_job_keeps_every_good_item(tmp_path, graph, sql_url,
                                                           redis_url):
    from test_queue_workers import Stack

    from pipeline import jobs

    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials for worker processes")
    path = tmp_path / "strange.jsonl"
    good_ids, expected = _job_file(path, tmp_path.name)
    stack = Stack(tmp_path, graph, redis_url)
    stack.env["DATABASE_URL"] = sql_url
    try:
        stack.workers("gpu", "librarian")
        job = jobs.submit(path, stack.settings(), batch_size=10)
        Session = session_factory(stack.settings().sql_url(), run_migrations=False)
        state = jobs.wait(Session, job.job_id, 120, poll_s=0.2)
        assert state.status == "completed_with_errors", stack.logs()
        _check_job(Session, graph, job.job_id, good_ids, expected)
    finally:
        stack.close()


def test_a_report_the_graph_refuses_fails_its_item_not_its_part(tmp_path, graph):
    """Curate isolation: a report whose text no driver can encode (one that got past
    validation, made here by hand) fails alone; its part's other reports are written."""
    import dataclasses

    from pipeline.records import ShardPart
    from pipeline.runtime import Runtime

    settings = graph_settings(tmp_path, graph, f"sqlite:///{tmp_path / 'runs.sqlite3'}")
    prefix = tmp_path.name
    items, _ = read_items([{"id": f"{prefix}c{i}", "vector": _vector(200 + i)}
                           for i in range(12)])
    with Runtime.from_settings(settings) as rt:
        job = ledger.create_job(rt.Session, items, [], rt.config, "local", 12, "cpu")
        (batch_id, chunk), = job.batches
        x = stages.encode(chunk, rt.config.input_dim)
        reports = stages.route(rt.system, x, chunk, job.job_id).reports
        shard, group = max(stages.by_shard(reports).items(), key=lambda kv: len(kv[1]))
        assert len(group) >= 3
        group[1] = dataclasses.replace(group[1], text="refused \ud800")
        ledger.begin_batch(rt.Session, batch_id, "w", "cpu", 3)
        ledger.record_routing(rt.Session, batch_id, ledger.RoutingMetrics(
            len(group), 0.0, 0.0, {}), {shard: len(group)}, {})
        ledger.mark_routed(rt.Session, batch_id)
        done = stages.curate_part(rt, ShardPart(batch_id, job.run_id, shard, group,
                                                rt.fingerprint))
        assert done["status"] == "done" and done["inserted"] + done["merged"] == len(group) - 1
        with rt.Session() as s:
            errors = s.scalars(select(ItemError).where(ItemError.job_id == job.job_id)).all()
            assert [(e.item_id, e.field) for e in errors] == [(group[1].item_id, "text")]
            assert errors[0].message.startswith("curate failed: ")
            assert s.get(Job, job.job_id).status == "completed_with_errors"
    found = graph.run_cypher("MATCH (:Insight)-[e:SUPPORTED_BY]->(s:Source) "
                             "WHERE $job IN e.jobs RETURN DISTINCT s.id AS id",
                             {"job": job.job_id})
    assert sorted(r["id"] for r in found) == sorted(r.item_id for r in group
                                                    if r is not group[1])
