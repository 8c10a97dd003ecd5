"""The embedded graph server: ArcadeDB (pip package ``arcadedb-embedded``) speaking Bolt.

For users with neither Docker nor a Neo4j install. `LocalGraphServer` runs the server as a
separate process bound to 127.0.0.1 on free ports, keeps its data, password, ports and pid
under ``<state_dir>/graph``, waits until Bolt answers, and reuses a server that is already
running. The official neo4j driver talks to it like to Neo4j (see `graph.GraphStore`).

The server's own process is this module run as ``python -m pipeline.storage.embedded
ROOT BOLT_PORT HTTP_PORT``: it starts ArcadeDB with the Bolt plugin, creates the database on
first use, and stops cleanly when a ``stop`` file appears in ROOT.

Two database users: ``root`` (the pipeline's writes, and users' ``--write`` queries) and
``reader``, whose group may read records of every type and do nothing else (no record
writes, no schema, no security, no database settings), so that users' read-only queries are
refused by the server itself whatever their text. Both passwords are generated once and kept
owner-only beside the data. LOAD CSV can open neither a local file nor a URL, for any user.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError
from pipeline.settings import PRIVATE_UMASK

if TYPE_CHECKING:
    from pipeline.storage.graph import GraphStore

DATABASE = "insights"
USERNAME = "root"
READER = "reader"  # the user, and its group, that users' read-only queries run as
COMMAND_TIMEOUT_S = 120.0  # the server ends any one command after this long
BOLT_PLUGIN = "Bolt:com.arcadedb.bolt.BoltProtocolPlugin"


class LocalGraphError(PipelineError):
    """The embedded graph server could not start or stop; names its state dir."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open_private(path: Path, flags: int) -> int:
    """A file descriptor on ``path``, the file created owner-only (whatever the umask of a
    caller that is not the CLI: a user's script, a test)."""
    return os.open(path, flags | os.O_CREAT, 0o600)


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _is_our_server(pid: int) -> bool:
    """Whether ``pid`` is a graph server process of this module (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        # (local_graph: this module's name before 0.2, for a server started by an older release)
        return b"pipeline.storage.embedded" in cmdline or b"pipeline.storage.local_graph" in cmdline
    except OSError:
        return _alive(pid)  # no /proc: trust the pid file


def _alive(pid: int) -> bool:
    try:  # reap it if it is our own exited child: a zombie still answers kill(pid, 0)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ServerInfo:
    pid: int
    bolt_port: int
    http_port: int
    reader: bool = False  # has the read-only user (False: started by an earlier release)

    @property
    def uri(self) -> str:
        return f"bolt://127.0.0.1:{self.bolt_port}"


class LocalGraphServer:
    """Start, find, and stop the embedded graph server of one state dir."""

    def __init__(self, state_dir: str | Path, start_timeout_s: float = 90.0,
                 command_timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        self.root = Path(state_dir).resolve() / "graph"
        self.command_timeout_s = command_timeout_s  # for a server this object starts
        self.start_timeout_s = start_timeout_s

    @property
    def _info_file(self) -> Path:
        return self.root / "server.json"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def password(self) -> str:
        """The server's root password, generated once and kept owner-only."""
        return self._secret("password")

    def reader_password(self) -> str:
        """The read-only user's password, generated once and kept owner-only."""
        return self._secret("reader-password")

    def _secret(self, name: str) -> str:
        path = self.root / name
        if not path.exists():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        return path.read_text().strip()

    def running(self) -> ServerInfo | None:
        """The live server of this state dir, if any."""
        try:
            info = ServerInfo(**json.loads(self._info_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None
        if _alive(info.pid) and _is_our_server(info.pid) and _answers(info.bolt_port):
            return info
        return None

    def start(self) -> ServerInfo:
        """Reuse the running server or start one; returns once Bolt answers.

        Two processes starting at once serialise on a file lock: the second finds the
        first one's server instead of starting its own on the same data.
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with os.fdopen(_open_private(self.root / "start.lock", os.O_WRONLY), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            info = self.running()
            if info is not None and not info.reader:
                # Started by a release before the read-only user (and with LOAD CSV open to
                # local files): restarted once, on the same data, so that reads are guarded.
                self.stop()
                info = None
            return info if info is not None else self._spawn()

    def _spawn(self) -> ServerInfo:
        self.password()
        self.reader_password()
        (self.root / "ready").unlink(missing_ok=True)
        (self.root / "stop").unlink(missing_ok=True)
        bolt = _free_port()
        http = _free_port()
        while http == bolt:
            http = _free_port()
        info = ServerInfo(pid=0, bolt_port=bolt, http_port=http, reader=True)
        log = os.fdopen(_open_private(self.log_file, os.O_WRONLY | os.O_APPEND), "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.storage.embedded", str(self.root.resolve()),
             str(info.bolt_port), str(info.http_port), str(self.command_timeout_s)],
            cwd=self.root,  # ArcadeDB writes its log/ folder into the working directory
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # survives the CLI that started it; stop() ends it
        log.close()
        info.pid = proc.pid
        deadline = time.monotonic() + self.start_timeout_s
        while not (self.root / "ready").exists() or not _answers(info.bolt_port):
            if proc.poll() is not None:
                raise LocalGraphError(f"graph server in {self.root} exited with "
                                      f"{proc.returncode}; see {self.log_file}:\n"
                                      + self._log_tail())
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise LocalGraphError(f"graph server in {self.root} did not answer within "
                                      f"{self.start_timeout_s:.0f} s; see {self.log_file}")
            time.sleep(0.1)
        with os.fdopen(_open_private(self._info_file, os.O_WRONLY | os.O_TRUNC), "w") as f:
            f.write(json.dumps(info.__dict__))
        return info

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the running server (SIGTERM, then SIGKILL); False if none was running."""
        try:
            info = ServerInfo(**json.loads(self._info_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return False
        stopped = False
        if _alive(info.pid) and _is_our_server(info.pid):
            # A stop file, not only SIGTERM: the JVM inside the server process installs its
            # own signal handlers, and a clean stop lets ArcadeDB flush and close its files.
            (self.root / "stop").write_text("")
            deadline = time.monotonic() + timeout_s
            while _alive(info.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(info.pid):
                os.kill(info.pid, signal.SIGKILL)
            stopped = True
        (self.root / "stop").unlink(missing_ok=True)
        self._info_file.unlink(missing_ok=True)
        (self.root / "ready").unlink(missing_ok=True)
        return stopped

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def connect(self, timeout_s: float = 30.0) -> GraphStore:
        # The Bolt driver is loaded here, not with the module: `status`, `up` and `down` only
        # look for, start or stop the server, and start in a third of the time without it.
        from pipeline.storage.graph import GraphStore

        info = self.start()
        return GraphStore.connect(info.uri, USERNAME, self.password(), DATABASE, timeout_s,
                                  reader=(READER, self.reader_password()))


# What the reader's group may do in the database: read records of every type. The empty
# database-level list withholds updateSchema (CREATE INDEX, new labels), updateSecurity (which
# ArcadeDB also requires of LOAD CSV and of user commands) and updateDatabaseSettings.
READER_GROUP = {"access": [], "resultSetLimit": -1, "readTimeout": -1,
                "types": {"*": {"access": ["readRecord"]}}}


def _limit_commands(command_timeout_s: float) -> None:
    """LOAD CSV may open no local file and fetch no URL, for any user, root included; no
    command runs longer than ``command_timeout_s``.

    These are JVM-wide settings: ArcadeDB 26.10 reads them from a database's configuration,
    which falls back to the global values, not to the server's (set through the server's
    config dict, they were measured to have no effect). The process runs one server only.
    """
    import jpype

    config = jpype.JClass("com.arcadedb.GlobalConfiguration")
    config.OPENCYPHER_LOAD_CSV_ALLOW_FILE_URLS.setValue(False)
    config.OPENCYPHER_LOAD_CSV_ALLOW_REMOTE_URLS.setValue(False)
    # Every command ends within this (a read-only query included: the reader cannot
    # TERMINATE its own runaway query, and the group's readTimeout is not applied to Cypher
    # over Bolt, measured). The pipeline's own writes take well under a second a batch.
    config.COMMAND_TIMEOUT.setValue(int(command_timeout_s * 1000))


def _ensure_reader(server, password: str) -> None:
    """The read-only group and user, made again at every start as this module defines them
    (an edited group or user file cannot widen them across a restart).

    The Python wrapper has no security API; the Java server's `ServerSecurity` has, and
    persists what it is given to ``config/server-groups.json`` and ``server-users.jsonl``.
    """
    import jpype

    json_object = jpype.JClass("com.arcadedb.serializer.json.JSONObject")
    security = server._java_server.getSecurity()
    security.saveGroup(DATABASE, READER, json_object(json.dumps(READER_GROUP)))
    if security.existsUser(READER):
        security.dropUser(READER)
    security.createUser(json_object(json.dumps({
        "name": READER, "password": str(security.encodePassword(password)),
        "databases": {DATABASE: [READER]}})))


def _serve(root: Path, bolt_port: int, http_port: int, command_timeout_s: float) -> None:
    """The server process: run ArcadeDB until SIGTERM."""
    # Before the JVM starts: ArcadeDB creates its database files, WAL and logs with the
    # process's umask and no mode of its own, and this process is ours alone to set it.
    os.umask(PRIVATE_UMASK)
    import arcadedb_embedded
    from arcadedb_embedded.jvm import start_jvm

    start_jvm()
    _limit_commands(command_timeout_s)
    password = (root / "password").read_text().strip()
    server = arcadedb_embedded.ArcadeDBServer(
        str(root / "server"), root_password=password,
        config={"server_plugins": BOLT_PLUGIN, "bolt_port": bolt_port, "http_port": http_port,
                "host": "127.0.0.1"})
    server.start()
    if not (root / "server" / "databases" / DATABASE).exists():
        server.create_database(DATABASE)
    _ensure_reader(server, (root / "reader-password").read_text().strip())
    (root / "stop").unlink(missing_ok=True)
    (root / "ready").write_text(str(os.getpid()))
    while not (root / "stop").exists():
        time.sleep(0.1)
    server.stop()
    # The JVM's own non-daemon threads would keep the process alive after a clean stop.
    os._exit(0)


if __name__ == "__main__":
    try:
        _serve(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
               float(sys.argv[4]) if len(sys.argv) > 4 else COMMAND_TIMEOUT_S)
    except PipelineError as err:  # pragma: no cover - reported through the log
        print(err, file=sys.stderr)
        sys.exit(1)
