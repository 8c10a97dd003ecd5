"""The suite's fork helper (tests/forkrun.py) gives a command what a fresh interpreter would:
the same output and exit code, its own environment, directory, path, umask and limits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import forkrun
import pytest

pytestmark = pytest.mark.integration  # processes of their own

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(autouse=True)
def _helper():
    if forkrun._get() is None:
        pytest.skip("MOE_TEST_FORK=0, or the helper printed at import: commands run plainly")


@pytest.mark.parametrize("args", [["--help"], ["no-such-command"], ["train"],
                                  ["status", "--no-such-option"]])
def test_a_forked_command_prints_and_exits_as_a_fresh_one(args, tmp_path):
    env = {**os.environ, "MOE_STATE_DIR": str(tmp_path)}
    forked = forkrun.run([*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    fresh = subprocess.run([*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode, fresh.stdout, fresh.stderr)


def test_the_child_has_its_own_environment_directory_path_umask_and_limit(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, resource, sys\n"
        "mask = os.umask(0)\n"
        "print(json.dumps({'var': os.environ.get('PROBE'), 'cwd': os.getcwd(),\n"
        "                  'path0': sys.path[0], 'extra': sys.path[1], 'umask': mask,\n"
        "                  'limit': resource.getrlimit(resource.RLIMIT_AS)[0],\n"
        "                  'stdin': sys.stdin.read(), 'argv': sys.argv[1:],\n"
        "                  'pipeline': 'pipeline' in sys.modules}))\n"
        "sys.exit(3)\n")
    env = {**os.environ, "PROBE": "seen", "PYTHONPATH": str(tmp_path / "lib")}
    done = forkrun.run([sys.executable, str(script), "a", "b"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, input="typed", umask=0o027,
                       limit=8 << 30, timeout=60)
    import json

    seen = json.loads(done.stdout)
    assert done.returncode == 3, done.stderr
    assert seen == {"var": "seen", "cwd": str(tmp_path), "path0": str(tmp_path),
                    "extra": str(tmp_path / "lib"), "umask": 0o027, "limit": 8 << 30,
                    "stdin": "typed", "argv": ["a", "b"], "pipeline": False}


def test_a_left_running_child_is_killed_and_reaped_like_popen(tmp_path):
    log = tmp_path / "log"
    with log.open("w") as out:
        proc = forkrun.Popen([*CLI, "worker", "--help"], stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    assert isinstance(proc, forkrun.Popen)
    assert proc.wait(timeout=60) == 0 and "Usage" in log.read_text()
    sleeper = tmp_path / "sleep.py"
    sleeper.write_text("import time\ntime.sleep(600)\n")
    proc = forkrun.Popen([sys.executable, str(sleeper)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    assert proc.poll() is None
    os.killpg(proc.pid, 9)  # its own session: a test can kill the whole group
    assert proc.wait(timeout=30) == -9


def test_commands_it_cannot_fork_run_plainly():
    helper = forkrun._get()
    assert forkrun._forkable([*CLI, "run"], None, helper) is not None
    assert forkrun._forkable([sys.executable, "-c", "pass"], None, helper) is None
    assert forkrun._forkable([sys.executable, "-W", "error", "-m", "x"], None, helper) is None
    assert forkrun._forkable(["echo", "x"], None, helper) is None
    for name in ("TRITON_INTERPRET", "OMP_NUM_THREADS", "PYTHONHASHSEED", "HF_HOME"):
        changed = {**os.environ, name: os.environ.get(name, "") + "1"}
        assert forkrun._forkable([*CLI, "run"], changed, helper) is None, name


def test_a_start_up_variable_of_its_own_gets_a_helper_started_with_it(tmp_path):
    """OMP_NUM_THREADS is read when torch is imported: a command that sets it is forked from
    a helper that started with it, and sees torch use that many threads."""
    code = tmp_path / "threads.py"
    code.write_text("import torch\nprint(torch.get_num_threads())\n")
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        fresh = subprocess.run([sys.executable, str(code)], env=env, capture_output=True,
                               text=True, timeout=120)
        forked = forkrun.run([sys.executable, str(code)], env=env, capture_output=True,
                             text=True, timeout=120)
        assert forked.stdout == fresh.stdout == f"{threads}\n", (forked, fresh)
        forkrun.retire(env)
    done = forkrun.run([sys.executable, "-c", "import sys; print(sys.argv)"],
                       capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "['-c']"
