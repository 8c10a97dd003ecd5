"""The benchmark scripts and the CLI run end to end (shape of output, never timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import forkrun
import pytest

# Each test runs a benchmark or the CLI in its own process, end to end.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra_env}
    return forkrun.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)


def test_moe_layer_bench_quick_prints_the_shared_json_shape():
    proc = _run("bench/moe_layer.py", "--quick")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["bench"] == "moe_layer"
    assert set(record) >= {"device", "config", "results", "references", "ratios", "targets"}
    assert record["device"]["kind"] == "cpu" and record["device"]["threads"] >= 1
    assert record["results"]["ours_fwd_tokens_per_s_small"] > 0
    assert record["references"]["loop_over_experts_fwd_tokens_per_s_large"] > 0
    assert record["references"]["masked_dense_fwd_tokens_per_s_small"] > 0
    for name, t in record["targets"].items():
        assert set(t) == {"goal", "value", "met"}, name
    ratio = record["ratios"]["ours_vs_loop_fwd_small"]
    rates = (record["results"]["ours_fwd_tokens_per_s_small"]
             / record["references"]["loop_over_experts_fwd_tokens_per_s_small"])
    assert ratio == pytest.approx(rates, rel=0.01)  # the ratio is of the rates it reports


@pytest.mark.slow
def test_cli_demo_trains_and_reports_usage():
    proc = _run("-m", "pipeline.cli", "demo", "--steps", "30", "--experts", "4")
    assert proc.returncode == 0, proc.stderr
    assert "expert usage" in proc.stdout and "routing entropy" in proc.stdout
    first, last = proc.stdout.split("loss ")[-1].split(" in ")[0].split(" -> ")
    assert float(last) < float(first)


def test_cli_turns_config_errors_into_one_line_and_exit_1():
    proc = _run("-m", "pipeline.cli", "demo", "--experts", "4", "--top-k", "5")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: top_k_experts=5 is invalid: expected at most num_experts=4")


@pytest.mark.parametrize("args, expected", [
    (["run", "examples/texts.jsonl", "--batch-size", "-5"],
     "Invalid value for '--batch-size': -5 is not in the range 1<=x<=1000000. "
     "(see moe-pipeline run"),
    (["submit", "examples/texts.jsonl", "--batch-size", "0"],
     "0 is not in the range 1<=x<=1000000"),
    (["run", "no-such-file.jsonl"], "File 'no-such-file.jsonl' does not exist"),
    (["nosuchcommand"], "No such command 'nosuchcommand'. (see moe-pipeline --help)"),
    (["query"], "Missing argument 'CYPHER'"),
    (["status", "--items"], "--items needs a JOB_ID"),
])
def test_usage_errors_are_one_line_and_exit_2(args, expected, tmp_path):
    """A negative batch size used to run nothing and leave the job running for ever; every
    usage error was a traceback."""
    env = {**os.environ, "MOE_STATE_DIR": str(tmp_path)}
    proc = forkrun.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_a_batch_size_under_one_is_refused_from_python_too(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.jobs import run_local
    from pipeline.settings import Settings

    settings = Settings(state_dir=tmp_path, device="cpu")
    for bad in (-5, 0, 2.5):
        with pytest.raises(PipelineError, match="must be a whole number, 1 or more"):
            run_local([{"id": "a", "vector": [1.0, 2.0]}], settings, batch_size=bad)
    assert not (tmp_path / "runs.sqlite3").exists()  # refused before any job was made


def test_system_bench_quick_compares_base_and_optimized():
    proc = _run("bench/system.py", "--quick", "--no-compile")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["bench"] == "system"
    assert record["references"]["base_samples_per_s"] > 0
    assert record["results"]["optimized_samples_per_s"] > 0
    assert record["results"]["min_cosine_optimized_vs_base"] > 0.99
    assert "optimized_vs_base" in record["ratios"]


def test_constellation_example_specialises_sub_populations():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_constellations", ROOT / "examples" / "train_constellations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "150"])
    assert result["last_loss"] < 0.2 * result["first_loss"]
    # Each sub-population goes mostly to one constellation, and no two share one.
    favourites = [max(range(4), key=row.__getitem__) for row in result["table"].values()]
    assert all(max(row) > 0.8 for row in result["table"].values())
    assert len(set(favourites)) == 4


@pytest.mark.integration
@pytest.mark.slow
def test_graph_ingest_bench_quick_runs_against_the_embedded_server():
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    proc = _run("bench/graph_ingest.py", "--quick")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["bench"] == "graph_ingest" and "ArcadeDB" in record["config"]["server"]
    for key in ("ours_batch_1_per_s", "ours_batch_1000_per_s", "ours_read_shard_per_s",
                "ours_catch_up_per_s"):
        assert record["results"][key] > 0, key
    assert record["references"]["naive_one_at_a_time_per_s"] > 0
    assert set(record["targets"]) == {"insights_per_s_batched", "ours_1000_vs_one_at_a_time",
                                      "cache_read_rows_per_s"}


@pytest.mark.integration
@pytest.mark.slow
def test_graph_ingest_bench_quick_runs_both_servers_on_the_same_rows(neo4j_server):
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEO4J_PASSWORD": neo4j_server["password"]}
    proc = forkrun.run([sys.executable, "bench/graph_ingest.py", "--quick", "--neo4j",
                        "--uri", neo4j_server["uri"]], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    servers = record["config"]["servers"]
    assert "ArcadeDB" in servers["embedded"] and servers["neo4j"].startswith("Neo4j/5.26")
    for key in ("ours_batch_1", "ours_batch_1000", "ours_read_shard", "naive_one_at_a_time"):
        assert record["results"][f"neo4j_{key}_per_s"] > 0, key
        assert record["references"][f"embedded_{key}_per_s"] > 0, key
        assert record["ratios"][f"neo4j_vs_embedded_{key}"] > 0, key
    assert neo4j_server["password"] not in proc.stdout + proc.stderr


def test_similarity_bench_quick_compares_against_faiss_and_numpy():
    proc = _run("bench/similarity.py", "--quick")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["bench"] == "similarity"
    assert record["results"]["ours_batched_qps_random_2000"] > 0
    assert record["references"]["numpy_batched_qps_random_2000"] > 0
    agreement = record["results"]["top_k_agreement"]
    assert agreement["ours_vs_numpy_random_2000"] == 1.0  # random data: no ties, same top-k
    assert record["results"]["snapshot_ready_seconds_20000"] > 0
    assert record["results"]["librarian_decisions_reports_per_s_2000"] > 0
    # similar over every constellation, against the one-constellation search it replaced
    assert record["results"]["all_constellations_p50_ms"] > 0
    assert record["references"]["one_constellation_p50_ms"] > 0
    assert record["ratios"]["all_vs_one_constellation_p50"] > 0


@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_bench_quick_compares_this_code_with_an_earlier_commit(redis_url):
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    # Both trees queue in the suite's Redis database, under the bench's own key prefix (the
    # older tree, which predates it, on plain keys the bench deletes after).
    proc = _run("bench/pipeline.py", "--quick", "--items", "64", "--count-items", "32",
                BENCH_REDIS_URL=redis_url, BENCH_REDIS_BEFORE_URL=redis_url)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["bench"] == "pipeline"
    results = record["results"]
    for mode in ("embedded", "queued"):
        for kind in ("vectors", "texts"):
            assert results[f"{mode}_{kind}_items_per_s"] > 0
    # The ledger's cost per batch, counted: three SQL transactions, and one graph
    # transaction (a write) per curated part, its reads included.
    for kind in ("vectors", "texts"):
        assert results["sql_transactions_per_batch"][kind] == 3
        assert results["graph_write_transactions_per_batch"][kind] >= 1
        assert results["graph_transactions_per_part"][kind] == 1
    assert record["targets"]["sql_transactions_per_batch"]["goal"] == 3


def test_layer_profile_bench_quick_counts_ops_and_compares_compiled():
    proc = _run("bench/moe_layer_profile.py", "--quick", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["bench"] == "moe_layer_profile"
    assert record["results"]["aten_ops_per_fwd_256"] > 0
    assert record["references"]["eager_us_per_fwd_256"] > 0
    assert record["ratios"]["compiled_default_vs_eager_256"] > 0


def test_sync_audit_runs_every_case_on_the_cpu(tmp_path):
    out = tmp_path / "audit.json"
    proc = forkrun.run([sys.executable, "bench/sync_audit.py", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "DEV": "cpu"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["n_cases"] >= 60 and not summary["setup_errors"]


def test_startup_bench_quick_times_the_commands_that_need_no_model():
    proc = _run("bench/startup.py", "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["bench"] == "startup"
    assert set(data["results"]) == {"help_seconds", "version_seconds", "status_seconds",
                                    "down_seconds", "query_seconds"}
    assert all(v > 0 for v in data["results"].values())
    assert data["references"]["import_torch_seconds"] > 0


def test_forget_bench_quick_compares_forgetting_with_a_fresh_run_and_checks_equality():
    proc = _run("bench/forget.py", "--quick", "--items", "200")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["bench"] == "forget" and record["config"]["forgotten"] == 20
    assert record["results"]["forget_sources"] == 20
    assert record["references"]["fresh_run_of_the_rest_s"] > 0
    assert set(record["targets"]) == {"fresh_run_vs_forget", "graph_equals_fresh_run"}
    # Equality is the bench's own check, read back from both graphs: it must hold.
    assert record["targets"]["graph_equals_fresh_run"]["met"], record["equality"]
