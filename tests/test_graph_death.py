"""The embedded graph server killed in the middle of `moe-pipeline run`: one clear line, a
non-zero exit, a failed job; running the same file again finishes the work, nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import forkrun
import numpy as np
import pytest
from sqlalchemy import select

from pipeline.storage.embedded import LocalGraphServer
from pipeline.storage.sql import Batch, Job, session_factory

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_graph_server_killed_mid_run_fails_the_job_and_a_rerun_finishes_it(tmp_path):
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in ("NEO4J_URI", "MOE_NEO4J_URI",
                                                            "DATABASE_URL")}
    # The driver retries a transaction on a server that does not answer for this long before
    # the run gives up (30 s by default): the test needs the giving up, not the waiting.
    env.update(MOE_STATE_DIR=str(state), MOE_DEVICE="cpu", MOE_GRAPH_CONNECT_TIMEOUT_S="5")
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, 16))
    items = [{"id": f"d{i}", "vector": (centres[i % 40] + 0.3 * rng.standard_normal(16))
              .round(4).tolist()} for i in range(800)]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in items) + "\n")
    cli = [sys.executable, "-m", "pipeline.cli"]
    server = LocalGraphServer(state)
    try:
        forkrun.run(cli + ["up"], env=env, check=True, capture_output=True, timeout=180)
        run = forkrun.Popen(cli + ["run", str(path), "--batch-size", "50"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        Session = session_factory(f"sqlite:///{state / 'runs.sqlite3'}", run_migrations=False)
        deadline = time.monotonic() + 120
        while True:  # a few batches in: then the server dies
            assert time.monotonic() < deadline and run.poll() is None, run.communicate()
            try:
                with Session() as s:
                    done = s.scalar(select(Batch.id).where(Batch.status == "completed"))
            except Exception:  # the file or its tables not made yet
                done = None
            if done:
                break
            time.sleep(0.1)
        os.kill(server.running().pid, signal.SIGKILL)
        out, err = run.communicate(timeout=180)
        assert run.returncode == 1, (out, err)
        lines = [line for line in err.splitlines() if line.strip() and "%" not in line]
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("error: ") and "graph" in lines[0], err
        with Session() as s:
            (job,) = s.scalars(select(Job)).all()
            assert job.status == "failed"

        again = forkrun.run(cli + ["run", str(path), "--batch-size", "50"], env=env,
                            capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
        count = forkrun.run(cli + ["query", "MATCH (i:Insight)-[e:SUPPORTED_BY]->(s:Source)"
                                   " RETURN count(e) AS edges, count(DISTINCT s) AS sources",
                                   "--json"], env=env, capture_output=True, text=True,
                            timeout=180)
        assert count.returncode == 0, count.stderr
        # Every item's source supports exactly one insight, once: nothing lost, nothing twice.
        assert json.loads(count.stdout) == {"edges": 800, "sources": 800}
    finally:
        server.stop()
