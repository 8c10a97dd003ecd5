"""The librarian under its shard lock, against the real graph and Redis (the pure decisions
it takes are in test_dedup.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import clustered, reports_for

from pipeline.librarian import Librarian
from pipeline.storage.locks import LocalShardLock

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD, RELATED = 0.85, 0.5


def _librarian(graph, **kw) -> Librarian:
    # The session's graph is shared by every test: a librarian looking across shards would
    # meet other tests' insights, so these look within their shard; the cross-shard tests
    # below keep to a report space (model) of their own instead.
    kw.setdefault("cross_shard", False)
    return Librarian(graph, LocalShardLock(), dim=16, run_id="run-lib",
                     dedup_threshold=THRESHOLD, related_threshold=RELATED, **kw)


def _shard_state(graph, shard: str) -> tuple[np.ndarray, dict[str, int]]:
    rows = graph.read_shard(shard, dim=16)
    per_report = graph.run_cypher(
        "MATCH (i:Insight {shard: $s})-[e:SUPPORTED_BY]->() "
        "RETURN e.report_id AS report, count(DISTINCT i) AS n", {"s": shard})
    return rows.embeddings.astype(np.float64), {r["report"]: r["n"] for r in per_report}


def _max_pair(emb: np.ndarray) -> float:
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T - 2 * np.eye(len(emb))
    return float(sims.max()) if len(emb) > 1 else -1.0


def test_curate_keeps_the_invariants_in_the_graph_and_replays_as_a_no_op(graph):
    shard = f"lib-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(3)
    lib = _librarian(graph)
    emb = clustered(rng, 90, 4)  # the same clusters recur across batches
    batches = [reports_for(emb[30 * b: 30 * b + 30], "job-1", shard, 30 * b)
               for b in range(3)]
    results = [lib.curate(shard, b) for b in batches]
    assert results[0].inserted >= 1 and sum(r.merged for r in results) > 0
    emb, per_report = _shard_state(graph, shard)
    assert _max_pair(emb) < THRESHOLD
    assert len(per_report) == 90 and set(per_report.values()) == {1}
    before = graph.run_cypher("MATCH (i:Insight {shard: $s})-[e]->() RETURN count(e) AS n",
                              {"s": shard})
    again = lib.curate(shard, batches[1])  # a redelivered task
    assert again.skipped == 30 and again.inserted == 0
    fresh = _librarian(graph).curate(shard, batches[2])  # another process, cold cache
    assert fresh.skipped == 30
    assert graph.run_cypher("MATCH (i:Insight {shard: $s})-[e]->() RETURN count(e) AS n",
                            {"s": shard}) == before
    assert again.insight_of_report == results[1].insight_of_report
    # A replay reports what the first curation did, for the metrics a redelivery records.
    assert again.outcome() == results[1].outcome() == (results[1].inserted,
                                                      results[1].merged)
    assert fresh.outcome() == (results[2].inserted, results[2].merged)


def test_knowledge_graph_settings_come_from_the_model_config(graph, tmp_path):
    from pipeline import MoEConfig

    cfg = MoEConfig(input_dim=16, hidden_dim=16, output_dim=16, num_experts=4,
                    top_k_experts=2, dedup_threshold=0.9, related_threshold=0.6,
                    max_kg_nodes=7, kg_checkpoint_dir=str(tmp_path), kg_save_interval=2)
    lib = Librarian.from_config(graph, LocalShardLock(), cfg, run_id="run-cfg")
    assert (lib.dim, lib.dedup_threshold, lib.related_threshold) == (16, 0.9, 0.6)
    assert (lib.max_kg_nodes, lib.checkpoint_dir, lib.save_interval) == (7, tmp_path, 2)


def test_snapshots_bound_and_restore_the_cache(graph, tmp_path):
    shard = f"snap-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(5)
    lib = _librarian(graph, max_kg_nodes=5, kg_checkpoint_dir=tmp_path, kg_save_interval=3)
    lib.curate(shard, reports_for(clustered(rng, 40, 12, noise=0.01), "job-s", shard))
    assert len(lib.cache(shard)) == 5  # bounded; the rest stay in the graph
    assert graph.count_after(shard) > 5
    snaps = list(tmp_path.iterdir())
    assert len(snaps) == 1 and (snaps[0] / "cache.json").exists()
    restored = _librarian(graph, max_kg_nodes=5, kg_checkpoint_dir=tmp_path).cache(shard)
    assert restored.watermark == lib.cache(shard).watermark


def test_query_knowledge_graph_on_the_system(graph, tmp_path, monkeypatch):
    from pipeline import MoEConfig
    from pipeline.moe.system import MixtureOfExpertsSystem

    shard = f"q-{uuid.uuid4().hex[:8]}"
    emb = clustered(np.random.default_rng(7), 10, 10, noise=0.0)
    lib = _librarian(graph)
    lib.curate(shard, reports_for(emb, "job-q", shard))
    system = MixtureOfExpertsSystem(MoEConfig(input_dim=16, hidden_dim=16, output_dim=16,
                                              num_experts=4, top_k_experts=2))
    # Nothing attached and no graph in the state dir: an empty answer, not an error.
    monkeypatch.setenv("MOE_STATE_DIR", str(tmp_path / "empty-state"))
    monkeypatch.delenv("NEO4J_URI", raising=False)
    assert system.query_knowledge_graph(torch.from_numpy(emb[0])) == []
    system.attach_knowledge_graph(lib)
    hits = system.query_knowledge_graph(torch.from_numpy(emb[4]), top_k=3, shards=[shard])
    assert len(hits) == 3 and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["shard"] == shard and set(hits[0]) == {"node_id", "similarity", "shard"}
    assert hits[0]["similarity"] >= hits[1]["similarity"] >= hits[2]["similarity"]



@pytest.mark.backends("neo4j")
def test_the_models_users_import_answer_from_the_settings_graph(graph, neo4j_server, tmp_path,
                                                                monkeypatch):
    """`pipeline.MixtureOfExpertsSystem` finds the graph `Settings` names; the model package's
    own class does no I/O and answers nothing unattached."""
    import pipeline
    from pipeline import MoEConfig
    from pipeline.moe import system

    shard = f"q-{uuid.uuid4().hex[:8]}"
    emb = clustered(np.random.default_rng(11), 10, 10, noise=0.0)
    _librarian(graph).curate(shard, reports_for(emb, "job-facade", shard))
    monkeypatch.setenv("MOE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NEO4J_URI", neo4j_server["uri"])
    monkeypatch.setenv("NEO4J_USERNAME", neo4j_server["user"])
    monkeypatch.setenv("NEO4J_PASSWORD", neo4j_server["password"])
    cfg = MoEConfig(input_dim=16, hidden_dim=16, output_dim=16, num_experts=4, top_k_experts=2)
    query = torch.from_numpy(emb[4])
    assert system.MixtureOfExpertsSystem(cfg).query_knowledge_graph(query, shards=[shard]) == []
    model = pipeline.MixtureOfExpertsSystem(cfg)
    assert isinstance(model, system.MixtureOfExpertsSystem)
    hits = model.query_knowledge_graph(query, top_k=2, shards=[shard])
    assert hits[0]["shard"] == shard and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)


WORKER = """
import json, sys
import numpy as np
from pipeline.librarian import Librarian
from pipeline.storage.locks import RedisShardLock
from pipeline.storage.graph import GraphStore
sys.path.insert(0, {tests!r})
from test_librarian import clustered, reports_for
cfg = json.loads(sys.argv[1])
graph = GraphStore.connect(cfg["uri"], cfg["user"], cfg["password"], cfg["database"])
locks = RedisShardLock(cfg["redis"], prefix=cfg["prefix"])
lib = Librarian(graph, locks, dim=16, run_id="run-two", cross_shard=False,
                dedup_threshold=0.85, related_threshold=0.5)
