"""The queue's message format: JSON with arrays as base64 binary; nothing else accepted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.queue import wire
from pipeline.queue.app import make_app
from pipeline.queue.messages import batch_message, message_batch, message_part, part_message
from pipeline.records import DraftReport, Item, ItemBatch, ShardPart
from pipeline.settings import Settings


def test_arrays_round_trip_exactly_and_compactly():
    x = np.random.default_rng(0).standard_normal((256, 384)).astype(np.float32)
    msg = {"vectors": x, "half": torch.ones(3, 2, dtype=torch.float16), "n": np.int64(3)}
    back = wire.loads(wire.dumps(msg))
    assert back["vectors"].dtype == np.float32 and np.array_equal(back["vectors"], x)
    assert back["half"].dtype == np.float16 and back["half"].shape == (3, 2)
    assert back["n"] == 3
    text = len(json.dumps(x.tolist()))
    assert len(wire.dumps({"v": x})) < 0.35 * text  # base64 binary, not decimal text


def test_arrays_of_other_types_are_refused_on_arrival():
    with pytest.raises(ValueError, match="refusing an array of 'object'"):
        wire.loads('{"x": {"__array__": "object", "shape": [1], "b64": "AA=="}}')


def test_unsupported_values_are_refused_by_name():
    with pytest.raises(TypeError, match="object is not sent"):
        wire.dumps({"x": object()})
    with pytest.raises(TypeError, match="complex64"):
        wire.dumps({"x": np.zeros(2, np.complex64)})


def test_the_app_accepts_only_its_own_format_and_acks_late():
    app = make_app(Settings())
    assert app.conf.task_serializer == wire.NAME and app.conf.result_serializer == wire.NAME
    assert set(app.conf.accept_content) == {wire.NAME, "json"}  # json: remote control only
    assert "pickle" not in app.conf.result_accept_content
    assert app.conf.task_time_limit < app.conf.broker_transport_options["visibility_timeout"]
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1


def test_batch_and_report_messages_round_trip():
    items = [Item("a", 1, vector=[1.0, 2.0]), Item("b", 2, text="hello"),
             Item("c", 3, vector=[3.0, 4.0])]
    batch = message_batch(wire.loads(wire.dumps(batch_message(
        ItemBatch("B", "J", "R", "F", items)))))
    assert (batch.batch_id, batch.job_id, batch.run_id, batch.model) == ("B", "J", "R", "F")
    back = batch.items
    assert [(i.id, i.text) for i in back] == [("a", None), ("b", "hello"), ("c", None)]
    assert [i.line for i in back] == [1, 2, 3]  # the file's lines, for errors mid-batch
    assert np.array_equal(back[2].vector, np.array([3.0, 4.0], np.float32))
    emb = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    reports = [DraftReport(f"r{i}", "J", f"i{i}", "math", emb[i], 0.5, {"e0": 0.7}, "t")
               for i in range(2)]
    part = message_part(wire.loads(wire.dumps(part_message(
        ShardPart("B", "R", "math", reports)))))
    assert (part.batch_id, part.run_id, part.shard) == ("B", "R", "math")
    got = part.reports
    assert [(r.id, r.item_id, r.experts) for r in got] == [("r0", "i0", {"e0": 0.7}),
                                                         ("r1", "i1", {"e0": 0.7})]
    # float16 on the wire: what the graph stores and the librarian decides on
    assert np.array_equal(got[0].embedding, emb[0].astype(np.float16).astype(np.float32))


def test_a_message_as_sent_passes_the_poison_checks_and_each_kind_of_poison_is_named():
    from pipeline.queue import poison
    from pipeline.queue.app import ROUTE_BATCH

    body = wire.dumps([[batch_message(ItemBatch("B", "J", "R", "F", [
        Item("a", 1, vector=[1.0, 2.0])]))], {}, {"callbacks": None}]).encode()
    headers, tasks = {"task": ROUTE_BATCH, "id": "1"}, {ROUTE_BATCH}
    assert poison.message(headers, wire.CONTENT_TYPE, body, 2**20, tasks) is None
    refusals = {
        "body of 1048577 bytes, over the limit of 1048576": (headers, wire.CONTENT_TYPE,
                                                              b" " * (2**20 + 1)),
        "no task headers (task, id)": ({"task": ROUTE_BATCH}, wire.CONTENT_TYPE, body),
        "unknown task 'x'": ({"task": "x", "id": "1"}, wire.CONTENT_TYPE, body),
        "content type 'application/x-python-serialize' not accepted":
            (headers, "application/x-python-serialize", b"\x80\x04N."),
        "body is not valid application/x-moe-json": (headers, wire.CONTENT_TYPE, body[:-3]),
        "body is not [args, kwargs, embed]": (headers, wire.CONTENT_TYPE, b'{"a": 1}'),
        "pipeline.route_batch message without job_id, model": (
            headers, wire.CONTENT_TYPE, b'[[{"batch_id": 1, "run_id": 2, "ids": [], '
            b'"texts": [], "vector_rows": [], "vectors": null}], {}, {}]'),
    }
    for reason, (h, ctype, b) in refusals.items():
        assert poison.message(h, ctype, b, 2**20, tasks) == reason


def test_redis_envelopes_are_checked_before_kombu_decodes_them():
    import base64 as b64

    from pipeline.queue import poison

    good = {"body": b64.b64encode(b"[]").decode(), "headers": {}, "content-type": "x",
            "properties": {"delivery_tag": "t", "delivery_info": {}, "body_encoding":
                           "base64"}}
    assert poison.envelope(json.dumps(good).encode(), 2**20) == (good, None)
    cases = {b"\xff\x00": "not a JSON envelope", b"[1]": "envelope is a JSON list, not an "
             "object", b"{}": "envelope without properties, delivery tag or delivery info",
             json.dumps({**good, "body": "@@"}).encode(): "body is not base64",
             json.dumps({**good, "headers": []}).encode(): "envelope headers of the wrong "
             "type", b" " * 11: "11 bytes, over the limit of 10"}
    for raw, reason in cases.items():
        assert poison.envelope(raw, 10 if len(raw) == 11 else 2**20) == (None, reason)
    assert poison.envelope_shape({"data": 1}) is not None  # a broadcast of another shape
