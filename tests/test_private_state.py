"""The state dir is its owner's alone: another user can read, list or search nothing in it,
whatever umask the command ran under, and a state dir left too open is fixed on start."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import forkrun
import pytest

from pipeline.settings import private_state_dir
from pipeline.storage.embedded import LocalGraphServer

ROOT = Path(__file__).resolve().parents[1]
OTHER_USER = "nobody"


def _other_user_exists() -> bool:
    if shutil.which("runuser") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["id", OTHER_USER], capture_output=True).returncode == 0


needs_other_user = pytest.mark.skipif(
    not _other_user_exists(), reason=f"needs root and `runuser` to act as {OTHER_USER!r}")


@pytest.fixture
def open_parent():
    """A folder every user may enter (pytest's own tmp dirs are 0700, which would hide the
    state dir from another user whatever its own mode)."""
    parent = Path(tempfile.mkdtemp(prefix="moe-private-", dir="/tmp"))
    parent.chmod(0o755)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NEO4J_URI", "DATABASE_URL", "STATE_DIR", "MOE_DATABASE_URL",
                        "MOE_NEO4J_URI")}
    return {**env, "MOE_STATE_DIR": str(state), "PYTHONPATH": str(ROOT), "MOE_DEVICE": "cpu"}


def _cli(args: list[str], state: Path, umask: int, cwd: Path) -> subprocess.CompletedProcess:
    return forkrun.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd,
                       env=_env(state), capture_output=True, text=True, timeout=600,
                       umask=umask)


def _as_other_user(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", OTHER_USER, "--", *command],
                          capture_output=True, text=True, timeout=30)


def _too_open(state: Path) -> list[str]:
    out = subprocess.run(["find", str(state), "-perm", "/077"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


@needs_other_user
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_a_real_run_leaves_nothing_another_user_can_read(open_parent, umask):
    state = open_parent / "state"
    items = open_parent / "items.jsonl"
    lines = (ROOT / "examples" / "texts.jsonl").read_text().splitlines()[:24]
    items.write_text("\n".join(lines) + "\n")
    items.chmod(0o644)
    try:
        out = _cli(["run", str(items), "--batch-size", "8"], state, umask, open_parent)
        assert out.returncode == 0, out.stderr
        assert "24 items (0 bad)" in out.stdout
        files = [p for p in state.rglob("*") if p.is_file()]
        names = {p.relative_to(state).as_posix() for p in files}
        # The ledger, the graph server's passwords, its database and its log are all there.
        assert {"runs.sqlite3", "graph/password", "graph/reader-password",
                "graph/server.log"} <= names
        assert any(n.startswith("graph/server/databases/insights/") for n in names), names
        assert _too_open(state) == []
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for path in [state, state / "graph"] + files[:40]:
            verb = ["ls", str(path)] if path.is_dir() else ["cat", str(path)]
            denied = _as_other_user(*verb)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, (path, denied)
        searched = _as_other_user("grep", "-r", "binomial", str(state))
        assert searched.returncode == 2 and "Permission denied" in searched.stderr
        assert searched.stdout == ""
    finally:
        LocalGraphServer(state).stop()


@needs_other_user
def test_a_state_dir_left_open_is_fixed_on_start(open_parent):
    """A state dir written under umask 000 by an earlier release: the next command (here
    `status`, which needs no graph) closes it before doing anything else."""
    state = open_parent / "state"
    (state / "graph" / "server" / "databases").mkdir(parents=True)
    (state / "models" / "m1").mkdir(parents=True)
    opened = [state / "graph" / "password", state / "graph" / "server" / "databases" / "d.wal",
              state / "models" / "m1" / "weights.pt"]
    for path in opened:
        path.write_text("secret")
        path.chmod(0o666)
    (state / "runs.sqlite3").touch(0o666)  # an empty SQLite database
    for folder in [state, state / "graph", state / "graph" / "server", state / "models"]:
        folder.chmod(0o777)
    assert _as_other_user("cat", str(opened[0])).returncode == 0  # readable before
    out = _cli(["status"], state, 0o022, open_parent)
    assert out.returncode == 0, out.stderr
    assert _too_open(state) == []
    assert {stat.S_IMODE(p.stat().st_mode) for p in opened} == {0o600}
    assert stat.S_IMODE((state / "graph" / "server").stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "runs.sqlite3").stat().st_mode) == 0o600
    denied = _as_other_user("cat", str(opened[0]))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


def test_private_state_dir_fixes_only_what_the_project_keeps(tmp_path):
    state = tmp_path / "state"
    (state / "graph").mkdir(parents=True)
    (state / "graph" / "server.log").write_text("log")
    (state / "graph" / "server.log").chmod(0o644)
    (state / "runs.sqlite3").write_text("")
    (state / "runs.sqlite3").chmod(0o664)
    (state / "graph" / "executable").write_text("")
    (state / "graph" / "executable").chmod(0o755)
    mine = tmp_path / "elsewhere.txt"  # a link out of the state dir is not followed
    mine.write_text("")
    mine.chmod(0o644)
    (state / "graph" / "link").symlink_to(mine)
    (state / "notes.txt").write_text("")  # not the project's: left as the user made it
    (state / "notes.txt").chmod(0o644)
    state.chmod(0o755)
    (state / "graph").chmod(0o755)
    assert private_state_dir(state) == 5  # state, graph, server.log, runs.sqlite3, executable
    modes = {p.relative_to(state).as_posix(): stat.S_IMODE(p.lstat().st_mode)
             for p in [state / "graph" / "server.log", state / "runs.sqlite3",
                       state / "graph" / "executable", state / "notes.txt"]}
    assert modes == {"graph/server.log": 0o600, "runs.sqlite3": 0o600,
                     "graph/executable": 0o700, "notes.txt": 0o644}
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(mine.stat().st_mode) == 0o644
    assert private_state_dir(state) == 0  # nothing left to fix
    fresh = tmp_path / "new" / "state"
    private_state_dir(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