rng = np.random.default_rng(cfg["seed"])
for b in range(4):
    emb = clustered(np.random.default_rng(100 + b), 25, 5)  # both see the same clusters
    emb = emb + 0.02 * rng.standard_normal(emb.shape).astype(np.float32)
    lib.curate(cfg["shard"], reports_for(emb, "job-" + str(cfg["seed"]), cfg["shard"], 25 * b))
graph.close()
"""


def redis_lock() -> tuple[str, str]:
    """(The suite's Redis, a lock key prefix of this test's own), or a skip with the reason:
    lock keys are released or expire with their lease, and never meet another run's."""
    from conftest import new_redis_prefix, reachable_redis

    return reachable_redis(), new_redis_prefix() + "moe:shard-lock:"


def test_two_librarian_processes_on_one_shard_keep_it_free_of_duplicates(graph):
    url, prefix = redis_lock()
    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials to pass to a second process")
    shard = f"two-{uuid.uuid4().hex[:8]}"
    code = WORKER.format(tests=str(ROOT / "tests"))
    procs = [subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(
            {"uri": graph.uri, "user": graph.auth[0], "password": graph.auth[1],
             "database": graph.database, "redis": url, "prefix": prefix, "seed": seed,
             "shard": shard})],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
        text=True) for seed in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    emb, _ = _shard_state(graph, shard)
    # Both processes drafted reports of the same 100 items (sources): support counts each
    # source once, and every one of the 200 reports is recorded by its job on the edge.
    edges = graph.run_cypher(
        "MATCH (i:Insight {shard: $s})-[e:SUPPORTED_BY]->(src:Source) "
        "RETURN src.id AS source, count(e) AS n, sum(size(e.jobs)) AS jobs", {"s": shard})
    assert len(edges) == 100 and {e["n"] for e in edges} == {1}
    assert sum(e["jobs"] for e in edges) == 200
    assert _max_pair(emb) < THRESHOLD


