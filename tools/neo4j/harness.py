"""Start the launcher's Neo4j from Python and hold it for as long as this object lives.

Used by the test suite (tests/conftest.py) and the benchmarks (bench/graph_ingest.py,
bench/pipeline.py): ``with Neo4jHarness() as neo4j: neo4j.uri, neo4j.password``. The server
serves until the pipe to the launcher's stdin closes, so a run that dies leaves none behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import subprocess
import tempfile
from pathlib import Path

LAUNCHER = Path(__file__).resolve().parent / "launcher.sh"


class Neo4jUnavailable(RuntimeError):
    """No JDK, Maven or jars for the version asked: a machine that cannot run it."""


class Neo4jHarness:
    """One Neo4j server started by launcher.sh (version: the compose pin when None)."""

    def __init__(self, version: str | None = None, workdir: Path | None = None,
                 java_opts: str = "") -> None:
        self.version, self.java_opts = version, java_opts
        self.owned = workdir is None  # a folder of our own: removed by stop()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="moe-neo4j-harness-"))
        self.log = self.workdir / "launcher.log"
        self.proc: subprocess.Popen | None = None
        self.uri = self.user = self.password = self.server_version = ""

    def start(self, timeout_s: float = 300.0) -> Neo4jHarness:
        args = ["bash", str(LAUNCHER), "--dir", str(self.workdir / "data")]
        if self.version:
            args += ["--version", self.version]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, env={**os.environ,
                                                          "MOE_NEO4J_JAVA_OPTS": self.java_opts})
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        line = self.proc.stdout.readline() if selector.select(timeout_s) else b""
        if not line:
            code = self.proc.poll()
            self.stop()
            why = self.last_log_line()
            if code == 3:
                raise Neo4jUnavailable(f"no Neo4j {self.version or 'LTS'}: {why}")
            raise RuntimeError(f"the Neo4j launcher gave no ready line in {timeout_s:.0f} s "
                               f"(exit {code}): {why}; log {self.log}")
        ready = json.loads(line)
        env = dict(row.split("=", 1) for row in
                   Path(ready["env_file"]).read_text().splitlines() if "=" in row)
        self.uri, self.user = ready["uri"], ready["user"]
        self.password, self.server_version = env["NEO4J_PASSWORD"], ready["version"]
        return self

    def last_log_line(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("WARNING")]
        return lines[-1] if lines else "nothing logged"

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # the launcher serves until its stdin closes
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        if self.owned:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Neo4jHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
