"""`moe-pipeline serve`: the API on real graph servers and both SQL backends, tokens, limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import forkrun
import pytest
from factories import free_port, graph_settings

pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient

from pipeline import tokens
from pipeline.service import create_app

ROOT = Path(__file__).resolve().parents[1]
NOTES = ["the tide tables for the northern harbour are printed each spring",
         "a recipe for rye bread with caraway seeds and a long cold proof",
         "the violin concerto was first performed in leipzig in 1845",
         "glaciers carve u-shaped valleys as they slowly flow downhill"]



def _wait(client: TestClient, job_id: str, headers: dict, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/jobs/{job_id}", headers=headers).json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


@pytest.mark.backends("embedded", "neo4j")
@pytest.mark.deployments
def test_the_api_runs_a_job_answers_questions_and_forgets_on_both_sql_backends(
        tmp_path, graph, sql_url):
    settings = graph_settings(tmp_path, graph, sql_url)
    read = {"Authorization": f"Bearer {tokens.token(tmp_path, 'read')}"}
    write = {"Authorization": f"Bearer {tokens.token(tmp_path, 'write')}"}
    ids = [f"api-{n}-{os.getpid()}" for n in range(len(NOTES))]
    body = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, NOTES,
                                                                           strict=True))
    body += '{"id": "broken", "text": ""}\n{not json\n'
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/jobs").status_code == 401
        assert client.get("/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
        posted = client.post("/jobs", content=body, headers={
            **read, "Content-Type": "application/x-ndjson"})
        assert posted.status_code == 403  # a read token cannot write
        posted = client.post("/jobs", content=body, headers={
            **write, "Content-Type": "application/x-ndjson"})
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["id"]
        with client.stream("GET", f"/jobs/{job_id}/events", headers=read) as events:
            seen = [json.loads(line[6:]) for line in events.iter_lines()
                    if line.startswith("data: ")]
        assert seen and seen[-1]["status"] not in ("queued", "running")
        job = _wait(client, job_id, read)
        assert job["status"] == "completed_with_errors", job
        bad = {(b["line"], b["field"]) for b in job["bad_items"]}
        assert bad == {(5, "text"), (6, "line")}  # the same per-line errors as `run`
        assert job_id in [j["id"] for j in client.get("/jobs", headers=read).json()]
        # The same file as an upload (multipart): one more job, the same items again.
        uploaded = client.post("/jobs", files={"file": ("items.jsonl", body.encode())},
                               headers=write)
        assert uploaded.status_code == 202, uploaded.text
        again = _wait(client, uploaded.json()["id"], read)
        assert again["status"] == "completed_with_errors" and len(again["bad_items"]) == 2

        rows = client.post("/query", headers=read, json={
            "cypher": "UNWIND $ids AS id MATCH (s:Source {id: id}) RETURN s.text AS text",
            "params": {"ids": ids}}).json()["rows"]
        assert sorted(r["text"] for r in rows) == sorted(NOTES)
        refused = client.post("/query", headers=read, json={"cypher": "CREATE (:Oops)"})
        assert refused.status_code == 403
        refused = client.post("/query", headers=read,
                              json={"cypher": "CREATE (:Oops)", "write": True})
        assert refused.status_code == 403
        assert client.post("/query", headers=read,
                           json={"cypher": "MATCH (n RETURN n"}).status_code == 422

        hits = client.get("/similar", headers=read, params={"text": NOTES[1]}).json()["hits"]
        assert hits and hits[0]["summary"] == NOTES[1]
        page = client.get(f"/insights/{hits[0]['node_id']}", headers=read).json()
        assert page["text"] == NOTES[1] and ids[1] in [s["id"] for s in page["sources"]]
        assert page["experts"] and all(e["weight"] > 0 for e in page["experts"])
        assert client.get("/insights/nope", headers=read).status_code == 404
        topics = client.get("/constellations", headers=read).json()
        assert topics and sum(t["insights"] for t in topics) >= len(NOTES)
        assert all(t["name"] and isinstance(t["experts"], list) for t in topics)

        assert client.delete(f"/sources/{ids[1]}", headers=read).status_code == 403
        gone = client.delete(f"/sources/{ids[1]}", headers=write)
        assert gone.status_code == 200 and gone.json()["counts"]["sources"] == 1
        hits = client.get("/similar", headers=read, params={"text": NOTES[1]}).json()["hits"]
        assert all(h["summary"] != NOTES[1] for h in hits)
        assert client.delete(f"/sources/{ids[1]}", headers=write).status_code == 422

        metrics = client.get("/metrics", headers=read).text
        assert "moe_jobs{" in metrics and "moe_request_seconds_bucket" in metrics
        # two /similar questions above, each answered in a lot of its own
        assert "moe_similar_lot_size_count 2.0" in metrics
        for text in (metrics, json.dumps(client.get("/jobs", headers=read).json())):
            assert read["Authorization"][7:] not in text
            assert write["Authorization"][7:] not in text
        graph.run_cypher("UNWIND $ids AS id MATCH (s:Source {id: id})<-[:SUPPORTED_BY]-(i) "
                         "DETACH DELETE i, s", {"ids": ids}, write=True)


@pytest.mark.backends("embedded")
def test_limits_tokens_the_openapi_document_and_the_page(tmp_path, graph):
    settings = graph_settings(tmp_path, graph, f"sqlite:///{tmp_path / 'runs.sqlite3'}")
    write = {"Authorization": f"Bearer {tokens.token(tmp_path, 'write')}"}
    with TestClient(create_app(settings, max_body_mb=0.001)) as client:
        big = client.post("/jobs", content="x" * 4096, headers=write)
        assert big.status_code == 413
        assert client.post("/jobs", content="", headers=write).status_code == 422
        assert client.post("/jobs", files={"other": ("a.jsonl", b"{}")},
                           headers=write).status_code == 422
        spec = client.get("/openapi.json").json()
        assert {"/jobs", "/jobs/{job_id}", "/query", "/similar", "/constellations",
                "/insights/{insight_id}", "/sources/{source_id}", "/metrics",
                "/health"} <= set(spec["paths"])
        assert "text/html" in client.get("/").headers["content-type"]
        assert "function api(" in client.get("/app.js").text
        old = write["Authorization"]
        tokens.token(tmp_path, "write", revoke=True)
        assert client.get("/jobs", headers={"Authorization": old}).status_code == 401
    assert oct((tmp_path / tokens.FILE).stat().st_mode & 0o777) == "0o600"



@pytest.mark.backends("embedded")
def test_serve_listens_on_loopback_and_token_prints_the_kept_token(tmp_path, graph):
    import httpx

    settings = graph_settings(tmp_path, graph, f"sqlite:///{tmp_path / 'runs.sqlite3'}")
    env = {**os.environ, "MOE_STATE_DIR": str(tmp_path), "NEO4J_URI": settings.neo4j_uri,
           "NEO4J_USERNAME": settings.neo4j_username,
           "NEO4J_PASSWORD": settings.neo4j_password or "",
           "DATABASE_URL": settings.sql_url(), "MOE_DEVICE": "cpu"}
    cli = [sys.executable, "-m", "pipeline.cli"]
    first = forkrun.run(cli + ["token"], env=env, cwd=ROOT, capture_output=True, text=True)
    again = forkrun.run(cli + ["token"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0 and first.stdout == again.stdout  # kept, not made anew
    port = free_port()
    proc = subprocess.Popen(cli + ["serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.3)
        assert health.json()["status"] == "ok"
        jobs = httpx.get(f"http://127.0.0.1:{port}/jobs",
                         headers={"Authorization": f"Bearer {first.stdout.strip()}"})
        assert jobs.status_code == 200 and isinstance(jobs.json(), list)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert first.stdout.strip() not in err  # the server never logs a token
