"""The page of `moe-pipeline serve`, in a real headless browser (Debian's chromium, driven by
Playwright with the system browser: nothing is downloaded). Each view's screenshot is saved
(MOE_TEST_SCREENSHOTS, else the test's temporary dir)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import tokens

ROOT = Path(__file__).resolve().parents[1]
NOTES = ["the tide tables for the northern harbour are printed each spring",
         "the harbour tide tables are printed every spring for the north",
         "a recipe for rye bread with caraway seeds and a long cold proof",
         "rye bread with caraway seeds needs a long and cold proof",
         "the violin concerto was first performed in leipzig in 1845"]


def _browser() -> str:
    pytest.importorskip("playwright", reason="playwright is not installed (the dev extra)")
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no chromium (scripts/services.sh installs Debian's)")
    return found


@pytest.mark.backends("embedded")
def test_the_page_submits_searches_opens_an_insight_expands_it_and_runs_cypher(
        tmp_path, graph):
    from factories import free_port
    from playwright.sync_api import sync_playwright

    chromium = _browser()
    if graph.auth is None:
        pytest.skip("this graph backend gives no credentials to configure a server with")
    shots = Path(os.environ.get("MOE_TEST_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    state = tmp_path / "state"
    env = {**os.environ, "MOE_STATE_DIR": str(state), "NEO4J_URI": graph.uri,
           "NEO4J_USERNAME": graph.auth[0], "NEO4J_PASSWORD": graph.auth[1] or "",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'runs.sqlite3'}", "MOE_DEVICE": "cpu"}
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--port",
                               str(port)], env=env, cwd=ROOT, stderr=subprocess.PIPE,
                              text=True)
    url = f"http://127.0.0.1:{port}/"
    ids = [f"web-{n}-{os.getpid()}" for n in range(len(NOTES))]
    items = "\n".join(json.dumps({"id": i, "text": t}) for i, t in zip(ids, NOTES, strict=True))
    try:
        deadline = time.monotonic() + 60
        while not (state / tokens.FILE).exists():  # the server makes the tokens at start
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        write = tokens.token(state, "write")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            for _ in range(100):  # until the server listens
                try:
                    page.goto(url)
                    break
                except Exception:
                    assert server.poll() is None
                    time.sleep(0.3)
            page.fill("#token", write)
            page.click("#save-token")
            page.fill("#items", items)
            page.click("#submit")
            page.wait_for_function(
                "document.querySelector('.progress')?.textContent.startsWith('completed')",
                timeout=120_000)
            page.screenshot(path=str(shots / "1-jobs.png"), full_page=True)

            page.click("a[data-view=search]")
            page.fill("#question", NOTES[2])
            page.click("#ask")
            page.wait_for_selector("#hits table tr:nth-child(2)", timeout=60_000)
            assert NOTES[2] in page.inner_text("#hits") or NOTES[3] in page.inner_text("#hits")
            page.screenshot(path=str(shots / "2-search.png"), full_page=True)

            page.click("#hits table tr:nth-child(2)")
            page.wait_for_selector("#insight-text")
            assert page.inner_text("#insight-text") in (NOTES[2], NOTES[3])
            before = page.locator("#graph g.node").count()
            assert before >= 2  # the insight and at least its source
            page.screenshot(path=str(shots / "3-insight.png"), full_page=True)
            expandable = page.locator("#graph g.node circle[fill='#4c7bd9']")
            expandable.nth(expandable.count() - 1).click()
            page.wait_for_timeout(1500)
            assert page.locator("#graph g.node").count() >= before
            page.screenshot(path=str(shots / "4-expanded.png"), full_page=True)

            page.click("a[data-view=cypher]")
            page.fill("#cypher", "MATCH (s:Source) WHERE s.id STARTS WITH 'web-' "
                                 "RETURN s.id AS id, s.text AS text ORDER BY id")
            page.click("#run")
            page.wait_for_selector("#rows table")
            assert NOTES[4] in page.inner_text("#rows")
            page.screenshot(path=str(shots / "5-cypher.png"), full_page=True)

            page.click("a[data-view=topics]")
            page.wait_for_selector("main table")
            page.screenshot(path=str(shots / "6-topics.png"), full_page=True)
            browser.close()
        assert len(list(shots.glob("*.png"))) >= 6
    finally:
        server.terminate()
        server.communicate(timeout=30)
        graph.run_cypher("UNWIND $ids AS id MATCH (s:Source {id: id})<-[:SUPPORTED_BY]-(i) "
                         "DETACH DELETE i, s", {"ids": ids}, write=True)
