"""Runs tests/test_moe_kernels.py under Triton's interpreter, in a process of its own.

``TRITON_INTERPRET=1`` takes effect only if set before triton is first imported, and in this
process torch._dynamo has imported it already; a fresh interpreter with the variable set runs
the kernel tests on CPU tensors (their CUDA cases skip there).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter running the kernel tests interpreted: 20 s, out of the editing tier.
pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install -e '.[dev]')")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="this process interprets already: the kernel tests ran in it")
def test_the_kernels_match_their_references_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
         str(ROOT / "tests" / "test_moe_kernels.py")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, tail  # all skipped: not run