@pytest.mark.parametrize("kind", ["local", pytest.param("redis", marks=pytest.mark.integration)])
def test_a_held_shard_lock_times_out_with_the_shards_name(kind):
    import threading

    from pipeline.storage.locks import LocalShardLock, LockTimeout, RedisShardLock

    if kind == "redis":
        url, prefix = redis_lock()
        holder, waiter = (RedisShardLock(url, wait_s=0.3, prefix=prefix) for _ in range(2))
    else:
        holder = waiter = LocalShardLock(wait_s=0.3)
    shard = f"lock-{uuid.uuid4().hex[:8]}"
    errors = []

    def contend() -> None:
        try:
            with waiter(shard):
                pass
        except LockTimeout as err:
            errors.append(err)

    with holder(shard):
        t = threading.Thread(target=contend)
        t.start()
        t.join()
    assert len(errors) == 1 and errors[0].shard == shard and shard in str(errors[0])
    with waiter(shard):  # released: free again
        pass


def test_repeated_reports_and_shared_experts_make_one_edge_each(graph):
    shard = f"dup-{uuid.uuid4().hex[:8]}"
    base = clustered(np.random.default_rng(11), 1, 1)[0]
    r1, r2 = reports_for(np.stack([base, base]), "job-d", shard)
    lib = _librarian(graph)
    result = lib.curate(shard, [r1, r1, r2])  # r1 twice; r2 a duplicate with the same experts
    assert result.inserted == 1 and result.reports == 3
    edges = graph.run_cypher(
        "MATCH (i:Insight {shard: $s})-[e]->(n) RETURN type(e) AS t, n.id AS n, "
        "count(*) AS c ORDER BY t, n", {"s": shard})
    assert all(e["c"] == 1 for e in edges), edges
    produced = [e for e in edges if e["t"] == "PRODUCED_BY"]
    assert len(produced) == 3  # e0, e1 (from r2) and e3: one edge per expert
    assert lib.cache(shard).seqs.tolist() == [0]


def test_a_stale_cache_is_rebuilt_instead_of_losing_reports(graph):
    shard = f"stale-{uuid.uuid4().hex[:8]}"
    emb = clustered(np.random.default_rng(12), 1, 1)
    lib = _librarian(graph)
    cache = lib.cache(shard)
    cache.add(["ghost"], emb, [0])  # a row the graph never had (a snapshot of another graph)
    result = lib.curate(shard, reports_for(emb, "job-g", shard))
    assert result.inserted == 1 and result.merged == 0
    _, per_report = _shard_state(graph, shard)
    assert list(per_report.values()) == [1]
    assert "ghost" not in lib.cache(shard).ids


