"""The state dir is the user's data dir wherever a command runs, unless MOE_STATE_DIR says."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import forkrun

from pipeline.settings import Settings


def test_the_default_state_dir_is_the_user_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_STATE_DIR", raising=False)
    monkeypatch.delenv("STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.state_dir == tmp_path / "data" / "moe-pipeline"
    assert settings.state_dir_source() == "the default"
    monkeypatch.setenv("MOE_STATE_DIR", str(tmp_path / "mine"))
    assert Settings().state_dir == tmp_path / "mine"
    assert Settings().state_dir_source() == "MOE_STATE_DIR"


def test_status_names_the_same_state_dir_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MOE_STATE_DIR", "STATE_DIR", "DATABASE_URL", "NEO4J_URI")}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    state = (tmp_path / "data" / "moe-pipeline").resolve()
    seen = []
    for cwd in (tmp_path, Path("/")):
        out = forkrun.run([sys.executable, "-m", "pipeline.cli", "status"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        seen.append(out.stdout.splitlines()[:2])
    assert seen[0] == seen[1] == [f"state dir: {state} (the default)",
                                  f"graph: embedded in {state / 'graph'}, down"]


def test_status_says_when_a_dot_env_file_chose_settings(tmp_path):
    """A `.env` in the working directory silently pointed every command elsewhere: status
    names the file and the settings it chose, never their values."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NEO4J_URI")}
    env["MOE_STATE_DIR"] = str(tmp_path / "state")
    env["MOE_SEED"] = "1"  # set by the environment too: the file did not choose it
    (tmp_path / ".env").write_text("NEO4J_PASSWORD=hunter2-secret\nMOE_SEED=3\nMOE_BATCH_SIZE=8\n")
    out = forkrun.run([sys.executable, "-m", "pipeline.cli", "status"], cwd=tmp_path,
                      env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    dot_env = (tmp_path / ".env").resolve()
    assert first == f"settings: {dot_env} chose MOE_BATCH_SIZE, NEO4J_PASSWORD"
    assert "hunter2" not in out.stdout + out.stderr
    plain = forkrun.run([sys.executable, "-m", "pipeline.cli", "status"],
                        cwd=tmp_path / "state", env=env, capture_output=True, text=True,
                        timeout=60)
    assert not plain.stdout.startswith("settings:"), plain.stdout
