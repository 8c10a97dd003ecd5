"""The graph commands through the real CLI, on an embedded server of their own."""

from __future__ import annotations

import os
import subprocess
import sys

import forkrun
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    state = tmp_path_factory.mktemp("cli-state")
    env = {k: v for k, v in os.environ.items() if k not in ("NEO4J_URI", "MOE_NEO4J_URI")}
    env["MOE_STATE_DIR"] = str(state)

    def run(*args: str) -> subprocess.CompletedProcess:
        return forkrun.run([sys.executable, "-m", "pipeline.cli", *args],
                           capture_output=True, text=True, env=env, timeout=180)

    yield run
    run("down")


@pytest.mark.parametrize("query, expected", [
    ("MATCH (i:Insight RETURN i", "query refused by the graph server (SyntaxError): Syntax "
                                  "error at line 1:17"),
    ("MATCH (i:Insight {id: $insight}) RETURN i.id",
     "the query needs parameter(s) $insight: give it as --param insight=VALUE"),
    ("MATCH (i:Insight) RETURN j", "Variable 'j' not defined"),
    ("MATCH (n) DETACH DELETE n", "run it with --write"),
])
def test_a_refused_query_is_one_line_with_the_servers_reason(cli, query, expected):
    proc = cli("query", query)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines()
             if not line.startswith("starting the embedded graph server")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], \
        proc.stderr


def test_a_good_query_still_answers(cli):
    proc = cli("query", "RETURN 1 + $x AS answer", "--param", "x=41", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '{"answer": 42}'


def test_embeddings_print_as_their_shape_not_their_bytes(cli, tmp_path):
    items = tmp_path / "three.jsonl"
    items.write_text("".join(f'{{"id": "e{i}", "vector": [{i}, 1, 2, 3]}}\n' for i in range(3)))
    assert cli("run", str(items)).returncode == 0
    for flag in ([], ["--json"]):
        proc = cli("query", "MATCH (i:Insight) RETURN i LIMIT 1", *flag)
        assert proc.returncode == 0, proc.stderr
        assert "<float16[384]>" in proc.stdout and "\\x" not in proc.stdout, proc.stdout


def test_a_command_that_starts_the_server_says_so(tmp_path):
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("NEO4J_URI", "MOE_NEO4J_URI")}
    env["MOE_STATE_DIR"] = str(tmp_path / "fresh")
    run = [sys.executable, "-m", "pipeline.cli"]
    try:
        first = forkrun.run([*run, "query", "RETURN 1 AS one"], capture_output=True,
                            text=True, env=env, timeout=180)
        assert first.returncode == 0, first.stderr
        assert "starting the embedded graph server of" in first.stderr
        again = forkrun.run([*run, "query", "RETURN 1 AS one"], capture_output=True,
                            text=True, env=env, timeout=180)
        assert again.returncode == 0 and "starting" not in again.stderr
    finally:
        forkrun.run([*run, "down"], env=env, capture_output=True, timeout=120)