def test_the_seq_fence_refuses_a_write_after_another_writer(graph):
    from pipeline.storage.graph import StaleWriteError
    from tests.test_graph import make_batch

    shard = f"fence-{uuid.uuid4().hex[:8]}"
    graph.write_batch(make_batch(shard, 2)[0], expect_max_seq={shard: -1})
    late, _ = make_batch(shard, 2, start=2)
    with pytest.raises(StaleWriteError, match="max seq is 1, the writer saw -1"):
        graph.write_batch(late, expect_max_seq={shard: -1})
    assert graph.max_seq(shard) == 1  # nothing of the refused batch landed


HOLDER = """
import sys, time
from pipeline.storage.locks import RedisShardLock
url, shard, lease_s, prefix = sys.argv[1:5]
with RedisShardLock(url, lease_s=float(lease_s), prefix=prefix)(shard):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.integration
def test_a_lease_outlives_its_ttl_while_held_and_frees_the_shard_when_its_holder_dies():
    import signal
    import time

    from pipeline.storage.locks import LockTimeout, RedisShardLock

    url, prefix = redis_lock()
    shard = f"lease-{uuid.uuid4().hex[:8]}"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url, shard, "1.5", prefix],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(4)  # more than twice the lease: the heartbeat keeps it
        with pytest.raises(LockTimeout), \
                RedisShardLock(url, wait_s=0.5, prefix=prefix)(shard):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        start = time.monotonic()
        # Free within the lease, not minutes.
        with RedisShardLock(url, wait_s=10, prefix=prefix)(shard):
            waited = time.monotonic() - start
        assert waited < 3
    finally:
        holder.kill()


def test_a_restatement_routed_to_another_constellation_merges_there(graph):
    """The invariant: a report whose nearest insight in *any* shard is a duplicate joins
    that insight (one more SUPPORTED_BY), instead of founding a second one in its own."""
    a, b = f"x-{uuid.uuid4().hex[:8]}", f"y-{uuid.uuid4().hex[:8]}"
    model = f"model-{uuid.uuid4().hex[:8]}"  # this test's own report space in the shared graph
    lib = _librarian(graph, cross_shard=True)
    emb = clustered(np.random.default_rng(11), 1, 1, noise=0.0)
    first = lib.curate(a, reports_for(emb, "job-x1", a), model=model)
    assert first.inserted == 1
    moved = reports_for(emb, "job-x2", b, start=100)  # the same note, routed to b
    second = lib.curate(b, moved, model=model)
    assert (second.inserted, second.merged) == (0, 1)
    (insight,) = set(first.insight_of_report.values())
    assert set(second.insight_of_report.values()) == {insight}
    rows = graph.run_cypher("MATCH (i:Insight {id: $id})-[:SUPPORTED_BY]->(s:Source) "
                            "RETURN count(DISTINCT s) AS n, i.shard AS shard", {"id": insight})
    assert rows == [{"n": 2, "shard": a}]
    assert graph.max_seq(b) == -1  # nothing founded in b


def test_a_related_note_of_another_constellation_is_linked_across(graph):
    """Near, not a duplicate, and filed elsewhere: SIMILAR_TO joins the two constellations."""
    a, b = f"x-{uuid.uuid4().hex[:8]}", f"y-{uuid.uuid4().hex[:8]}"
    model = f"model-{uuid.uuid4().hex[:8]}"
    lib = _librarian(graph, cross_shard=True)
    rng = np.random.default_rng(21)
    base, other = rng.standard_normal((2, 16)).astype(np.float32)
    base /= np.linalg.norm(base)
    other -= other @ base * base
    other /= np.linalg.norm(other)
    near = 0.7 * base + np.sqrt(1 - 0.49) * other  # cosine 0.7: related, below the threshold
    first = lib.curate(a, reports_for(base[None], "job-l1", a), model=model)
    second = lib.curate(b, reports_for(near[None].astype(np.float32), "job-l2", b, start=7),
                        model=model)
    assert (first.inserted, second.inserted, second.similar) == (1, 1, 1)
    (mine,) = set(second.insight_of_report.values())
    (theirs,) = set(first.insight_of_report.values())
    rows = graph.run_cypher("MATCH (i:Insight {id: $id})-[e:SIMILAR_TO]->(j:Insight) "
                            "RETURN j.id AS id, j.shard AS shard, e.score AS score",
                            {"id": mine})
    assert [(r["id"], r["shard"]) for r in rows] == [(theirs, a)]
    assert rows[0]["score"] == pytest.approx(0.7, abs=0.01)


def test_two_models_insights_never_merge(graph):
    shard, tag = f"m-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    m1, m2 = f"one-{tag}", f"two-{tag}"
    lib = _librarian(graph, cross_shard=True)
    emb = np.random.default_rng(12).standard_normal((4, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # four distinct notes
    one = lib.curate(shard, reports_for(emb, "job-m1", shard), model=m1)
    two = lib.curate(shard, reports_for(emb, "job-m2", shard, start=50), model=m2)
    assert one.inserted == two.inserted == len(emb)  # the same notes, two report spaces
    again = lib.curate(shard, reports_for(emb, "job-m3", shard, start=90), model=m1)
    assert (again.inserted, again.merged) == (0, len(emb))
    models = graph.run_cypher("MATCH (i:Insight {shard: $s}) RETURN i.model AS m, count(*) AS n "
                              "ORDER BY m", {"s": shard})
    assert models == [{"m": m1, "n": 4}, {"m": m2, "n": 4}]


def test_a_report_that_joined_an_existing_edge_is_recognised_on_replay(graph):
    """Support is one edge per (insight, source); the edge lists every report behind it, so
    a redelivered part whose reports only joined it is still a no-op."""
    shard = f"r-{uuid.uuid4().hex[:8]}"
    lib = _librarian(graph)
    emb = clustered(np.random.default_rng(13), 1, 1, noise=0.0)
    lib.curate(shard, reports_for(emb, "job-r1", shard))
    second = reports_for(emb, "job-r2", shard)  # the same item (source) in another job
    assert lib.curate(shard, second).merged == 1
    replay = lib.curate(shard, second)
    assert (replay.skipped, replay.inserted, replay.merged) == (1, 0, 0)
    rows = graph.run_cypher("MATCH (i:Insight {shard: $s})-[e:SUPPORTED_BY]->() "
                            "RETURN count(e) AS n, size(e.reports) AS reports, "
                            "size(e.jobs) AS jobs", {"s": shard})
    assert rows == [{"n": 1, "reports": 2, "jobs": 2}]


def test_librarians_on_a_redis_broker_share_redis_locks(tmp_path):
    """With only CELERY_BROKER_URL set to a Redis, in-process locks would let two librarian
    processes write one shard at once."""
    from pipeline.settings import Settings
    from pipeline.storage.locks import LocalShardLock, RedisShardLock, shard_locks

    def locks(**kw):
        return shard_locks(Settings(**{"state_dir": tmp_path, "redis_url": None,
                                       "celery_broker_url": None, **kw}))

    assert isinstance(locks(), LocalShardLock)  # the embedded default: one process
    assert isinstance(locks(celery_broker_url="redis://127.0.0.1:6379/14"), RedisShardLock)
    assert isinstance(locks(redis_url="redis://127.0.0.1:6379/13"), RedisShardLock)
    # A deployment's MOE_REDIS_PREFIX goes before its lock keys, as before its queues.
    assert locks(redis_url="redis://127.0.0.1:6379/13", redis_prefix="team-a:").prefix == \
        "team-a:moe:shard-lock:"
    assert isinstance(locks(celery_broker_url="amqp://guest:guest@127.0.0.1//"),
                      LocalShardLock)


def test_a_medoid_tie_goes_to_the_smallest_text_whatever_the_order():
    from pipeline.records import encode_embedding
    from pipeline.storage.rows import medoid

    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    blobs = [encode_embedding(a), encode_embedding(b)]
    assert medoid(blobs, 3, ["zeta", "alpha"]) == 1
    assert medoid(blobs[::-1], 3, ["alpha", "zeta"]) == 0
